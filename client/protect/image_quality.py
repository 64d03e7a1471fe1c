"""How much a protected image differs from its original: SSIM and PSNR.

SSIM is the standard single-scale SSIM of Wang et al. (2004): 11 x 11
Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, computed per RGB channel
and averaged (``pytorch_msssim.ssim``); it is also what the attack's SSIM
floor is enforced on.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
from pytorch_msssim import ssim as _ssim
from torch import Tensor


def ssim_tensor(a: Tensor, b: Tensor) -> Tensor:
    """Differentiable SSIM of ``float32 (N, 3, H, W)`` images in ``[0, 1]``; ``(N,)``."""
    out: Tensor = _ssim(a, b, data_range=1.0, size_average=False)
    return out


def _to_tensor(rgb: npt.NDArray[np.uint8]) -> Tensor:
    return torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0


def ssim(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """SSIM of two ``uint8 (H, W, 3)`` images (1.0 for identical images)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    with torch.no_grad():
        return float(ssim_tensor(_to_tensor(a), _to_tensor(b))[0])


def psnr(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """PSNR in dB of two ``uint8 (H, W, 3)`` images (``inf`` if identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


__all__ = ["psnr", "ssim", "ssim_tensor"]
