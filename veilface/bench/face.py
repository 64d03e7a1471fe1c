"""Time the on-device face pipeline per photo, end to end (decode, detect, gate, align, embed).

``veilface bench face --images DIR`` picks up to ``--limit`` image files under
``DIR`` (any depth, e.g. LFW's ``<person>/<image>.jpg``), evenly spread over
the sorted file list so that many people are covered, and runs
:meth:`FacePipeline.embed` on each *file path*, so JPEG decoding is included.
Models are loaded and one warm-up photo embedded before timing. The backend
is wrapped in a timing proxy that records the detector and the
align-and-embed calls; the rest of each photo's time (decoding, conversion,
the quality gate's sharpness measure) is reported as ``other``. Photos the
gate refuses are timed too and counted by reason. ``on_multiple="largest"``
as for the LFW embeddings: LFW photos often show a second face.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veilface.client.face import FaceBackend, FaceBox, FacePipeline
from veilface.errors import FaceError, InvalidArgument

#: The issue's target for the dlib backend on a 250 x 250 photo.
TARGET_SEC_PER_IMAGE = 0.5
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class FaceBenchConfig:
    """Options of :func:`run_face_bench`.

    Attributes
    ----------
    images
        Folder searched (recursively) for image files.
    backend
        ``"dlib"`` or ``"insightface"``.
    model_dir
        Model folder (required for ``"insightface"``; optional for dlib).
    limit
        Most photos timed (spread evenly over the sorted file list).
    threads
        onnxruntime threads for ``"insightface"`` (0: its default).
    progress
        Show a progress bar.
    """

    images: Path
    backend: str = "dlib"
    model_dir: Path | None = None
    limit: int = 200
    threads: int = 0
    progress: bool = True


class _TimedBackend:
    """A :class:`FaceBackend` proxy that records how long each call took."""

    def __init__(self, inner: FaceBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.embedding_dim = inner.embedding_dim
        self.detect_s: list[float] = []
        self.embed_s: list[float] = []

    def load(self) -> None:
        self.inner.load()
        self.embedding_dim = self.inner.embedding_dim

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[FaceBox]:
        t0 = time.perf_counter()
        try:
            faces: list[FaceBox] = self.inner.detect(rgb)
            return faces
        finally:
            self.detect_s.append(time.perf_counter() - t0)

    def align_and_embed(self, rgb: npt.NDArray[np.uint8], box: FaceBox) -> npt.NDArray[np.float32]:
        t0 = time.perf_counter()
        try:
            vector: npt.NDArray[np.float32] = self.inner.align_and_embed(rgb, box)
            return vector
        finally:
            self.embed_s.append(time.perf_counter() - t0)


def list_images(root: Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files under ``root``, evenly spread over the sorted list.

    Raises
    ------
    InvalidArgument
        ``root`` is not a folder or holds no image file.
    """
    if limit < 1:
        raise InvalidArgument(f"limit must be >= 1, got {limit}")
    if not root.is_dir():
        raise InvalidArgument(f"--images {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InvalidArgument(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    if len(files) <= limit:
        return files
    picks = np.linspace(0, len(files) - 1, limit).round().astype(int)
    return [files[i] for i in picks]


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0.0}
    arr = np.asarray(values)
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
    }


def _load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # not on every platform
        return None


