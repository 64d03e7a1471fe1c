"""The change floor: a protected image must differ enough from its original where it protects.

Before a :class:`~veilface.client.protect.ProtectedImage` is created, the
result is compared with the original **inside each protected region** (not
over the whole image: a correctly cloaked small face in a large photo has a
whole-image SSIM near 1). The result is refused, with
:class:`InsufficientChange`, when in any region

- no pixel changed (L-infinity distance 0), or
- the SSIM to the original is at least :data:`MAX_REGION_SSIM` (0.995): the
  change is too small to protect anything,

and, for the adversarial protector, when the surrogate recognizers still see
the same face: the mean cosine similarity between their embeddings of the
original and of the protected face (at the face crops, no transformation) is
above ``1 -`` :data:`MIN_SURROGATE_SHIFT`.

For scale: the ``low`` cloak preset (SSIM floor 0.95 on the whole image) on a
250 x 250 LFW photo gives region SSIMs around 0.9 and a surrogate
similarity well below 0.9; de-identification changes the regions far more.
The floor catches results that are (nearly) the original: a wrong option, a
budget of a fraction of a grey level, a bug. It is a guard against mistakes,
not a measure of how well an image is protected.

SSIM here is the same single-scale SSIM as
:mod:`veilface.client.protect.image_quality` (11 x 11 Gaussian window,
sigma 1.5, K1 = 0.01, K2 = 0.03, mean over RGB channels), computed with
numpy so that de-identification does not need torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from veilface.client.face.backend import FaceBox
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

#: A region whose SSIM to the original is at least this is refused as unchanged.
MAX_REGION_SSIM: Final = 0.995
#: The surrogates' mean cosine similarity original/protected must be at most 1 - this.
MIN_SURROGATE_SHIFT: Final = 0.05
#: ``cloak`` refuses a smaller L-infinity budget (grey levels) outright: it cannot protect.
MIN_CLOAK_EPSILON: Final = 2.0

_WIN: Final = 11
_SIGMA: Final = 1.5
_C1: Final = (0.01 * 255.0) ** 2
_C2: Final = (0.03 * 255.0) ** 2


class InsufficientChange(InvalidArgument):
    """A protector's result is (nearly) its original: it would leave the device unprotected."""


@dataclass(frozen=True)
class RegionChange:
    """How much one protected region changed.

    Attributes
    ----------
    box
        The region, clipped to the image.
    linf
        Largest change of a channel value inside the region (0..255).
    ssim
        SSIM of the region to the original's (1.0 = identical).
    """

    box: FaceBox
    linf: int
    ssim: float


@dataclass(frozen=True)
class ChangeReport:
    """What :func:`require_change` measured (it raised if any figure was below the floor)."""

    regions: tuple[RegionChange, ...]
    surrogate_similarity: float | None

    @property
    def min_linf(self) -> int:
        """The smallest per-region L-infinity change."""
        return min(r.linf for r in self.regions)

    @property
    def max_ssim(self) -> float:
        """The largest per-region SSIM (the least changed region)."""
        return max(r.ssim for r in self.regions)


def _gauss() -> npt.NDArray[np.float64]:
    x = np.arange(_WIN, dtype=np.float64) - _WIN // 2
    g = np.exp(-(x**2) / (2 * _SIGMA**2))
    out: npt.NDArray[np.float64] = g / g.sum()
    return out


