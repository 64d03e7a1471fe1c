"""Adversarial protection ("cloaking"): a small perturbation of the face that stops recognizers.

:func:`cloak` computes, on the device, a perturbation of the face region that
pushes the photo's face embedding away from the person's own (dodging)
under an ensemble of surrogate recognizers the project trained itself
(:mod:`veilface.client.protect.surrogates`), in the hope that it transfers to
recognizers it has never seen. The benchmark's judge, dlib's recognizer, is
never used here.

The optimisation (projected MI-FGSM, Dong et al. CVPR 2018):

- **objective**: for every surrogate, the cosine similarity between the
  protected face's embedding and the original's, plus a feature-level term
  that pushes the intermediate feature maps of the protected face away from
  the original's (normalised squared distance, as in feature-space attacks
  that transfer better than logit-level ones); minimised.
- **input diversity / EOT** (Xie et al. CVPR 2019; Athalye et al. ICML 2018):
  each step averages the gradient over ``eot`` random variants of the image:
  a differentiable JPEG round trip (quality 50-90, straight-through
  rounding), Gaussian blur, down-and-up rescaling, and a jittered, possibly
  mirrored face crop.
- **smoothness**: the perturbation is a coarse grid (``grid`` pixels per
  cell) upsampled bilinearly: it costs less SSIM, survives JPEG, and
  transfers better than a per-pixel one.
- **face region**: the perturbation is multiplied by a soft mask (the
  surrogate crop square of each detected face, feathered at the edges);
  pixels outside every mask are unchanged.
- **budget**: ``|delta| <= epsilon * mask`` (L-infinity, 0..255 levels), an
  SSIM penalty in the objective, and a hard SSIM floor enforced at the end
  on the 8-bit image: the perturbation is scaled back (bisection) until
  SSIM to the original is at least ``ssim_floor``.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from veilface.client.face.backend import FaceBox
from veilface.client.face.image_io import ImageSource, load_image
from veilface.client.face.pipeline import FacePipeline
from veilface.client.protect.change_floor import MIN_CLOAK_EPSILON as MIN_EPSILON
from veilface.client.protect.eot_transforms import gaussian_blur, jpeg, rescale
from veilface.client.protect.face_cover import faces_to_protect
from veilface.client.protect.face_crops import Square, crop_square, cut
from veilface.client.protect.image_quality import psnr, ssim, ssim_tensor
from veilface.client.protect.protected_image import ParamValue, ProtectedImage, mint_protected
from veilface.client.protect.surrogate_shift import surrogate_similarity
from veilface.client.protect.surrogates import SurrogateEnsemble, default_ensemble
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

CloakPresetName = Literal["low", "medium", "high"]


@dataclass(frozen=True)
class CloakPreset:
    """A protection budget and optimisation schedule.

    Attributes
    ----------
    epsilon
        L-infinity bound of the perturbation inside the face region, in
        0..255 grey levels.
    ssim_floor
        The protected image's SSIM to the original is at least this (hard).
    steps
        Optimisation steps.
    eot
        Random transformations averaged per step.
    feature_weight
        Weight of the intermediate-feature term relative to the embedding term.
    mask_scale
        The protected region is the surrogate crop square scaled by this.
    grid
        The perturbation is optimised on a grid this many times coarser than
        the pixels and upsampled bilinearly. Smooth perturbations cost less
        SSIM per unit of change, survive JPEG and resampling, and transfer
        better to unseen recognizers (measured in ``docs/protection.md``).
    ssim_margin
        The SSIM penalty starts this far above the floor, so that the final
        hard floor rarely has to scale the perturbation back.
    """

    epsilon: float
    ssim_floor: float
    steps: int
    eot: int = 4
    feature_weight: float = 2.0
    mask_scale: float = 1.1
    grid: int = 3
    ssim_margin: float = 0.01


#: The presets; ``"medium"`` is the default.
PRESETS: Final[Mapping[CloakPresetName, CloakPreset]] = {
    "low": CloakPreset(epsilon=16.0, ssim_floor=0.95, steps=30),
    "medium": CloakPreset(epsilon=32.0, ssim_floor=0.90, steps=40),
    "high": CloakPreset(epsilon=48.0, ssim_floor=0.85, steps=50),
}

_MOMENTUM: Final = 1.0
#: Stages whose feature maps the feature term pushes away (mid-level: they transfer best).
_FEATURE_STAGES: Final = slice(1, 4)
_SSIM_PENALTY: Final = 20.0


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


def _work_region(squares: Sequence[Square], width: int, height: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` around every square (with jitter room), on a 16-px grid."""
    lefts, tops, rights, bottoms = [], [], [], []
    for sq in squares:
        half = sq.side * 0.62
        lefts.append(sq.cx - half)
        tops.append(sq.cy - half)
        rights.append(sq.cx + half)
        bottoms.append(sq.cy + half)
    left = max(0, int(min(lefts)) // 16 * 16)
    top = max(0, int(min(tops)) // 16 * 16)
    right = min(width, math.ceil(max(rights) / 16) * 16)
    bottom = min(height, math.ceil(max(bottoms) / 16) * 16)
    return left, top, right, bottom


def _random_transform(x: Tensor, gen: torch.Generator) -> Tensor:
    """One random EOT variant of ``float32 (1, 3, H, W)``."""
    r = torch.rand(4, generator=gen).tolist()
    kind = int(r[0] * 4)
    if kind == 1:
        x = jpeg(x, quality=int(50 + 40 * r[1]))
    elif kind == 2:
        x = gaussian_blur(x, sigma=0.4 + 0.8 * r[1])
    elif kind == 3:
        x = rescale(x, factor=0.5 + 0.4 * r[1])
    if r[2] < 0.5:  # a second, milder re-encoding half the time
        x = jpeg(x, quality=int(70 + 25 * r[3]))
    return x


def _crops(
    images: Tensor, squares: Sequence[Square], gen: torch.Generator, jitter: bool, size: int
) -> Tensor:
    """Face crops of every image (``(K, 3, H, W)``) and square: ``(K * F, 3, size, size)``."""
    out = []
    for k in range(images.shape[0]):
        for sq in squares:
            if jitter:
                r = torch.rand(4, generator=gen).tolist()
                sq = sq.jittered(scale=0.94 + 0.12 * r[0], dx=(r[1] - 0.5) * 0.06,
                                 dy=(r[2] - 0.5) * 0.06)
                crop = cut(images[k : k + 1], sq, size)
                if r[3] < 0.5:
                    crop = crop.flip(-1)
            else:
                crop = cut(images[k : k + 1], sq, size)
            out.append(crop)
    return torch.cat(out)


def _objective(
    ensemble: SurrogateEnsemble,
    adv_crops: Mapping[int, Tensor],
    clean_crops: Mapping[int, Tensor],
    anchors: list[Tensor],
    feature_weight: float,
) -> tuple[Tensor, float]:
    """Loss to minimise and the mean cosine similarity to the original embeddings.

    ``adv_crops`` and ``clean_crops`` map a crop side to the crops at that side.
    """
    first = next(iter(adv_crops.values()))
    total = first.new_zeros(())
    sims = 0.0
    reps = first.shape[0] // anchors[0].shape[0]
    for model, anchor in zip(ensemble.models, anchors, strict=True):
        emb, maps = model.features(adv_crops[model.crop_size])
        with torch.no_grad():
            _, clean_maps = model.features(clean_crops[model.crop_size])
        cos = F.cosine_similarity(emb, anchor.repeat(reps, 1), dim=1).mean()
        feat = first.new_zeros(())
        stages = list(zip(maps, clean_maps, strict=True))[_FEATURE_STAGES]
        for a, c in stages:
            feat = feat + ((a - c) ** 2).mean() / (c**2).mean().clamp(min=1e-6)
        total = total + cos - feature_weight * feat / len(stages)
        sims += float(cos.detach())
    return total / len(ensemble.models), sims / len(ensemble.models)


def cloak(
    image: ImageSource,
    *,
    preset: CloakPresetName | str = "medium",
    epsilon: float | None = None,
    ssim_floor: float | None = None,
    steps: int | None = None,
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
    cfg = _resolve(preset, epsilon=epsilon, ssim_floor=ssim_floor, steps=steps)
    rgb = load_image(image)
    height, width = rgb.shape[:2]
    boxes = _find_faces(rgb, faces, pipeline)
    ens = ensemble if ensemble is not None else default_ensemble()
    squares = [crop_square(b) for b in boxes]
    regions = [_region_box(sq, cfg.mask_scale, width, height) for sq in squares]

    gen = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    mask = face_mask(height, width, squares, scale=cfg.mask_scale)
    eps = cfg.epsilon / 255.0
    alpha = 2.0 * eps / max(1, cfg.steps) * 1.25
    sizes = sorted({m.crop_size for m in ens.models})
    with torch.no_grad():
        anchors = [
            F.normalize(m(_crops(x0, squares, gen, False, m.crop_size))) for m in ens.models
        ]
    # the perturbation lives on a grid `cfg.grid` times coarser than the pixels and is
    # upsampled: smooth perturbations cost less SSIM and survive JPEG and resampling.
    # It starts from a small random point inside the box (helps leave the flat region).
    grid_shape = (1, 3, math.ceil(height / cfg.grid), math.ceil(width / cfg.grid))
    param = (torch.rand(grid_shape, generator=gen) * 2 - 1) * eps * 0.25

    def expand(p: Tensor) -> Tensor:
        if cfg.grid > 1:
            p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
        return p * mask

    momentum = torch.zeros_like(param)
    # work on the part of the image around the faces, on the 16-px grid JPEG uses
    left, top, right, bottom = _work_region(squares, width, height)
    x0r = x0[:, :, top:bottom, left:right]
    local = [Square(sq.cx - left, sq.cy - top, sq.side) for sq in squares]
    sim_first = sim_last = float("nan")
    for step in range(cfg.steps):
        param.requires_grad_(True)
        x = (x0 + expand(param)).clamp(0, 1)
        gen_clean = torch.Generator()
        gen_clean.set_state(gen.get_state())
        xr = x[:, :, top:bottom, left:right]
        adv_batch = torch.cat([_random_transform(xr, gen) for _ in range(cfg.eot)])
        with torch.no_grad():
            clean_variants = [_random_transform(x0r, gen_clean) for _ in range(cfg.eot)]
        crop_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        clean_batch = torch.cat(clean_variants)
        adv_crops, clean_crops = {}, {}
        for size in sizes:  # the same jitter for every crop side, adversarial and clean
            adv_crops[size] = _crops(
                adv_batch, local, torch.Generator().manual_seed(crop_seed), True, size
            )
            with torch.no_grad():
                clean_crops[size] = _crops(
                    clean_batch, local, torch.Generator().manual_seed(crop_seed), True, size
                )
        loss, sim = _objective(ens, adv_crops, clean_crops, anchors, cfg.feature_weight)
        penalty = F.relu(cfg.ssim_floor + cfg.ssim_margin - ssim_tensor(x, x0)).sum()
        loss = loss + _SSIM_PENALTY * penalty
        (grad,) = torch.autograd.grad(loss, param)
        if step == 0:
            sim_first = sim
        sim_last = sim
        with torch.no_grad():
            momentum = _MOMENTUM * momentum + grad / grad.abs().mean().clamp(min=1e-12)
            param = (param.detach() - alpha * momentum.sign()).clamp(-eps, eps)

    with torch.no_grad():
        delta = (x0 + expand(param)).clamp(0, 1) - x0
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
    preset: str, *, epsilon: float | None, ssim_floor: float | None, steps: int | None
) -> CloakPreset:
    if preset not in PRESETS:
        raise InvalidArgument(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    cfg = PRESETS[preset]  # type: ignore[index]
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
