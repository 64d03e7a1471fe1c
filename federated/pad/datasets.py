"""Index the face PAD data sets OULU-NPU, CASIA-FASD, Replay-Attack, MSU-MFSD, CelebA-Spoof.

The loaders read each set's published folder layout and protocol / label
files and return :class:`PADSample` lists per split; they never decode
videos or images. Anything wrong is raised at once as a
:class:`~veilface.errors.DatasetLayoutError` naming the
path and the expected layout, or as its subclass
:class:`~veilface.errors.LabelMismatchError` when a
label or protocol file disagrees with the files on disk (or with the file
names' own codes). None of these sets can be downloaded by this package;
they are licensed for research by their authors.

Species
-------
``"live"`` (bona fide), ``"print"`` (printed photo, incl. warped / cut
photos and posters), ``"replay"`` (a photo or video shown on a screen),
``"mask"`` (paper masks), ``"3d_mask"``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from veilface.errors import DatasetLayoutError, LabelMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "CASIA_FASD_LAYOUT",
    "CELEBA_SPOOF_LAYOUT",
    "MSU_MFSD_LAYOUT",
    "OULU_NPU_LAYOUT",
    "REPLAY_ATTACK_LAYOUT",
    "DatasetLayoutError",
    "LabelMismatchError",
    "PADSample",
    "PADSplits",
    "load_casia_fasd",
    "load_celeba_spoof",
    "load_msu_mfsd",
    "load_oulu_npu",
    "load_replay_attack",
]

Species = Literal["live", "print", "replay", "mask", "3d_mask"]
Split = Literal["train", "dev", "test"]
VIDEO_SUFFIXES = frozenset({".avi", ".mov", ".mp4"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})

OULU_NPU_LAYOUT = """OULU-NPU layout expected:
  <root>/Train_files/, Dev_files/, Test_files/   videos <Phone>_<Session>_<User>_<File>.avi
      Phone 1-6, Session 1-3, User 01-55, File 1 real, 2-3 print, 4-5 replay
  <root>/Protocols/Protocol_<1..4>/Train.txt, Dev.txt, Test.txt
      (protocols 3 and 4: Train_<k>.txt, Dev_<k>.txt, Test_<k>.txt, k = 1..6)
      each line: <label>,<video name>   label +1 real, -1 print, -2 replay"""

CASIA_FASD_LAYOUT = """CASIA-FASD layout expected:
  <root>/train_release/<subject>/ and <root>/test_release/<subject>/
  each subject folder: 1..8.avi and HR_1..HR_4.avi
      1, 2, HR_1 real; 3, 4, HR_2 warped photo; 5, 6, HR_3 cut photo; 7, 8, HR_4 video replay"""

REPLAY_ATTACK_LAYOUT = """Replay-Attack (Idiap) layout expected:
  <root>/train/, devel/, test/  each with
      real/client<NNN>_session<NN>_webcam_authenticate_<scene>_<k>.mov
      attack/fixed/attack_<print|mobile|highdef>_client<NNN>_session<NN>_<device>_<photo|video>_<scene>.mov
      attack/hand/  (same names)"""

MSU_MFSD_LAYOUT = """MSU-MFSD layout expected:
  <root>/scene01/real/real_client<NNN>_<android|laptop>_SD_scene01.<mp4|mov>
  <root>/scene01/attack/attack_client<NNN>_<android|laptop>_SD_<ipad_video|iphone_video|printed_photo>_scene01.<mp4|mov>
  <root>/train_sub_list.txt, <root>/test_sub_list.txt   one client id per line"""

CELEBA_SPOOF_LAYOUT = """CelebA-Spoof layout expected:
  <root>/Data/train/<subject>/live/<n>.jpg, <root>/Data/train/<subject>/spoof/<n>.png (same for test)
  <root>/metas/intra_test/train_label.json, test_label.json
      {"Data/train/<subject>/<live|spoof>/<n>.<ext>": [44 ints], ...}
      index 40 spoof type (0 live, 1-3 print, 4-6 paper mask, 7-9 replay, 10 3D mask),
      index 43 label (0 live, 1 spoof)"""


@dataclass(frozen=True)
class PADSample:
    """One video (or image) of a presentation.

    Attributes
    ----------
    path : pathlib.Path
        Absolute path of the video or image.
    label : int
        1 = bona fide (live), 0 = attack (the metrics' convention).
    species : str
        One of ``live``, ``print``, ``replay``, ``mask``, ``3d_mask``.
    subject : str
        Subject / client id as the data set names it.
    split : {"train", "dev", "test"}
    dataset : str
        ``"oulu-npu"``, ``"casia-fasd"``, ``"replay-attack"``, ``"msu-mfsd"``, ``"celeba-spoof"``.
    """

    path: Path
    label: int
    species: Species
    subject: str
    split: Split
    dataset: str


@dataclass(frozen=True)
class PADSplits:
    """Samples per split; ``dev`` is empty when the set has none."""

    train: list[PADSample]
    dev: list[PADSample]
    test: list[PADSample]

    def all(self) -> list[PADSample]:
        """Every sample, train then dev then test."""
        return [*self.train, *self.dev, *self.test]


def _root(root: str | Path, layout: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(f"missing folder {path}\n{layout}")
    return path.resolve()


def _require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"missing folder {path}\n{layout}")
    return path


def _read_text(path: Path, layout: str) -> str:
    if not path.is_file():
        raise DatasetLayoutError(f"missing file {path}\n{layout}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"cannot read {path}: {exc}\n{layout}") from exc


def _files(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _sample(path: Path, species: Species, subject: str, split: Split, dataset: str) -> PADSample:
    return PADSample(
        path=path,
        label=1 if species == "live" else 0,
        species=species,
        subject=subject,
        split=split,
        dataset=dataset,
    )


# --------------------------------------------------------------------------
# OULU-NPU
# --------------------------------------------------------------------------

_OULU_NAME = re.compile(r"^([1-6])_([1-3])_(\d{2})_([1-5])$")
_OULU_SPECIES: dict[int, Species] = {1: "live", 2: "print", 3: "print", 4: "replay", 5: "replay"}
_OULU_LABELS: dict[str, Species] = {"+1": "live", "1": "live", "-1": "print", "-2": "replay"}


def load_oulu_npu(root: str | Path, *, protocol: int = 1, fold: int = 1) -> PADSplits:
    """Index OULU-NPU under one of its four protocols.

    Parameters
    ----------
    root : str or pathlib.Path
    protocol : int, keyword-only
        1-4.
    fold : int, keyword-only
        1-6, protocols 3 and 4 only (leave-one-phone-out folds).

    Returns
    -------
    PADSplits
        ``subject`` is the two-digit user id; videos are ``.avi``.

    Raises
    ------
    DatasetLayoutError
        Missing folders or protocol files, malformed lines, bad arguments.
    LabelMismatchError
        A listed video is missing, or its label disagrees with its file code.
    """
    base = _root(root, OULU_NPU_LAYOUT)
    if protocol not in (1, 2, 3, 4):
        raise DatasetLayoutError(f"OULU-NPU protocol must be 1-4, got {protocol}")
    if protocol in (3, 4) and fold not in range(1, 7):
        raise DatasetLayoutError(f"OULU-NPU protocols 3/4 need fold 1-6, got {fold}")
    proto_dir = _require_dir(base / "Protocols" / f"Protocol_{protocol}", OULU_NPU_LAYOUT)
    splits: dict[str, list[PADSample]] = {}
    for split, folder, stem in (
        ("train", "Train_files", "Train"),
        ("dev", "Dev_files", "Dev"),
        ("test", "Test_files", "Test"),
    ):
        videos = _require_dir(base / folder, OULU_NPU_LAYOUT)
        name = f"{stem}_{fold}.txt" if protocol in (3, 4) else f"{stem}.txt"
        list_path = proto_dir / name
        out: list[PADSample] = []
        for lineno, line in enumerate(_read_text(list_path, OULU_NPU_LAYOUT).splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")]
            m = _OULU_NAME.match(parts[1]) if len(parts) == 2 else None
            if m is None or parts[0] not in _OULU_LABELS:
                raise DatasetLayoutError(
                    f"{list_path}:{lineno}: expected '<+1|-1|-2>,<P_S_UU_F>', got {line!r}\n"
                    f"{OULU_NPU_LAYOUT}"
                )
            listed = _OULU_LABELS[parts[0]]
            coded = _OULU_SPECIES[int(m.group(4))]
            if listed != coded:
                raise LabelMismatchError(
                    f"{list_path}:{lineno}: label {parts[0]} ({listed}) but the file code "
                    f"{m.group(4)} of {parts[1]} means {coded}"
                )
            video = videos / f"{parts[1]}.avi"
            if not video.is_file():
                raise LabelMismatchError(
                    f"{list_path}:{lineno}: {parts[1]} is listed but {video} does not exist"
                )
            out.append(_sample(video, coded, m.group(3), split, "oulu-npu"))  # type: ignore[arg-type]
        if not out:
            raise DatasetLayoutError(f"{list_path} lists no videos\n{OULU_NPU_LAYOUT}")
        splits[split] = out
    return PADSplits(train=splits["train"], dev=splits["dev"], test=splits["test"])


# --------------------------------------------------------------------------
# CASIA-FASD
# --------------------------------------------------------------------------

_CASIA_SPECIES: dict[str, Species] = {
    "1": "live",
    "2": "live",
    "HR_1": "live",
    "3": "print",
    "4": "print",
    "HR_2": "print",
    "5": "print",
    "6": "print",
    "HR_3": "print",
    "7": "replay",
    "8": "replay",
    "HR_4": "replay",
}


def load_casia_fasd(root: str | Path) -> PADSplits:
    """Index CASIA-FASD (``train_release`` -> train, ``test_release`` -> test; no dev).

    Raises
    ------
    DatasetLayoutError
        Missing release folders, no subjects, or a subject folder with a
        missing or unknown video (all 12 are required).
    """
    base = _root(root, CASIA_FASD_LAYOUT)
    splits: dict[str, list[PADSample]] = {}
    for split, folder in (("train", "train_release"), ("test", "test_release")):
        release = _require_dir(base / folder, CASIA_FASD_LAYOUT)
        subjects = sorted((p for p in release.iterdir() if p.is_dir()), key=lambda p: p.name)
        if not subjects:
            raise DatasetLayoutError(f"{release} holds no subject folders\n{CASIA_FASD_LAYOUT}")
        out: list[PADSample] = []
        for subject in subjects:
            videos = {p.stem: p for p in _files(subject, VIDEO_SUFFIXES)}
            unknown = sorted(set(videos) - set(_CASIA_SPECIES))
            missing = sorted(set(_CASIA_SPECIES) - set(videos))
            if unknown or missing:
                raise DatasetLayoutError(
                    f"{subject}: missing videos {missing}, unknown videos {unknown}\n"
                    f"{CASIA_FASD_LAYOUT}"
                )
            for stem, species in _CASIA_SPECIES.items():
                out.append(
                    _sample(
                        videos[stem],
                        species,
                        subject.name,
                        split,  # type: ignore[arg-type]
                        "casia-fasd",
                    )
                )
        splits[split] = out
    return PADSplits(train=splits["train"], dev=[], test=splits["test"])


# --------------------------------------------------------------------------
# Replay-Attack
# --------------------------------------------------------------------------

_REPLAY_REAL = re.compile(
    r"^client(\d{3})_session\d{2}_webcam_authenticate_(controlled|adverse)_\d+$"
)
_REPLAY_ATTACK = re.compile(
    r"^attack_(print|mobile|highdef)_client(\d{3})_session\d{2}_(\w+?)_(photo|video)_(controlled|adverse)$"
)


def load_replay_attack(root: str | Path) -> PADSplits:
    """Index Idiap Replay-Attack (train / devel / test; fixed and hand-held attacks).

    ``attack_print_*`` is a print attack; ``attack_mobile_*`` and
    ``attack_highdef_*`` (photos or videos on a screen) are replays.

    Raises
    ------
    DatasetLayoutError
        Missing folders, a file name not in the published pattern, or a split
        without real or attack videos.
    LabelMismatchError
        A real video under ``attack/`` or an attack under ``real/``.
    """
    base = _root(root, REPLAY_ATTACK_LAYOUT)
    splits: dict[str, list[PADSample]] = {}
    for split, folder in (("train", "train"), ("dev", "devel"), ("test", "test")):
        sdir = _require_dir(base / folder, REPLAY_ATTACK_LAYOUT)
        out: list[PADSample] = []
        for video in _files(_require_dir(sdir / "real", REPLAY_ATTACK_LAYOUT), VIDEO_SUFFIXES):
            m = _REPLAY_REAL.match(video.stem)
            if m is None:
                if _REPLAY_ATTACK.match(video.stem):
                    raise LabelMismatchError(f"{video} is an attack video inside real/")
                raise DatasetLayoutError(
                    f"unexpected real video name {video}\n{REPLAY_ATTACK_LAYOUT}"
                )
            out.append(_sample(video, "live", m.group(1), split, "replay-attack"))  # type: ignore[arg-type]
        n_attack = 0
        for support in ("fixed", "hand"):
            adir = _require_dir(sdir / "attack" / support, REPLAY_ATTACK_LAYOUT)
            for video in _files(adir, VIDEO_SUFFIXES):
                a = _REPLAY_ATTACK.match(video.stem)
                if a is None:
                    if _REPLAY_REAL.match(video.stem):
                        raise LabelMismatchError(f"{video} is a real video inside attack/")
                    raise DatasetLayoutError(
                        f"unexpected attack video name {video}\n{REPLAY_ATTACK_LAYOUT}"
                    )
                species: Species = "print" if a.group(1) == "print" else "replay"
                out.append(_sample(video, species, a.group(2), split, "replay-attack"))  # type: ignore[arg-type]
                n_attack += 1
        if n_attack == 0 or n_attack == len(out):
            raise DatasetLayoutError(
                f"{sdir} must hold both real and attack videos\n{REPLAY_ATTACK_LAYOUT}"
            )
        splits[split] = out
    return PADSplits(train=splits["train"], dev=splits["dev"], test=splits["test"])


# --------------------------------------------------------------------------
# MSU-MFSD
# --------------------------------------------------------------------------

_MSU_REAL = re.compile(r"^real_client(\d{3})_(android|laptop)_SD_scene01$")
_MSU_ATTACK = re.compile(
    r"^attack_client(\d{3})_(android|laptop)_SD_(ipad_video|iphone_video|printed_photo)_scene01$"
)


def _read_ids(path: Path) -> list[str]:
    ids: list[str] = []
    for lineno, line in enumerate(_read_text(path, MSU_MFSD_LAYOUT).splitlines(), 1):
        token = line.strip()
        if not token:
            continue
        if not token.isdigit():
            raise DatasetLayoutError(f"{path}:{lineno}: expected a client id, got {token!r}")
        ids.append(f"{int(token):03d}")
    return ids


def load_msu_mfsd(root: str | Path) -> PADSplits:
    """Index MSU-MFSD with its subject lists (train / test; no dev).

    Raises
    ------
    DatasetLayoutError
        Missing folders or lists, unexpected file names.
    LabelMismatchError
        A client in both lists, a listed client without videos, or videos of
        a client in neither list.
    """
    base = _root(root, MSU_MFSD_LAYOUT)
    scene = _require_dir(base / "scene01", MSU_MFSD_LAYOUT)
    train_ids = _read_ids(base / "train_sub_list.txt")
    test_ids = _read_ids(base / "test_sub_list.txt")
    both = sorted(set(train_ids) & set(test_ids))
    if both:
        raise LabelMismatchError(
            f"clients {both} are in both train_sub_list.txt and test_sub_list.txt"
        )
    found: list[tuple[Path, Species, str]] = []
    for video in _files(_require_dir(scene / "real", MSU_MFSD_LAYOUT), VIDEO_SUFFIXES):
        m = _MSU_REAL.match(video.stem)
        if m is None:
            if _MSU_ATTACK.match(video.stem):
                raise LabelMismatchError(f"{video} is an attack video inside real/")
            raise DatasetLayoutError(f"unexpected real video name {video}\n{MSU_MFSD_LAYOUT}")
        found.append((video, "live", m.group(1)))
    for video in _files(_require_dir(scene / "attack", MSU_MFSD_LAYOUT), VIDEO_SUFFIXES):
        a = _MSU_ATTACK.match(video.stem)
        if a is None:
            if _MSU_REAL.match(video.stem):
                raise LabelMismatchError(f"{video} is a real video inside attack/")
            raise DatasetLayoutError(f"unexpected attack video name {video}\n{MSU_MFSD_LAYOUT}")
        found.append((video, "print" if a.group(3) == "printed_photo" else "replay", a.group(1)))
    clients = {c for _, _, c in found}
    unlisted = sorted(clients - set(train_ids) - set(test_ids))
    empty = sorted((set(train_ids) | set(test_ids)) - clients)
    if unlisted or empty:
        raise LabelMismatchError(
            f"MSU-MFSD subject lists disagree with scene01/: clients with videos but in no list "
            f"{unlisted}; listed clients without videos {empty}"
        )
    train = [_sample(p, s, c, "train", "msu-mfsd") for p, s, c in found if c in set(train_ids)]
    test = [_sample(p, s, c, "test", "msu-mfsd") for p, s, c in found if c in set(test_ids)]
    return PADSplits(train=train, dev=[], test=test)


# --------------------------------------------------------------------------
# CelebA-Spoof
# --------------------------------------------------------------------------

_CELEBA_SPOOF_TYPE: dict[int, Species] = {
    0: "live",
    1: "print",
    2: "print",
    3: "print",
    4: "mask",
    5: "mask",
    6: "mask",
    7: "replay",
    8: "replay",
    9: "replay",
    10: "3d_mask",
}
_CELEBA_PATH = re.compile(r"^Data/(train|test)/([^/]+)/(live|spoof)/[^/]+$")


def _load_celeba_split(base: Path, split: Literal["train", "test"]) -> list[PADSample]:
    label_path = base / "metas" / "intra_test" / f"{split}_label.json"
    try:
        labels = json.loads(_read_text(label_path, CELEBA_SPOOF_LAYOUT))
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(
            f"{label_path} is not valid JSON: {exc}\n{CELEBA_SPOOF_LAYOUT}"
        ) from exc
    if not isinstance(labels, dict) or not labels:
        raise DatasetLayoutError(
            f"{label_path} must be a non-empty JSON object\n{CELEBA_SPOOF_LAYOUT}"
        )
    _require_dir(base / "Data" / split, CELEBA_SPOOF_LAYOUT)
    out: list[PADSample] = []
    for rel, attrs in sorted(labels.items()):
        m = _CELEBA_PATH.match(rel)
        if m is None or m.group(1) != split:
            raise DatasetLayoutError(
                f"{label_path}: key {rel!r} is not Data/{split}/<subject>/<live|spoof>/<file>"
            )
        if (
            not isinstance(attrs, list)
            or len(attrs) != 44
            or not all(isinstance(a, int) for a in attrs)
        ):
            raise DatasetLayoutError(f"{label_path}: {rel}: expected a list of 44 integers")
        spoof_type, spoof_label = attrs[40], attrs[43]
        if spoof_type not in _CELEBA_SPOOF_TYPE or spoof_label not in (0, 1):
            raise DatasetLayoutError(
                f"{label_path}: {rel}: spoof type {spoof_type} / label {spoof_label} out of range"
            )
        folder_live = m.group(3) == "live"
        if folder_live != (spoof_label == 0) or (spoof_type == 0) != (spoof_label == 0):
            raise LabelMismatchError(
                f"{label_path}: {rel}: folder {m.group(3)!r}, spoof type {spoof_type} and "
                f"label {spoof_label} disagree"
            )
        path = base / rel
        if not path.is_file():
            raise LabelMismatchError(f"{label_path}: {rel} is labelled but {path} does not exist")
        out.append(_sample(path, _CELEBA_SPOOF_TYPE[spoof_type], m.group(2), split, "celeba-spoof"))
    on_disk = {
        p.relative_to(base).as_posix()
        for p in (base / "Data" / split).glob("*/*/*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.parent.name in ("live", "spoof")
    }
    unlabelled = sorted(on_disk - set(labels))
    if unlabelled:
        raise LabelMismatchError(
            f"{len(unlabelled)} image(s) under Data/{split} have no entry in {label_path} "
            f"(e.g. {unlabelled[0]})"
        )
    return out


def load_celeba_spoof(root: str | Path) -> PADSplits:
    """Index CelebA-Spoof with the intra-test label files (train / test; no dev).

    Raises
    ------
    DatasetLayoutError
        Missing folders or label files, malformed JSON or entries.
    LabelMismatchError
        An entry whose folder (live/spoof), spoof type and label disagree, a
        labelled file that is missing, or an image without a label.
    """
    base = _root(root, CELEBA_SPOOF_LAYOUT)
    return PADSplits(
        train=_load_celeba_split(base, "train"), dev=[], test=_load_celeba_split(base, "test")
    )