def _size_of(path: Path) -> str:
    """``"WxH"`` from the file header (informative only; not part of the timing)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return f"{im.size[0]}x{im.size[1]}"
    except Exception:  # noqa: BLE001 - a refused file is counted by the pipeline
        return "unreadable"


def _make_backend(cfg: FaceBenchConfig) -> FaceBackend:
    if cfg.backend == "dlib":
        from veilface.client.face import DlibBackend

        return DlibBackend(model_dir=cfg.model_dir)
    if cfg.backend == "insightface":
        from veilface.client.face import InsightFaceBackend

        if cfg.model_dir is None:
            raise InvalidArgument("--backend insightface needs --model-dir (insightface's root)")
        return InsightFaceBackend(cfg.model_dir, threads=cfg.threads)
    raise InvalidArgument(f"unknown backend {cfg.backend!r}; use 'dlib' or 'insightface'")


def run_face_bench(cfg: FaceBenchConfig) -> dict[str, Any]:
    """Time :meth:`FacePipeline.embed` per photo.

    Returns
    -------
    dict
        JSON-ready: ``sec_per_image`` (``mean``, ``median``, ``p95``,
        ``max`` over all timed photos, refused ones included), ``detect_s``,
        ``embed_s`` (align and embed, accepted photos), ``other_s``,
        ``cpu_sec_per_image`` (process CPU time, all threads: less sensitive
        than wall time to other processes on the machine),
        ``load_average_1min`` (before and after),
        ``n_images``, ``n_embedded``, ``refused`` (count per error class),
        ``image_sizes`` (count per ``WxH``), ``load_s``, ``meets_target``
        (wall median at most :data:`TARGET_SEC_PER_IMAGE`),
        ``meets_target_cpu`` (the same for CPU time), and the setup.
    """
    files = list_images(cfg.images, cfg.limit)
    timed = _TimedBackend(_make_backend(cfg))
    t0 = time.perf_counter()
    timed.load()
    # The face backend's time alone: the liveness gate is timed by `veilface bench liveness`.
    pipeline = FacePipeline(timed, on_multiple="largest", liveness=None)
    try:  # warm-up: first-call allocations are not part of the per-photo figure
        pipeline.embed(files[0])
    except FaceError:
        pass
    load_s = time.perf_counter() - t0
    timed.detect_s.clear()
    timed.embed_s.clear()

    iterator: Any = files
    if cfg.progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc=f"bench face ({cfg.backend})", unit="img")
    totals: list[float] = []
    cpu: list[float] = []
    others: list[float] = []
    load_before = _load_average()
    refused: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for path in iterator:
        n_det, n_emb = len(timed.detect_s), len(timed.embed_s)
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            pipeline.embed(path)
        except FaceError as err:
            refused[type(err).__name__] += 1
        total = time.perf_counter() - start
        cpu.append(time.process_time() - start_cpu)
        totals.append(total)
        others.append(total - sum(timed.detect_s[n_det:]) - sum(timed.embed_s[n_emb:]))
        sizes[_size_of(path)] += 1
    per_image = _stats(totals)
    return {
        "bench": "face",
        "backend": timed.name,
        "images_dir": str(cfg.images),
        "limit": cfg.limit,
        "n_images": len(files),
        "n_embedded": len(files) - sum(refused.values()),
        "refused": dict(sorted(refused.items())),
        "image_sizes": dict(sizes.most_common(5)),
        "load_s": load_s,
        "sec_per_image": per_image,
        "cpu_sec_per_image": _stats(cpu),
        "detect_s": _stats(timed.detect_s),
        "embed_s": _stats(timed.embed_s),
        "other_s": _stats(others),
        "target_sec_per_image": TARGET_SEC_PER_IMAGE,
        "meets_target": per_image["median"] <= TARGET_SEC_PER_IMAGE,
        "meets_target_cpu": _stats(cpu)["median"] <= TARGET_SEC_PER_IMAGE,
        "threads": cfg.threads if cfg.backend == "insightface" else 1,
        # other processes share the cores: wall times are only comparable at a similar load
        "load_average_1min": {"before": load_before, "after": _load_average()},
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.machine(),
            "python": platform.python_version(),
        },
    }


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width table of :func:`run_face_bench`'s result."""

    def ms(stats: dict[str, float]) -> str:
        return " / ".join(f"{stats[k] * 1000:7.1f}" for k in ("mean", "median", "p95", "max"))

    refused = ", ".join(f"{k} {v}" for k, v in result["refused"].items()) or "none"
    rows = [
        ("backend", result["backend"]),
        ("photos timed / embedded", f"{result['n_images']} / {result['n_embedded']}"),
        ("refused by the gate", refused),
        ("most common sizes", ", ".join(f"{k} ({v})" for k, v in result["image_sizes"].items())),
        ("model load + warm-up (s)", f"{result['load_s']:.2f}"),
        ("ms per photo    mean / median / p95 / max", ""),
        ("  end to end", ms(result["sec_per_image"])),
        ("  detect", ms(result["detect_s"])),
        ("  align + embed", ms(result["embed_s"])),
        ("  decode + gate + other", ms(result["other_s"])),
        ("CPU ms per photo (all threads)", ms(result["cpu_sec_per_image"])),
        (
            "load average before / after",
            " / ".join(
                "n/a" if v is None else f"{v:.1f}" for v in result["load_average_1min"].values()
            ),
        ),
        (
            "target (median), wall / CPU",
            (
                f"<= {result['target_sec_per_image'] * 1000:.0f} ms: "
                f"{'met' if result['meets_target'] else 'NOT met'} / "
                f"{'met' if result['meets_target_cpu'] else 'NOT met'}"
            ),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` as indented, key-sorted JSON (creating parent folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


__all__ = [
    "TARGET_SEC_PER_IMAGE",
    "FaceBenchConfig",
    "format_table",
    "list_images",
    "run_face_bench",
    "write_json",
]
