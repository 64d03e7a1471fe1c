"""``veilface bench liveness``: the liveness gate's error rates and time per face.

Error rates follow ISO/IEC 30107-3, at the artifact's own threshold (a face
is accepted as bona fide when P(live) >= threshold):

- APCER per attack (PAI) species = attacks of that species accepted / attacks
  of that species; the reported APCER is the worst species.
- BPCER = bona fide presentations refused / bona fide presentations.
- ACER = (APCER + BPCER) / 2, with the worst-species APCER.
- HTER = (FAR + FRR) / 2 with every attack pooled (one species).

A presentation the gate cannot process (no face found, a crop too small,
grey) is not a PAD decision: it is left out of the rates and counted under
``unprocessed`` (30107-3's failure to process), per set and reason.

Three sets:

(a) the four photos of ``pad-samples`` (``image_T*`` bona fide,
    ``image_F1`` a print, ``image_F2`` a screen replay), through the real
    pipeline: loaded with their EXIF orientation, faces detected with dlib
    (the largest), cropped and scored by the gate;
(b) print and replay attacks rendered from LFW people that no training used,
    by ``veilface.federated.pad.kiosk_proxy.render_bench_set(lfw_root,
    n_people=, seed=)`` (scenes, face boxes, labels 0 live / 1 print /
    2 replay); a ``renderer`` with that signature can be given instead;
(c) with ``attacks``, a user's folder of ``live/`` and ``attack/`` images
    (any depth; ``attack/<species>/...`` names species, else one species
    ``attack``), through the real pipeline as (a).

Time: torch runs on one thread. ``ms_per_face`` is the model alone on one
ready crop (normalisation and forward pass); ``ms_gate`` the whole gate on
a decoded photo and its face box: crop, colour check, model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veilface.client.face.backend import FaceBox
from veilface.client.liveness.gate import LivenessGate
from veilface.client.liveness.model import LivenessModel
from veilface.errors import FaceError, InvalidArgument

log = logging.getLogger(__name__)

__all__ = [
    "BONA_FIDE",
    "RENDERED_SPECIES",
    "TARGET_ACER",
    "TARGET_MS_PER_FACE",
    "LivenessBenchConfig",
    "format_table",
    "pad_sample_species",
    "run_liveness_bench",
    "write_json",
]

BONA_FIDE = "bona fide"
#: Labels of the rendered set.
RENDERED_SPECIES = {0: BONA_FIDE, 1: "print", 2: "replay"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: Targets of issue 14.
TARGET_MS_PER_FACE = 20.0
TARGET_ACER = 0.05

Renderer = Callable[..., Any]


@dataclass(frozen=True)
class LivenessBenchConfig:
    """Options of :func:`run_liveness_bench`.

    Attributes
    ----------
    model
        The ``.vfpad`` artifact (default: the one shipped with the package).
    pad_samples, lfw
        The pad-samples and LFW folders (default: ``$VEILFACE_DATA/...``, else
        ``../shared/data/...`` from the working directory).
    attacks
        A user's folder with ``live/`` and ``attack/``.
    n_people, seed
        Passed to the renderer of the rendered set.
    timing_runs
        Repetitions of each timing (after 3 warm-up runs).
    progress
        Progress bar over the rendered set.
    """

    model: Path | None = None
    pad_samples: Path | None = None
    lfw: Path | None = None
    attacks: Path | None = None
    n_people: int = 100
    seed: int = 0
    timing_runs: int = 50
    progress: bool = True


def _data_root() -> Path:
    env = os.environ.get("VEILFACE_DATA")
    return Path(env) if env else Path.cwd().parent / "shared" / "data"


def pad_sample_species(name: str) -> str | None:
    """Species of a pad-samples file by its name (``image_T*`` bona fide, ``F1`` print, ``F2`` replay)."""
    stem = Path(name).stem
    if stem.startswith("image_T"):
        return BONA_FIDE
    return {"image_F1": "print", "image_F2": "replay"}.get(
        stem, "attack" if stem.startswith("image_F") else None
    )


@dataclass
class _Set:
    """Scores of one set; ``species[i]`` is BONA_FIDE or an attack species."""

    scores: list[float]
    species: list[str]
    unprocessed: Counter[str]

    @classmethod
    def empty(cls) -> _Set:
        return cls([], [], Counter())

    def rates(self, threshold: float) -> dict[str, Any]:
        from veilface.federated.metrics import hter, pad_error_rates

        counts = Counter(self.species)
        out: dict[str, Any] = {
            "counts": {**dict(sorted(counts.items())), "unprocessed": dict(self.unprocessed)},
            "apcer": None, "bpcer": None, "acer": None, "hter": None, "apcer_per_species": {},
        }
        n_live = counts.get(BONA_FIDE, 0)
        if n_live == 0 or n_live == len(self.species):
            out["note"] = "needs both bona fide and attack presentations that the gate processed"
            return out
        live = np.asarray([s == BONA_FIDE for s in self.species], dtype=np.int64)
        pad = pad_error_rates(self.scores, live, threshold, attack_species=self.species)
        out.update(
            apcer=pad.apcer, bpcer=pad.bpcer, acer=pad.acer,
            hter=hter(self.scores, live, threshold), apcer_per_species=pad.apcer_per_species,
        )
        return out


class _Judge:
    """Finds the face (for files) and scores it with the gate's own checks."""

    def __init__(self, model: LivenessModel) -> None:
        self.model = model
        self.gate = LivenessGate(model, policy="record")
        self._detector: Any = None

    def detect(self, rgb: npt.NDArray[np.uint8]) -> FaceBox | None:
        if self._detector is None:
            from veilface.client.face.pipeline import FacePipeline

            self._detector = FacePipeline(on_multiple="largest", liveness=None)
        faces: list[FaceBox] = self._detector.detect(rgb)
        return faces[0] if faces else None

    def score(self, rgb: npt.NDArray[np.uint8], box: FaceBox) -> tuple[float | None, str]:
        """(P(live), "") or (None, why the gate could not judge)."""
        try:
            return self.gate.score(rgb, box).score, ""
        except FaceError as err:
            return None, type(err).__name__

    def file(self, path: Path) -> tuple[float | None, str, npt.NDArray[np.uint8] | None, FaceBox | None]:
        from veilface.client.face.image_io import load_image

        try:
            rgb = load_image(path)  # EXIF orientation applied
        except FaceError as err:
            return None, type(err).__name__, None, None
        box = self.detect(rgb)
        if box is None:
            return None, "NoFaceFound", rgb, None
        score, why = self.score(rgb, box)
        return score, why, rgb, box


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _pad_samples(judge: _Judge, root: Path) -> tuple[_Set, list[dict[str, Any]], list[Any]]:
    s = _Set.empty()
    per_image: list[dict[str, Any]] = []
    timing_inputs: list[Any] = []
    for path in _files(root):
        species = pad_sample_species(path.name)
        if species is None:
            log.warning("pad-samples: %s is neither image_T* nor image_F*; left out", path.name)
            continue
        score, why, rgb, box = judge.file(path)
        entry: dict[str, Any] = {"file": path.name, "species": species, "score": score}
        if box is not None:
            entry["box"] = [box.left, box.top, box.right, box.bottom]
        if score is None:
            entry["unprocessed"] = why
            s.unprocessed[why] += 1
        else:
            entry["accepted"] = score >= judge.model.threshold
            entry["correct"] = entry["accepted"] == (species == BONA_FIDE)
            s.scores.append(score)
            s.species.append(species)
            timing_inputs.append((rgb, box))
        per_image.append(entry)
    return s, per_image, timing_inputs


