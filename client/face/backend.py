"""The interface every face backend implements (dlib, insightface)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class FaceBox:
    """A detected face, in pixel coordinates of the image it was found in.

    ``left``/``top`` are inclusive, ``right``/``bottom`` exclusive. A box may
    reach past the image border (detectors do that for faces cut by the
    frame); use :meth:`clipped` before cropping. ``score`` is the detector's
    confidence, comparable only within one backend. ``landmarks`` are the 5
    points ``(x, y)`` (eyes, nose tip, mouth corners) when the detector gives
    them (insightface's SCRFD does; dlib's HOG detector does not).
    """

    left: int
    top: int
    right: int
    bottom: int
    score: float = 0.0
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    def clipped(self, width: int, height: int) -> FaceBox:
        """This box limited to an image of ``width`` x ``height`` pixels (landmarks kept)."""
        return replace(
            self,
            left=min(max(self.left, 0), width),
            top=min(max(self.top, 0), height),
            right=min(max(self.right, 0), width),
            bottom=min(max(self.bottom, 0), height),
        )


def check_rgb(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """``rgb`` as a C-contiguous array, or :class:`ValueError` unless it is ``uint8 (H, W, 3)``."""
    ok = isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
    if not ok or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(
            f"expected a uint8 RGB array of shape (H, W, 3), got shape {shape} dtype {dtype} "
            "(convert with veilface.client.face.load_image)"
        )
    return np.ascontiguousarray(rgb)


@runtime_checkable
class FaceBackend(Protocol):
    """Detects faces and turns one face into an embedding.

    Images are ``uint8`` RGB arrays of shape ``(H, W, 3)``, C-contiguous (what
    :func:`veilface.client.face.load_image` returns). A backend loads its models
    once, lazily, and is then reused; it need not be thread-safe.
    """

    #: Short name recorded with each embedding (``"dlib"``).
    name: str
    #: Length of the vectors :meth:`align_and_embed` returns.
    embedding_dim: int

    def load(self) -> None:
        """Load the models now rather than on first use (idempotent)."""
        ...

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[FaceBox]:
        """All faces in ``rgb``, in no particular order."""
        ...

    def align_and_embed(self, rgb: npt.NDArray[np.uint8], box: FaceBox) -> npt.NDArray[np.float32]:
        """Align the face in ``box``; return its ``float32 (embedding_dim,)`` embedding."""
        ...


__all__ = ["FaceBackend", "FaceBox", "check_rgb"]
