"""Square face crops for the surrogates, differentiable with respect to the pixels.

The same geometry serves training (crops of LFW photos) and the attack (crops
of the photo being protected), so the surrogates see at attack time what
they saw in training. A crop is a square around a detector box
(:func:`crop_square`), cut from the image and shrunk with an anti-aliased
bilinear resize (``torch.nn.functional.interpolate(..., antialias=True)``),
so every pixel of the face gets a gradient, not only the pixels next to
sampling points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch.nn.functional as F
from torch import Tensor

from veilface.client.face.backend import FaceBox

#: Side of the crop square as a multiple of the larger side of the detector box.
SQUARE_SCALE: Final = 1.3
#: How far the square's centre sits above the box centre, as a fraction of the box height
#: (dlib boxes stop at the eyebrows; the forehead identifies too).
CENTER_SHIFT: Final = 0.08


@dataclass(frozen=True)
class Square:
    """A square region in image pixels (float; may reach past the border)."""

    cx: float
    cy: float
    side: float

    def jittered(self, *, scale: float, dx: float, dy: float) -> Square:
        """The square scaled by ``scale`` and moved by ``(dx, dy)`` times its side."""
        return Square(self.cx + dx * self.side, self.cy + dy * self.side, self.side * scale)

    def bounds(self) -> tuple[int, int, int, int]:
        """Integer ``(left, top, right, bottom)``, right/bottom exclusive."""
        half = self.side / 2.0
        left = math.floor(self.cx - half)
        top = math.floor(self.cy - half)
        side = max(2, round(self.side))
        return left, top, left + side, top + side


def crop_square(box: FaceBox) -> Square:
    """The canonical crop square of a detector box."""
    side = SQUARE_SCALE * max(box.width, box.height)
    cx = (box.left + box.right) / 2.0
    cy = (box.top + box.bottom) / 2.0 - CENTER_SHIFT * box.height
    return Square(cx, cy, side)


def cut(images: Tensor, square: Square, size: int) -> Tensor:
    """Cut ``square`` out of ``images`` and resize it to ``size`` x ``size``.

    Parts of the square outside the image are filled by replicating the
    border pixels.

    Parameters
    ----------
    images
        ``float32 (N, 3, H, W)`` in ``[0, 1]``.
    square
        The region, in pixels of ``images``.
    size
        Output side.

    Returns
    -------
    Tensor
        ``float32 (N, 3, size, size)``; differentiable with respect to ``images``.
    """
    _, _, height, width = images.shape
    left, top, right, bottom = square.bounds()
    pad_l, pad_t = max(0, -left), max(0, -top)
    pad_r, pad_b = max(0, right - width), max(0, bottom - height)
    region = images[
        :, :, max(0, top) : min(height, bottom), max(0, left) : min(width, right)
    ]
    if pad_l or pad_t or pad_r or pad_b:
        region = F.pad(region, (pad_l, pad_r, pad_t, pad_b), mode="replicate")
    return F.interpolate(region, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


__all__ = ["CENTER_SHIFT", "SQUARE_SCALE", "Square", "crop_square", "cut"]
