"""Adversarial protection ("cloaking"): a small perturbation of the face that stops recognizers.

:func:`cloak` computes, on the device, a perturbation of the face region that
pushes the photo's face embedding away from the person's own (dodging)
under an ensemble of surrogate recognizers the project trained itself
(:mod:`veilface.client.protect.surrogates`), in the hope that it transfers to
recognizers it has never seen. The benchmark's judge, dlib's recognizer, is
never used here.

The optimisation (:mod:`veilface.client.protect.cloak_search`) changes the
face region in two ways at once, a smooth additive perturbation (coarse
grid, ``|delta| <= epsilon``) and a smooth warp of at most ``warp_px``
pixels, under a soft face mask (pixels outside every face region are
unchanged). Its objective, for every surrogate: move the embedding away
from the original's, push the intermediate feature maps away from the
original's, and pull them toward a composite target face far from the
owner (:mod:`veilface.client.protect.cloak_targets`), averaged over random
JPEG, blur, rescale and crop variants (expectation over transformation),
with an SSIM penalty; Adam steps. A hard SSIM floor is enforced at the end
on the 8-bit image: the change is scaled back (bisection) until SSIM to the
original is at least ``ssim_floor``. Presets: :mod:`~veilface.client.protect.cloak_config`.

The result is a :class:`~veilface.client.protect.ProtectedImage` with method
``"adversarial"`` whose params record the budget and what was achieved.
Inputs without a detectable face are refused (:class:`NoFaceFound`), never
passed through. See ``docs/protection.md`` for what this does and does not
stop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from veilface.client.face.backend import FaceBox
from veilface.client.face.image_io import ImageSource, load_image
from veilface.client.face.pipeline import FacePipeline
from veilface.client.protect.change_floor import MIN_CLOAK_EPSILON as MIN_EPSILON
from veilface.client.protect.cloak_config import PRESETS, CloakPreset, CloakPresetName
from veilface.client.protect.cloak_search import search
from veilface.client.protect.cloak_targets import target_pools
from veilface.client.protect.face_cover import faces_to_protect
from veilface.client.protect.face_crops import Square, crop_square
from veilface.client.protect.image_quality import psnr, ssim
from veilface.client.protect.protected_image import ParamValue, ProtectedImage, mint_protected
from veilface.client.protect.surrogate_shift import surrogate_similarity
from veilface.client.protect.surrogates import SurrogateEnsemble, default_ensemble
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

def face_mask(height: int, width: int, squares: Sequence[Square], *, scale: float) -> Tensor:
    """Soft mask of the face regions: 1 inside each scaled square, fading over its outer 15%.

    Returns
    -------
    Tensor
        ``float32 (1, 1, H, W)`` in ``[0, 1]``.
    """
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    mask = torch.zeros(height, width)
    for sq in squares:
        half = sq.side * scale / 2.0
        feather = 0.15 * half
        dx = (xs - sq.cx).abs() - (half - feather)
        dy = (ys - sq.cy).abs() - (half - feather)
        inside = torch.clamp(1.0 - dx.clamp(min=0) / feather, 0, 1) * torch.clamp(
            1.0 - dy.clamp(min=0) / feather, 0, 1
        )
        mask = torch.maximum(mask, inside)
    return mask[None, None]


def _region_box(square: Square, scale: float, width: int, height: int) -> FaceBox:
    half = square.side * scale / 2.0
    box = FaceBox(
        left=math.floor(square.cx - half),
        top=math.floor(square.cy - half),
        right=math.ceil(square.cx + half),
        bottom=math.ceil(square.cy + half),
    )
    return box.clipped(width, height)


def cloak(
    image: ImageSource,
    *,
    preset: CloakPresetName | str = "medium",
    epsilon: float | None = None,
    ssim_floor: float | None = None,
    steps: int | None = None,
    warp_px: float | None = None,
    faces: Literal["detect"] | Sequence[FaceBox] = "detect",
    ensemble: SurrogateEnsemble | None = None,
    pipeline: FacePipeline | None = None,
    seed: int = 0,
) -> ProtectedImage:
    """Protect every face of ``image`` with an adversarial perturbation.

    Parameters
    ----------
    image
        A path, encoded bytes, or a pixel array (anything
        :func:`veilface.client.face.load_image` accepts).
    preset
        ``"low"``, ``"medium"`` (default) or ``"high"``: see :data:`PRESETS`.
    epsilon
        Overrides the preset's L-infinity budget (0..255 levels, > 0).
    ssim_floor
        Overrides the preset's SSIM floor (0..1).
    steps
        Overrides the preset's number of optimisation steps.
    warp_px
        Overrides the preset's largest warp displacement (pixels, 0..4; 0
        turns the warp off, and then ``epsilon`` bounds every pixel's change).
    faces
        ``"detect"`` (dlib's HOG *detector*; the recognizer is never used) or
        the face boxes, in pixels of the loaded image.
    ensemble
        Surrogates to optimise against (default: the shipped ones).
    pipeline
        Face pipeline whose detector finds the faces (default: a dlib one).
    seed
        Seed of the random transformations (the result is deterministic for
        a given seed, image and thread count).

    Returns
    -------
    ProtectedImage
        ``uint8 (H, W, 3)``; method ``"adversarial"``; params record the
        preset, epsilon, SSIM floor, steps, achieved SSIM, PSNR, L-infinity,
        back-off scale, surrogate similarity before/after and seconds.

    Raises
    ------
    ImageDecodeError, ImageSizeError
        The image cannot be loaded.
    NoFaceFound
        ``faces="detect"`` and no face was found: the image is refused.
    InvalidArgument
        Unknown preset or out-of-range budget; bad ``faces``; or an SSIM floor
        so strict that no perturbation meets it (the image is refused rather
        than returned unprotected).
    SurrogateWeightsNotFound
        The surrogate weights are missing.
    """
    start = time.perf_counter()
    cfg = _resolve(preset, epsilon=epsilon, ssim_floor=ssim_floor, steps=steps, warp_px=warp_px)
    rgb = load_image(image)
    height, width = rgb.shape[:2]
    boxes = _find_faces(rgb, faces, pipeline)
    ens = ensemble if ensemble is not None else default_ensemble()
    squares = [crop_square(b) for b in boxes]
    regions = [_region_box(sq, cfg.mask_scale, width, height) for sq in squares]

    gen = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    mask = face_mask(height, width, squares, scale=cfg.mask_scale)
    pools = target_pools(ens) if cfg.target_weight else None
    found = search(x0, squares, mask, cfg, ens, gen, pools)
    sim_first, sim_last = found.similarity_first, found.similarity_last
    delta = found.adversarial - x0
    adv, scale, achieved = _enforce_floor(rgb, x0, delta, cfg.ssim_floor)
    seconds = time.perf_counter() - start
    linf = int(np.abs(adv.astype(np.int16) - rgb.astype(np.int16)).max())
    params: dict[str, ParamValue] = {
        "preset": str(preset),
        "epsilon": float(cfg.epsilon),
        "ssim_floor": float(cfg.ssim_floor),
        "steps": int(cfg.steps),
        "eot": int(cfg.eot),
        "grid": int(cfg.grid),
        "warp_px": float(cfg.warp_px),
        "target_weight": float(cfg.target_weight if pools is not None else 0.0),
        "optimizer": cfg.optimizer,
        "surrogates": ",".join(ens.archs),
        "ssim": round(achieved, 4),
        "psnr": round(psnr(adv, rgb), 2),
        "linf": linf,
        "backoff_scale": round(scale, 4),
        "surrogate_similarity_start": round(sim_first, 4),
        "surrogate_similarity_end": round(sim_last, 4),
        "seconds": round(seconds, 2),
    }
    logger.debug("cloaked %d face(s) in %.1f s: %s", len(boxes), seconds, params)
    # the change floor: the final 8-bit image must have moved the surrogates (and the regions)
    moved = surrogate_similarity(ens, rgb, adv, boxes)
    return mint_protected(
        rgb, adv, method="adversarial", params=params, faces=regions, surrogate_similarity=moved
    )


def _resolve(
    preset: str,
    *,
    epsilon: float | None,
    ssim_floor: float | None,
    steps: int | None,
    warp_px: float | None = None,
) -> CloakPreset:
    if preset not in PRESETS:
        raise InvalidArgument(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    cfg = PRESETS[cast(CloakPresetName, preset)]
    if epsilon is not None:
        if not (isinstance(epsilon, (int, float)) and 0 < epsilon <= 64):
            raise InvalidArgument(f"epsilon must be in (0, 64] grey levels, got {epsilon!r}")
        if epsilon < MIN_EPSILON:
            raise InvalidArgument(
                f"epsilon {epsilon!r} is below {MIN_EPSILON} grey levels: so small a change "
                "cannot protect a face, and the image would leave the device (nearly) as it "
                "was; use a preset ('low' is 16 grey levels) or a larger epsilon"
            )
        cfg = replace(cfg, epsilon=float(epsilon))
    if ssim_floor is not None:
        if not (isinstance(ssim_floor, (int, float)) and 0 <= ssim_floor < 1):
            raise InvalidArgument(f"ssim_floor must be in [0, 1), got {ssim_floor!r}")
        cfg = replace(cfg, ssim_floor=float(ssim_floor))
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise InvalidArgument(f"steps must be an int in 1..1000, got {steps!r}")
        cfg = replace(cfg, steps=steps)
    if warp_px is not None:
        if isinstance(warp_px, bool) or not isinstance(warp_px, (int, float)) or not (
            0 <= warp_px <= 4
        ):
            raise InvalidArgument(f"warp_px must be in [0, 4] pixels, got {warp_px!r}")
        cfg = replace(cfg, warp_px=float(warp_px))
    return cfg


def _find_faces(
    rgb: npt.NDArray[np.uint8],
    faces: Literal["detect"] | Sequence[FaceBox],
    pipeline: FacePipeline | None,
) -> list[FaceBox]:
    """The faces to cloak: found by dlib's HOG and CNN detectors, or caller boxes covering them.

    The coverage check uses each box's crop square (the soft mask is at
    least 0.6 inside it); see :mod:`veilface.client.protect.face_cover`.
    """
    height, width = rgb.shape[:2]
    boxes: list[FaceBox] = faces_to_protect(
        rgb,
        faces,
        pipeline,
        region=lambda box: FaceBox(*crop_square(box).bounds()).clipped(width, height),
        no_face=(
            "no face found in the image, so it cannot be protected; use a photo with a "
            "visible frontal face, or pass faces=[FaceBox(...)] if you know where it is"
        ),
    )
    return boxes


def _enforce_floor(
    rgb: npt.NDArray[np.uint8], x0: Tensor, delta: Tensor, floor: float
) -> tuple[npt.NDArray[np.uint8], float, float]:
    """The 8-bit image ``x0 + c * delta`` with the largest ``c`` in [0, 1] meeting the floor.

    Returns the image, ``c`` and its SSIM.
    """

    def render(c: float) -> npt.NDArray[np.uint8]:
        x = (x0 + c * delta).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        return np.asarray(np.rint(x * 255.0), dtype=np.uint8)

    adv = render(1.0)
    value = ssim(adv, rgb)
    if value >= floor:
        return adv, 1.0, value
    lo, hi = 0.0, 1.0
    best, best_value = rgb.copy(), 1.0
    for _ in range(8):
        mid = (lo + hi) / 2
        cand = render(mid)
        v = ssim(cand, rgb)
        if v >= floor:
            lo, best, best_value = mid, cand, v
        else:
            hi = mid
    if lo == 0.0:
        raise InvalidArgument(
            f"no perturbation keeps SSIM above the floor {floor}: the image would leave "
            "unprotected; lower ssim_floor (presets use 0.85-0.95)"
        )
    logger.debug("backed off the perturbation to %.3f of its size for SSIM %.4f", lo, best_value)
    return best, lo, best_value


__all__ = ["PRESETS", "CloakPreset", "CloakPresetName", "cloak", "face_mask"]