def _unpack(rendered: Any) -> tuple[Sequence[Any], Sequence[Any], Sequence[int]]:
    """(images, boxes, labels) from a tuple or an object with those attributes."""
    if all(hasattr(rendered, k) for k in ("images", "boxes", "labels")):
        return rendered.images, rendered.boxes, rendered.labels
    images, boxes, labels = rendered
    return images, boxes, labels


def _as_box(b: Any) -> FaceBox:
    if isinstance(b, FaceBox):
        return b
    left, top, right, bottom = (round(float(v)) for v in b)
    return FaceBox(left, top, right, bottom)


def _rendered(
    judge: _Judge, renderer: Renderer, lfw: Path, cfg: LivenessBenchConfig
) -> tuple[_Set, list[Any]]:
    images, boxes, labels = _unpack(renderer(lfw, n_people=cfg.n_people, seed=cfg.seed))
    if not len(images) == len(boxes) == len(labels):
        raise InvalidArgument(
            f"the renderer gave {len(images)} images, {len(boxes)} boxes, {len(labels)} labels"
        )
    s = _Set.empty()
    timing_inputs: list[Any] = []
    order: Iterable[int] = range(len(images))
    if cfg.progress:
        from tqdm import tqdm

        order = tqdm(order, desc="bench liveness (rendered)", unit="face")
    for i in order:
        label = int(labels[i])
        if label not in RENDERED_SPECIES:
            raise InvalidArgument(f"rendered label {label}; expected 0 live, 1 print, 2 replay")
        rgb = np.ascontiguousarray(images[i], dtype=np.uint8)
        box = _as_box(boxes[i])
        score, why = judge.score(rgb, box)
        if score is None:
            s.unprocessed[why] += 1
            continue
        s.scores.append(score)
        s.species.append(RENDERED_SPECIES[label])
        if len(timing_inputs) < 8:
            timing_inputs.append((rgb, box))
    return s, timing_inputs


