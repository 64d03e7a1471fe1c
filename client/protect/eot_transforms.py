"""Differentiable image transformations for expectation over transformation (EOT).

The attack averages its gradient over random re-encodings of the protected
photo, so the perturbation survives what happens to photos after upload:

- :func:`jpeg` — JPEG compression in torch: YCbCr, 4:2:0 chroma subsampling,
  8 x 8 DCT, quantisation with the libjpeg tables scaled for a quality, and
  the inverse. Rounding uses the straight-through estimator (forward: true
  rounding; backward: identity), as in BPDA (Athalye et al., ICML 2018).
- :func:`gaussian_blur` — depthwise Gaussian convolution.
- :func:`rescale` — anti-aliased downscale and upscale back.

All take and return ``float32 (N, 3, H, W)`` in ``[0, 1]``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA_Q = [
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip
_CHROMA_Q = [
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
]  # fmt: skip


def _ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


@lru_cache(maxsize=1)
def _dct_matrix() -> Tensor:
    k = torch.arange(8, dtype=torch.float32)
    mat = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16)
    mat[0] *= 1 / math.sqrt(2)
    return mat * 0.5


@lru_cache(maxsize=16)
def _qtables(quality: int) -> tuple[Tensor, Tensor]:
    quality = min(100, max(1, quality))
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    out = []
    for table in (_LUMA_Q, _CHROMA_Q):
        t = torch.tensor(table, dtype=torch.float32).view(8, 8)
        out.append(torch.clamp(torch.floor((t * scale + 50) / 100), 1, 255))
    return out[0], out[1]


def _blockwise(x: Tensor, q: Tensor) -> Tensor:
    """DCT, quantise (straight-through), dequantise and inverse DCT of ``(N, H, W)`` planes."""
    n, h, w = x.shape
    d = _dct_matrix()
    blocks = x.view(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = d @ blocks @ d.T
    coef = _ste_round(coef / q) * q
    back = d.T @ coef @ d
    return back.permute(0, 1, 3, 2, 4).reshape(n, h, w)


def jpeg(x: Tensor, quality: int) -> Tensor:
    """Differentiable JPEG round trip at ``quality`` (1..100), 4:2:0 chroma.

    Parameters
    ----------
    x
        ``float32 (N, 3, H, W)`` RGB in ``[0, 1]``.

    Returns
    -------
    Tensor
        Same shape; what a decoder would show, before the final 8-bit rounding.
    """
    n, _, h, w = x.shape
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    rgb = x * 255.0
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128.0
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    qy, qc = _qtables(quality)
    y = _blockwise(y, qy)
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
    c2 = chroma.shape
    chroma = _blockwise(chroma.reshape(n * 2, c2[2], c2[3]), qc).view(n, 2, c2[2], c2[3])
    chroma = F.interpolate(chroma, scale_factor=2.0, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0], chroma[:, 1]
    y = y + 128.0
    out = torch.stack(
        [y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1
    ) / 255.0
    return out[:, :, :h, :w].clamp(0.0, 1.0)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Depthwise Gaussian blur with standard deviation ``sigma`` px (reflect padding)."""
    radius = max(1, math.ceil(2.5 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = g / g.sum()
    xp = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    xp = F.conv2d(xp, g.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(xp, g.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def rescale(x: Tensor, factor: float) -> Tensor:
    """Anti-aliased resize by ``factor`` (< 1) and back to the original size."""
    _, _, h, w = x.shape
    small = (max(8, round(h * factor)), max(8, round(w * factor)))
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


__all__ = ["gaussian_blur", "jpeg", "rescale"]
