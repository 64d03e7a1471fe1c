"""The liveness (presentation-attack) model the client runs on every captured face.

:class:`LivenessModel` loads a ``.vfpad`` artifact (format:
:mod:`veilface.nn.liveness_io`), cuts the model's input around a detected
face exactly as training did, and gives P(live). The shipped default,
``weights/default.vfpad``, was trained by ``veilface fed train --task pad
--export`` on **proxy** sites (LFW faces, rendered print and replay attacks);
its manifest says so.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veilface.nn.liveness_io import CropSpec, LivenessModelInvalid, liveness_crop, read_artifact

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "LivenessModel", "LivenessScore", "default_model_path"]

DEFAULT_MODEL = "default.vfpad"


def default_model_path() -> Path:
    """Where the shipped default artifact is (inside the installed package)."""
    return Path(str(resources.files("veilface.client.liveness").joinpath("weights", DEFAULT_MODEL)))


@dataclass(frozen=True)
class LivenessScore:
    """One face's liveness decision."""

    score: float  # P(live) in [0, 1]
    threshold: float
    live: bool
    model_fingerprint: str


class LivenessModel:
    """A loaded, verified liveness artifact (thread-safe; torch runs single-threaded per call)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:  # the gate refuses rather than passing images through
            raise LivenessModelInvalid(
                "the liveness gate needs torch (pip install 'veilface[client]'); "
                "pass liveness=None to skip it explicitly"
            ) from exc
        from veilface.nn.pad_export import model_from_arrays

        artifact = read_artifact(path)
        self.path = Path(path)
        self.manifest: dict[str, Any] = artifact.manifest
        self.crop: CropSpec = artifact.crop
        self.threshold: float = artifact.threshold
        self.fingerprint: str = artifact.fingerprint
        self._model = model_from_arrays(artifact.architecture, artifact.arrays)
        if self._model.config.image_size != self.crop.size:
            raise LivenessModelInvalid(
                f"{path}: input side {self.crop.size} does not match the model's "
                f"{self._model.config.image_size}"
            )
        self._lock = threading.Lock()
        log.info("liveness model %s loaded (%s)", self.fingerprint[:12], self.path.name)

    @classmethod
    def default(cls) -> LivenessModel:
        """The proxy-trained default that ships with the package."""
        return cls(default_model_path())

    @property
    def proxy_trained(self) -> bool:
        return bool(self.manifest.get("training", {}).get("proxy", False))

    def crop_face(
        self, rgb: npt.NDArray[np.uint8], box: tuple[int, int, int, int]
    ) -> npt.NDArray[np.uint8]:
        """The model's input for the face at ``box`` (left, top, right, bottom)."""
        return liveness_crop(rgb, box, self.crop)

    def score_crops(self, crops: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
        """P(live) of ``(B, S, S, 3)`` uint8 crops."""
        import torch

        arr = np.asarray(crops)
        s = self.crop.size
        if arr.ndim != 4 or arr.shape[1:] != (s, s, 3) or arr.dtype != np.uint8:
            raise ValueError(f"crops must be (B, {s}, {s}, 3) uint8, got {arr.shape} {arr.dtype}")
        x = torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.crop.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.crop.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        with self._lock, torch.no_grad():
            p = self._model.score(x)
        return np.asarray(p.numpy(), dtype=np.float64)

    def check(self, rgb: npt.NDArray[np.uint8], box: tuple[int, int, int, int]) -> LivenessScore:
        """Score the face at ``box`` of ``rgb`` and decide at the artifact's threshold."""
        score = float(self.score_crops(self.crop_face(rgb, box)[None])[0])
        return LivenessScore(
            score=score,
            threshold=self.threshold,
            live=score >= self.threshold,
            model_fingerprint=self.fingerprint,
        )