def _user_set(judge: _Judge, root: Path) -> _Set:
    live_dir, attack_dir = root / "live", root / "attack"
    if not live_dir.is_dir() or not attack_dir.is_dir():
        raise InvalidArgument(f"--attacks {root} must hold the folders live/ and attack/")
    s = _Set.empty()
    labelled = [(p, BONA_FIDE) for p in _files(live_dir)]
    for p in _files(attack_dir):
        rel = p.relative_to(attack_dir).parts
        labelled.append((p, rel[0] if len(rel) > 1 else "attack"))
    if not labelled:
        raise InvalidArgument(f"--attacks {root}: no images under live/ or attack/")
    for path, species in labelled:
        score, why, _, _ = judge.file(path)
        if score is None:
            s.unprocessed[why] += 1
        else:
            s.scores.append(score)
            s.species.append(species)
    return s


def _timings(fn: Callable[[], object], runs: int) -> dict[str, float]:
    for _ in range(3):
        fn()
    ms = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    arr = np.asarray(ms)
    return {"median": float(np.median(arr)), "p95": float(np.percentile(arr, 95)), "runs": len(ms)}


def _time(judge: _Judge, inputs: list[Any], runs: int) -> dict[str, Any]:
    import torch

    if not inputs:
        return {"ms_per_face": None, "ms_gate": None, "note": "no processed face to time"}
    rgb, box = max(inputs, key=lambda x: x[0].size)  # the largest photo: the crop's worst case
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        crop = judge.model.crop_face(rgb, (box.left, box.top, box.right, box.bottom))[None]
        model = _timings(lambda: judge.model.score_crops(crop), runs)
        gate = _timings(lambda: judge.gate.score(rgb, box), runs)
    finally:
        torch.set_num_threads(before)
    return {
        "ms_per_face": model["median"],
        "ms_per_face_p95": model["p95"],
        "ms_gate": gate["median"],
        "ms_gate_p95": gate["p95"],
        "timing_runs": model["runs"],
        "timing_image": f"{rgb.shape[1]}x{rgb.shape[0]}",
        "torch_threads": 1,
    }


def _default_renderer() -> Renderer:
    from veilface.federated.pad.kiosk_proxy import render_bench_set

    fn: Renderer = render_bench_set
    return fn


def run_liveness_bench(
    cfg: LivenessBenchConfig,
    *,
    renderer: Renderer | None = None,
    model: LivenessModel | None = None,
) -> dict[str, Any]:
    """Error rates on (a), (b), (c) of the module docstring, and the time per face.

    Parameters
    ----------
    cfg
        Options.
    renderer
        Stands in for ``render_bench_set`` (same signature and result).
    model
        An already loaded model (instead of ``cfg.model``).

    Returns
    -------
    dict
        ``apcer_*``, ``bpcer_*``, ``acer_*``, ``hter_*`` for ``pad_samples``,
        ``rendered`` and (with ``attacks``) ``user`` (``None`` when a set is
        missing or lacks a class: see ``skipped``), the per-image
        ``pad_samples`` scores, per-set ``counts``, ``ms_per_face``,
        ``ms_gate``, ``threshold``, ``model_fingerprint`` and ``targets``.

    Raises
    ------
    LivenessModelInvalid
        The artifact cannot be loaded (or the default is not installed).
    InvalidArgument
        ``attacks`` is not a folder with ``live/`` and ``attack/``, or the
        renderer's result does not fit.
    """
    from veilface.client.liveness.gate import load_default_model

    if model is None:
        model = load_default_model() if cfg.model is None else LivenessModel(cfg.model)
    judge = _Judge(model)
    root = _data_root()
    result: dict[str, Any] = {
        "model": str(model.path),
        "model_fingerprint": model.fingerprint,
        "threshold": model.threshold,
        "threshold_rule": model.manifest.get("threshold_rule", {}),
        "proxy_trained": model.proxy_trained,
        "skipped": {},
        "counts": {},
        "apcer_per_species": {},
    }
    timing_inputs: list[Any] = []
    sets: dict[str, _Set] = {}

    samples = cfg.pad_samples or root / "pad-samples"
    if samples.is_dir():
        sets["pad_samples"], result["pad_samples"], timing_inputs = _pad_samples(judge, samples)
    else:
        result["skipped"]["pad_samples"] = f"no pad-samples folder at {samples}"
        result["pad_samples"] = []

    lfw = cfg.lfw or root / "lfw"
    render: Renderer | None = renderer
    if render is None:
        try:
            render = _default_renderer()
        except ImportError as exc:
            result["skipped"]["rendered"] = f"the bench-set renderer is not available ({exc})"
    if render is not None and renderer is None and not lfw.is_dir():
        result["skipped"]["rendered"] = f"no LFW folder at {lfw} (set VEILFACE_DATA or --lfw)"
        render = None
    if render is not None:
        sets["rendered"], more = _rendered(judge, render, lfw, cfg)
        timing_inputs = timing_inputs or more

    if cfg.attacks is not None:
        sets["user"] = _user_set(judge, cfg.attacks)

    for name in ("pad_samples", "rendered", "user"):
        if name == "user" and cfg.attacks is None:
            continue
        r = sets[name].rates(model.threshold) if name in sets else _Set.empty().rates(1.0)
        for k in ("apcer", "bpcer", "acer", "hter"):
            result[f"{k}_{name}"] = r[k]
        result["apcer_per_species"][name] = r["apcer_per_species"]
        result["counts"][name] = r["counts"]
        if "note" in r and name in sets:
            result["skipped"].setdefault(name, r["note"])
    result.update(_time(judge, timing_inputs, cfg.timing_runs))
    result["targets"] = _targets(result)
    return result


