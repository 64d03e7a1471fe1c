"""Index the visible-infrared ReID data sets SYSU-MM01, RegDB and LLCM.

The loaders read the sets' published folder layouts and label files and
return :class:`ReIDSample` lists; they never open images (a training data
pipeline does that). Everything a loader finds wrong is raised at once as a
:class:`~veilface.errors.DatasetLayoutError` (an
:class:`~veilface.errors.InvalidArgument`; re-exported here) naming the path
and the layout that was expected, or as its subclass
:class:`~veilface.errors.LabelMismatchError` when the label files disagree
with the images.

None of these sets can be downloaded by this package: they are licensed
for research on request from their authors, and the user points the loader
at their copy.

Camera and modality conventions
-------------------------------
SYSU-MM01
    Cameras 1, 2, 4, 5 are visible (RGB), cameras 3 and 6 near-infrared.
RegDB
    One visible camera (id 1) and one thermal camera (id 2); thermal counts
    as ``"infrared"``.
LLCM
    Camera id parsed from ``_cNN`` in the file name; the modality comes from
    the list the image is in (``*_vis.txt`` visible, ``*_nir.txt`` infrared).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from veilface.errors import DatasetLayoutError, InvalidArgument, LabelMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "LLCM_LAYOUT",
    "REGDB_LAYOUT",
    "SYSU_INFRARED_CAMERAS",
    "SYSU_LAYOUT",
    "SYSU_VISIBLE_CAMERAS",
    "DatasetLayoutError",
    "LabelMismatchError",
    "Modality",
    "ReIDSample",
    "ReIDSplits",
    "load_llcm",
    "load_regdb",
    "load_sysu_mm01",
    "relabel",
    "sample_arrays",
    "split_query_gallery",
    "sysu_query_gallery",
]

Modality = Literal["visible", "infrared"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})

SYSU_VISIBLE_CAMERAS: tuple[int, ...] = (1, 2, 4, 5)
SYSU_INFRARED_CAMERAS: tuple[int, ...] = (3, 6)

SYSU_LAYOUT = """SYSU-MM01 layout expected:
  <root>/cam1 .. cam6/<pid, 4 digits>/<image>.jpg   (cams 1,2,4,5 visible; 3,6 infrared)
  <root>/exp/train_id.txt, val_id.txt, test_id.txt  (comma-separated person ids)"""

REGDB_LAYOUT = """RegDB layout expected:
  <root>/Visible/<pid>/<image>.bmp, <root>/Thermal/<pid>/<image>.bmp
  <root>/idx/train_visible_{trial}.txt, train_thermal_{trial}.txt,
             test_visible_{trial}.txt,  test_thermal_{trial}.txt  (trial 1..10)
  each line: <path relative to root> <integer label>"""

LLCM_LAYOUT = """LLCM layout expected:
  <root>/idx/train_vis.txt, train_nir.txt, test_vis.txt, test_nir.txt
  each line: <path relative to root> <integer label>, e.g.
  nir/0001/0001_c01_s185535_f7010_nir.jpg 0  (camera from '_cNN', pid folder before the file)"""


@dataclass(frozen=True)
class ReIDSample:
    """One image of a person.

    Attributes
    ----------
    path : pathlib.Path
        Absolute path of the image file.
    pid : int
        Person id as the data set defines it (SYSU-MM01: the 4-digit folder
        name; RegDB and LLCM: the label column of the list file).
    camid : int
        Camera id (1-based).
    modality : {"visible", "infrared"}
    """

    path: Path
    pid: int
    camid: int
    modality: Modality


@dataclass(frozen=True)
class ReIDSplits:
    """The samples of each split; ``val`` is empty when the set has none."""

    train: list[ReIDSample]
    val: list[ReIDSample]
    test: list[ReIDSample]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _require_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise DatasetLayoutError(f"missing folder {path}\n{layout}")


def _require_file(path: Path, layout: str) -> None:
    if not path.is_file():
        raise DatasetLayoutError(f"missing file {path}\n{layout}")


def _read_text(path: Path, layout: str) -> str:
    _require_file(path, layout)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"cannot read {path}: {exc}\n{layout}") from exc


def _root(root: str | Path, layout: str) -> Path:
    path = Path(root).expanduser()
    _require_dir(path, layout)
    return path.resolve()


# --------------------------------------------------------------------------
# SYSU-MM01
# --------------------------------------------------------------------------


def _read_sysu_ids(path: Path) -> list[int]:
    text = _read_text(path, SYSU_LAYOUT)
    ids: list[int] = []
    for token in re.split(r"[,\s]+", text.strip()):
        if not token:
            continue
        if not token.isdigit():
            raise DatasetLayoutError(
                f"{path}: {token!r} is not a person id (expected comma-separated integers)\n{SYSU_LAYOUT}"
            )
        ids.append(int(token))
    if not ids:
        raise DatasetLayoutError(f"{path} lists no person ids\n{SYSU_LAYOUT}")
    if len(set(ids)) != len(ids):
        raise LabelMismatchError(f"{path} lists some person ids more than once")
    return ids


def load_sysu_mm01(root: str | Path) -> ReIDSplits:
    """Index SYSU-MM01 (Wu et al., ICCV 2017).

    Parameters
    ----------
    root : str or pathlib.Path
        The folder holding ``cam1`` .. ``cam6`` and ``exp`` (see
        :data:`SYSU_LAYOUT`).

    Returns
    -------
    ReIDSplits
        ``train``, ``val`` and ``test`` from ``exp/*_id.txt``, every image of
        the listed people in every camera, sorted by path. Most VI-ReID work
        trains on ``train + val``.

    Raises
    ------
    DatasetLayoutError
        A camera folder or id file is missing or malformed, a folder in a
        camera is not a 4-digit person id.
    LabelMismatchError
        A person folder is in no id list, a listed person has no images, or
        a person is listed in two splits.
    """
    base = _root(root, SYSU_LAYOUT)
    splits = {
        name: _read_sysu_ids(base / "exp" / f"{name}_id.txt") for name in ("train", "val", "test")
    }
    owner: dict[int, str] = {}
    for name, ids in splits.items():
        for pid in ids:
            if pid in owner:
                raise LabelMismatchError(
                    f"person {pid:04d} is listed in both exp/{owner[pid]}_id.txt and exp/{name}_id.txt under {base}"
                )
            owner[pid] = name

    out: dict[str, list[ReIDSample]] = {"train": [], "val": [], "test": []}
    seen: set[int] = set()
    for cam in range(1, 7):
        cam_dir = base / f"cam{cam}"
        _require_dir(cam_dir, SYSU_LAYOUT)
        modality: Modality = "visible" if cam in SYSU_VISIBLE_CAMERAS else "infrared"
        for pid_dir in sorted(cam_dir.iterdir()):
            if not pid_dir.is_dir():
                logger.debug("SYSU-MM01: ignoring non-folder %s", pid_dir)
                continue
            if not re.fullmatch(r"\d{4}", pid_dir.name):
                raise DatasetLayoutError(
                    f"{pid_dir} is not a 4-digit person-id folder\n{SYSU_LAYOUT}"
                )
            pid = int(pid_dir.name)
            split = owner.get(pid)
            if split is None:
                raise LabelMismatchError(
                    f"person folder {pid_dir} is in none of exp/train_id.txt, val_id.txt, test_id.txt"
                )
            images = sorted(
                p for p in pid_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if images:
                seen.add(pid)
            out[split].extend(ReIDSample(p, pid, cam, modality) for p in images)

    missing = sorted(set(owner) - seen)
    if missing:
        shown = ", ".join(f"{pid:04d} ({owner[pid]})" for pid in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise LabelMismatchError(
            f"listed persons with no image in any camera under {base}: {shown}{more}"
        )
    logger.info(
        "SYSU-MM01 at %s: %d/%d/%d train/val/test images",
        base,
        len(out["train"]),
        len(out["val"]),
        len(out["test"]),
    )
    return ReIDSplits(train=out["train"], val=out["val"], test=out["test"])


# --------------------------------------------------------------------------
# list-file sets: RegDB and LLCM
# --------------------------------------------------------------------------


def _read_list(
    base: Path,
    list_path: Path,
    layout: str,
    *,
    modality: Modality,
    camid_of: Callable[[Path, Path, int], int],
    prefix: str | None = None,
) -> list[tuple[ReIDSample, str]]:
    """Parse ``<relative path> <label>`` lines; return samples with their pid folder name."""
    text = _read_text(list_path, layout)
    rows: list[tuple[ReIDSample, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise DatasetLayoutError(
                f"{list_path}:{lineno}: expected '<relative path> <integer label>', got {line!r}\n{layout}"
            )
        rel, label = parts[0], int(parts[1])
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts or len(rel_path.parts) < 2:
            raise DatasetLayoutError(
                f"{list_path}:{lineno}: {rel!r} must be a path relative to {base} inside a person folder\n{layout}"
            )
        if prefix is not None and rel_path.parts[0] != prefix:
            raise DatasetLayoutError(
                f"{list_path}:{lineno}: {rel!r} should be under {prefix}/\n{layout}"
            )
        path = base / rel_path
        if not path.is_file():
            raise LabelMismatchError(f"{list_path}:{lineno}: listed image {path} does not exist")
        camid = camid_of(rel_path, list_path, lineno)
        rows.append((ReIDSample(path, label, camid, modality), rel_path.parts[-2]))
    if not rows:
        raise DatasetLayoutError(f"{list_path} lists no images\n{layout}")
    return rows


def _check_labels(rows: Sequence[tuple[ReIDSample, str]], what: str) -> None:
    """One label per person folder and one person folder per label, across modalities."""
    folder_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    for sample, folder in rows:
        if folder_of.setdefault(sample.pid, folder) != folder:
            raise LabelMismatchError(
                f"{what}: label {sample.pid} is given to images of person folders "
                f"{folder_of[sample.pid]!r} and {folder!r} ({sample.path})"
            )
        if label_of.setdefault(folder, sample.pid) != sample.pid:
            raise LabelMismatchError(
                f"{what}: person folder {folder!r} has labels {label_of[folder]} and {sample.pid} ({sample.path})"
            )


def _check_disjoint(
    train: Iterable[tuple[ReIDSample, str]], test: Iterable[tuple[ReIDSample, str]], base: Path
) -> None:
    overlap = sorted({f for _, f in train} & {f for _, f in test})
    if overlap:
        raise LabelMismatchError(
            f"person folders in both the train and the test lists under {base}: {', '.join(overlap[:10])}"
        )


def load_regdb(root: str | Path, *, trial: int = 1) -> ReIDSplits:
    """Index RegDB (Nguyen et al., Sensors 2017) for one of its ten trials.

    Parameters
    ----------
    root : str or pathlib.Path
        The folder holding ``Visible``, ``Thermal`` and ``idx`` (see
        :data:`REGDB_LAYOUT`).
    trial : int, keyword-only
        1 .. 10, selects ``idx/*_{trial}.txt``.

    Returns
    -------
    ReIDSplits
        ``train`` and ``test`` hold the visible (camera 1) then thermal
        (camera 2) images in list order; ``val`` is empty. ``pid`` is the
        list's label.

    Raises
    ------
    DatasetLayoutError
        A folder or list file is missing, a line is malformed, or a visible
        list points outside ``Visible/`` (thermal: ``Thermal/``).
    LabelMismatchError
        A listed image is missing, a label covers two person folders (or one
        folder two labels, across both modalities), or a person is in both
        the train and the test lists.
    """
    if not isinstance(trial, int) or not 1 <= trial <= 10:
        raise InvalidArgument(f"RegDB trial must be an integer in 1..10, got {trial!r}")
    base = _root(root, REGDB_LAYOUT)
    for folder in ("Visible", "Thermal", "idx"):
        _require_dir(base / folder, REGDB_LAYOUT)

    split_rows: dict[str, list[tuple[ReIDSample, str]]] = {}
    for split in ("train", "test"):
        rows = _read_list(
            base,
            base / "idx" / f"{split}_visible_{trial}.txt",
            REGDB_LAYOUT,
            modality="visible",
            camid_of=lambda *_: 1,
            prefix="Visible",
        )
        rows += _read_list(
            base,
            base / "idx" / f"{split}_thermal_{trial}.txt",
            REGDB_LAYOUT,
            modality="infrared",
            camid_of=lambda *_: 2,
            prefix="Thermal",
        )
        _check_labels(rows, f"RegDB {split} lists, trial {trial}, under {base}")
        split_rows[split] = rows
    _check_disjoint(split_rows["train"], split_rows["test"], base)
    logger.info(
        "RegDB at %s, trial %d: %d train / %d test images",
        base,
        trial,
        len(split_rows["train"]),
        len(split_rows["test"]),
    )
    return ReIDSplits(
        train=[s for s, _ in split_rows["train"]], val=[], test=[s for s, _ in split_rows["test"]]
    )


_LLCM_CAMERA = re.compile(r"_c(\d+)")


def _llcm_camid(rel: Path, list_path: Path, lineno: int) -> int:
    match = _LLCM_CAMERA.search(rel.name)
    if match is None:
        raise DatasetLayoutError(
            f"{list_path}:{lineno}: no camera '_cNN' in file name {rel.name!r}\n{LLCM_LAYOUT}"
        )
    return int(match.group(1))


def load_llcm(root: str | Path) -> ReIDSplits:
    """Index LLCM, the low-light cross-modality set (Zhang & Wang, CVPR 2023).

    Parameters
    ----------
    root : str or pathlib.Path
        The folder holding ``idx/`` and the image folders the lists name
        (``vis/``, ``nir/``, ``test_vis/``, ``test_nir/`` in the release;
        paths are taken as given, relative to ``root``). See
        :data:`LLCM_LAYOUT`.

    Returns
    -------
    ReIDSplits
        ``train`` and ``test`` hold the visible then the near-infrared
        images in list order; ``val`` is empty. ``pid`` is the list's
        label, ``camid`` the ``_cNN`` of the file name.

    Raises
    ------
    DatasetLayoutError
        ``idx/`` or a list file is missing, a line is malformed, or a file
        name has no camera.
    LabelMismatchError
        A listed image is missing, labels and person folders disagree, or a
        person is in both the train and the test lists.
    """
    base = _root(root, LLCM_LAYOUT)
    _require_dir(base / "idx", LLCM_LAYOUT)
    split_rows: dict[str, list[tuple[ReIDSample, str]]] = {}
    for split in ("train", "test"):
        rows = _read_list(
            base,
            base / "idx" / f"{split}_vis.txt",
            LLCM_LAYOUT,
            modality="visible",
            camid_of=_llcm_camid,
        )
        rows += _read_list(
            base,
            base / "idx" / f"{split}_nir.txt",
            LLCM_LAYOUT,
            modality="infrared",
            camid_of=_llcm_camid,
        )
        _check_labels(rows, f"LLCM {split} lists under {base}")
        split_rows[split] = rows
    _check_disjoint(split_rows["train"], split_rows["test"], base)
    logger.info(
        "LLCM at %s: %d train / %d test images",
        base,
        len(split_rows["train"]),
        len(split_rows["test"]),
    )
    return ReIDSplits(
        train=[s for s, _ in split_rows["train"]], val=[], test=[s for s, _ in split_rows["test"]]
    )


# --------------------------------------------------------------------------
# evaluation splits and labels
# --------------------------------------------------------------------------


def split_query_gallery(
    test: Sequence[ReIDSample],
    *,
    query_modality: Modality = "infrared",
    gallery_cameras: Iterable[int] | None = None,
    shots: int | None = None,
    trial: int = 0,
) -> tuple[list[ReIDSample], list[ReIDSample]]:
    """Cross-modality query and gallery sets from test samples.

    Parameters
    ----------
    test : sequence of ReIDSample
    query_modality : {"visible", "infrared"}, keyword-only
        Every test sample of this modality is a query; the gallery is drawn
        from the other modality.
    gallery_cameras : iterable of int, optional, keyword-only
        Keep only these gallery cameras (SYSU-MM01 indoor search: 1, 2).
    shots : int, optional, keyword-only
        Draw this many gallery images per (person, camera) (1 = single-shot,
        10 = multi-shot, as in the SYSU-MM01 protocol; fewer when a camera
        has fewer). ``None`` keeps them all (the RegDB protocol).
    trial : int, keyword-only
        Seed of the gallery draw; the protocols average 10 trials.

    Returns
    -------
    tuple of (list of ReIDSample, list of ReIDSample)
        ``(query, gallery)``, gallery in path order.
    """
    if query_modality not in ("visible", "infrared"):
        raise InvalidArgument(
            f"query_modality must be 'visible' or 'infrared', got {query_modality!r}"
        )
    if shots is not None and shots < 1:
        raise InvalidArgument(f"shots must be >= 1 or None, got {shots}")
    cams = None if gallery_cameras is None else set(gallery_cameras)
    query = [s for s in test if s.modality == query_modality]
    pool = [s for s in test if s.modality != query_modality and (cams is None or s.camid in cams)]
    if shots is not None:
        rng = np.random.default_rng(trial)
        groups: dict[tuple[int, int], list[ReIDSample]] = {}
        for s in sorted(pool, key=lambda s: str(s.path)):
            groups.setdefault((s.pid, s.camid), []).append(s)
        pool = []
        for key in sorted(groups):
            members = groups[key]
            picks = rng.choice(len(members), size=min(shots, len(members)), replace=False)
            pool.extend(members[i] for i in sorted(picks))
    gallery = sorted(pool, key=lambda s: str(s.path))
    if not query or not gallery:
        raise InvalidArgument(f"empty query ({len(query)}) or gallery ({len(gallery)}) set")
    return query, gallery


def sysu_query_gallery(
    test: Sequence[ReIDSample],
    *,
    mode: Literal["all", "indoor"] = "all",
    shots: int = 1,
    trial: int = 0,
) -> tuple[list[ReIDSample], list[ReIDSample]]:
    """The SYSU-MM01 test protocol: infrared queries, a sampled visible gallery.

    Parameters
    ----------
    test : sequence of ReIDSample
        ``load_sysu_mm01(root).test``.
    mode : {"all", "indoor"}, keyword-only
        All-search gallery from cameras 1, 2, 4, 5; indoor search from 1, 2.
    shots : int, keyword-only
        1 (single-shot) or 10 (multi-shot) gallery images per person and camera.
    trial : int, keyword-only
        Seed of the gallery draw.

    Returns
    -------
    tuple of (list of ReIDSample, list of ReIDSample)
        ``(query, gallery)``; evaluate with
        ``evaluate_retrieval(..., protocol="sysu")``.
    """
    if mode not in ("all", "indoor"):
        raise InvalidArgument(f"mode must be 'all' or 'indoor', got {mode!r}")
    cams = SYSU_VISIBLE_CAMERAS if mode == "all" else (1, 2)
    return split_query_gallery(
        test, query_modality="infrared", gallery_cameras=cams, shots=shots, trial=trial
    )


def sample_arrays(
    samples: Sequence[ReIDSample],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(pids, camids)``, each ``(n,)`` int64, for :func:`~veilface.federated.metrics.evaluate_retrieval`."""
    pids = np.fromiter((s.pid for s in samples), dtype=np.int64, count=len(samples))
    cams = np.fromiter((s.camid for s in samples), dtype=np.int64, count=len(samples))
    return pids, cams


def relabel(samples: Iterable[ReIDSample]) -> dict[int, int]:
    """Map the person ids present to contiguous class indices ``0 .. n-1`` (sorted by id)."""
    return {pid: i for i, pid in enumerate(sorted({s.pid for s in samples}))}
