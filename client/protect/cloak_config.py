"""The budgets and schedules of :func:`veilface.client.protect.cloak` (its presets)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

CloakPresetName = Literal["low", "medium", "high"]
Optimizer = Literal["adam", "mifgsm"]


@dataclass(frozen=True)
class CloakPreset:
    """A protection budget and optimisation schedule.

    Attributes
    ----------
    epsilon
        L-infinity bound of the additive perturbation inside the face region,
        in 0..255 grey levels.
    ssim_floor
        The protected image's SSIM to the original is at least this (hard).
    steps
        Optimisation steps.
    eot
        Random transformations averaged per step.
    feature_weight
        Weight of the term pushing the intermediate feature maps away from
        the original's, relative to the embedding term.
    target_weight
        Weight of the term pulling the intermediate feature maps toward a
        target face far from the owner (a shipped composite face, see
        :mod:`veilface.client.protect.cloak_targets`); 0 turns it off.
    warp_px
        Largest displacement, in pixels, of a smooth geometric warp of the
        face optimised together with the additive perturbation (0: none).
        Moving features by a pixel or two changes identity cues at a low
        SSIM cost.
    optimizer
        ``"adam"`` (default: steps follow the gradient's size, so the
        change goes where it buys the most per unit of SSIM) or
        ``"mifgsm"`` (momentum sign steps, the earlier default).
    lr
        Adam's step, as a fraction of ``epsilon``.
    mask_scale
        The protected region is the surrogate crop square scaled by this.
    grid
        The perturbation is optimised on a grid this many times coarser than
        the pixels and upsampled bilinearly. Smooth perturbations cost less
        SSIM per unit of change, survive JPEG and resampling, and transfer
        better to unseen recognizers (measured in ``docs/protection.md``).
    ssim_margin
        The SSIM penalty starts this far above the floor.
    """

    epsilon: float
    ssim_floor: float
    steps: int
    eot: int = 4
    feature_weight: float = 2.0
    target_weight: float = 2.0
    warp_px: float = 2.0
    optimizer: Optimizer = "adam"
    lr: float = 0.1
    mask_scale: float = 1.1
    grid: int = 3
    ssim_margin: float = 0.0


#: The presets; ``"medium"`` is the default (the only one tuned, on validation people).
PRESETS: Final[Mapping[CloakPresetName, CloakPreset]] = {
    "low": CloakPreset(epsilon=16.0, ssim_floor=0.95, steps=30, warp_px=1.0),
    "medium": CloakPreset(epsilon=32.0, ssim_floor=0.90, steps=40),
    "high": CloakPreset(epsilon=48.0, ssim_floor=0.85, steps=50, warp_px=3.0),
}

__all__ = ["PRESETS", "CloakPreset", "CloakPresetName", "Optimizer"]