def _targets(result: dict[str, Any]) -> dict[str, bool | None]:
    ms, acer = result.get("ms_per_face"), result.get("acer_rendered")
    samples = result.get("pad_samples") or []
    return {
        f"ms_per_face_le_{TARGET_MS_PER_FACE:g}": None if ms is None else ms <= TARGET_MS_PER_FACE,
        f"acer_rendered_le_{TARGET_ACER:g}": None if acer is None else acer <= TARGET_ACER,
        "pad_samples_all_correct": (
            None if not samples else all(e.get("correct", False) for e in samples)
        ),
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:6.2f} %"


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width table of :func:`run_liveness_bench`'s result."""
    proxy = ", proxy-trained" if result.get("proxy_trained") else ""
    lines = [
        (
            f"model {result['model_fingerprint'][:12]} ({Path(result['model']).name}{proxy}), "
            f"threshold {result['threshold']:.4f}"
        ),
        f"{'set':<12} {'APCER':>9} {'BPCER':>9} {'ACER':>9} {'HTER':>9}  counts",
    ]
    for name in ("pad_samples", "rendered", "user"):
        if f"apcer_{name}" not in result:
            continue
        counts = result["counts"].get(name, {})
        shown = ", ".join(
            f"{k} {v}" for k, v in counts.items() if k != "unprocessed"
        ) or "none"
        unproc = sum(counts.get("unprocessed", {}).values())
        lines.append(
            f"{name:<12} "
            + " ".join(f"{_pct(result[f'{k}_{name}']):>9}" for k in ("apcer", "bpcer", "acer", "hter"))
            + f"  {shown}" + (f"; {unproc} unprocessed" if unproc else "")
        )
        per = result["apcer_per_species"].get(name) or {}
        if len(per) > 1:
            lines.append("  APCER per species: " + ", ".join(f"{k} {_pct(v)}" for k, v in per.items()))
    for entry in result.get("pad_samples", []):
        score = "n/a" if entry["score"] is None else f"{entry['score']:.4f}"
        verdict = entry.get("unprocessed") or ("accepted" if entry["accepted"] else "refused")
        lines.append(f"  {entry['file']:<16} {entry['species']:<10} P(live) {score:>7}  {verdict}")
    for name, why in result["skipped"].items():
        lines.append(f"{name}: skipped, {why}")
    if result.get("ms_per_face") is not None:
        lines.append(
            f"ms per face, one thread: model {result['ms_per_face']:.2f} (p95 "
            f"{result['ms_per_face_p95']:.2f}), whole gate with the crop {result['ms_gate']:.2f} "
            f"(p95 {result['ms_gate_p95']:.2f}) on a {result['timing_image']} photo"
        )
    lines.append(
        "targets: " + ", ".join(
            f"{k} {'n/a' if v is None else ('met' if v else 'NOT met')}"
            for k, v in result["targets"].items()
        )
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` as indented, key-sorted JSON (creating parent folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