def _filter(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Separable Gaussian filter of ``(H, W, C)``, 'valid' part only (as pytorch_msssim)."""
    g = _gauss()
    rows = sliding_window_view(x, _WIN, axis=0) @ g  # (H - 10, W, C)
    out: npt.NDArray[np.float64] = sliding_window_view(rows, _WIN, axis=1) @ g
    return out


def ssim_np(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """SSIM of two ``uint8 (H, W, 3)`` images of at least 11 x 11 pixels."""
    if a.shape != b.shape or a.ndim != 3 or min(a.shape[:2]) < _WIN:
        raise ValueError(f"SSIM needs two images of the same shape, >= {_WIN} px: {a.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    mx, my = _filter(x), _filter(y)
    sxx = _filter(x * x) - mx * mx
    syy = _filter(y * y) - my * my
    sxy = _filter(x * y) - mx * my
    cs = (2 * sxy + _C2) / (sxx + syy + _C2)
    value = ((2 * mx * my + _C1) / (mx * mx + my * my + _C1)) * cs
    return float(value.mean(axis=(0, 1)).mean())


def _window(box: FaceBox, width: int, height: int) -> FaceBox:
    """``box`` clipped, grown (still inside the image) to at least the SSIM window."""

    def span(lo: int, hi: int, size: int) -> tuple[int, int]:
        lo, hi = max(0, lo), min(size, hi)
        short = _WIN - (hi - lo)
        if short > 0:
            lo = max(0, lo - (short + 1) // 2)
            hi = min(size, lo + _WIN)
            lo = max(0, hi - _WIN)
        return lo, hi

    left, right = span(box.left, box.right, width)
    top, bottom = span(box.top, box.bottom, height)
    return FaceBox(left, top, right, bottom)


def measure_change(
    original: npt.NDArray[np.uint8], result: npt.NDArray[np.uint8], regions: Sequence[FaceBox]
) -> tuple[RegionChange, ...]:
    """L-infinity and SSIM of ``result`` against ``original`` inside each region."""
    if original.shape != result.shape:
        raise InvalidArgument(
            f"the protected image is {result.shape}, its original {original.shape}: "
            "a protector must keep the size"
        )
    height, width = original.shape[:2]
    out = []
    for region in regions:
        box = _window(region, width, height)
        a = original[box.top : box.bottom, box.left : box.right]
        b = result[box.top : box.bottom, box.left : box.right]
        linf = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
        out.append(RegionChange(box=box, linf=linf, ssim=1.0 if linf == 0 else ssim_np(a, b)))
    return tuple(out)


def require_change(
    original: npt.NDArray[np.uint8],
    result: npt.NDArray[np.uint8],
    regions: Sequence[FaceBox],
    *,
    method: str,
    surrogate_similarity: float | None = None,
) -> ChangeReport:
    """Measure the change in every region and refuse a result below the floor.

    Parameters
    ----------
    original, result
        ``uint8 (H, W, 3)``: the image the protector was given and what it made.
    regions
        The protected regions (at least one).
    method
        The protection method (named in the error).
    surrogate_similarity
        For the adversarial protector: the surrogates' mean cosine similarity
        between the original and the protected face; ``None`` otherwise.

    Raises
    ------
    InsufficientChange
        A region did not change, or barely (SSIM at least
        :data:`MAX_REGION_SSIM`), or the surrogates did not move.
    """
    if not regions:
        raise InvalidArgument("a protected image must record at least one protected region")
    changes = measure_change(original, result, regions)
    for change in changes:
        b = change.box
        where = f"region ({b.left}, {b.top}, {b.right}, {b.bottom})"
        if change.linf == 0:
            logger.warning("refused a %s result that left a protected region unchanged", method)
            raise InsufficientChange(
                f"{method}: the protected {where} is unchanged (L-infinity 0): the image would "
                "leave the device unprotected; check the face boxes and the protection options"
                + _hint(method)
            )
        if change.ssim >= MAX_REGION_SSIM:
            logger.warning("refused a %s result that barely changed a protected region", method)
            raise InsufficientChange(
                f"{method}: the protected {where} barely changed (SSIM {_shown(change.ssim)} to the "
                f"original, at most {MAX_REGION_SSIM} allowed; largest change {change.linf} of "
                "255 grey levels): the image would leave the device (nearly) unprotected"
                + _hint(method)
            )
    if surrogate_similarity is not None and surrogate_similarity > 1.0 - MIN_SURROGATE_SHIFT:
        logger.warning("refused an adversarial result that did not move the surrogates")
        raise InsufficientChange(
            f"{method}: the surrogate recognizers still see the same face (cosine similarity "
            f"{surrogate_similarity:.4f} between original and protected face, at most "
            f"{1.0 - MIN_SURROGATE_SHIFT:.2f} allowed)" + _hint(method)
        )
    return ChangeReport(regions=changes, surrogate_similarity=surrogate_similarity)


def _shown(value: float) -> str:
    """An SSIM for a message: 4 decimals, never rounded up to a misleading 1.0000."""
    return f"{value:.4f}" if value < 0.99995 else "above 0.9999"


def _hint(method: str) -> str:
    if method == "adversarial":
        return "; use a preset ('low', 'medium', 'high'), a larger epsilon or more steps"
    return "; use a stronger strength or another method (e.g. 'mask')"


__all__ = [
    "MAX_REGION_SSIM",
    "MIN_CLOAK_EPSILON",
    "MIN_SURROGATE_SHIFT",
    "ChangeReport",
    "InsufficientChange",
    "RegionChange",
    "measure_change",
    "require_change",
    "ssim_np",
]
