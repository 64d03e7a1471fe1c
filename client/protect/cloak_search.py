"""The optimisation behind :func:`veilface.client.protect.cloak`.

One perturbation of the face region, made of two parts optimised together:

- an **additive** change on a grid ``grid`` times coarser than the pixels
  (upsampled bilinearly, multiplied by the soft face mask, ``|.| <= epsilon``);
- a smooth **warp**: a displacement field on a 10-px grid (bicubic
  upsampling, masked, at most ``warp_px`` pixels) that moves the face's
  features a little, a change recognizers read as identity at a low SSIM
  cost (spatial attacks: Xiao et al., ICLR 2018).

The objective, for every surrogate: cosine similarity of the protected
face's embedding to the original's, minus ``feature_weight`` times how far
the intermediate maps moved from the original's, plus ``target_weight``
times how far they still are from a composite target face far from the
owner (:mod:`veilface.client.protect.cloak_targets`), plus a penalty when
SSIM falls below the floor + margin. Each step averages ``eot`` random
variants (JPEG, blur, rescale, jittered and mirrored crops). The additive
part takes Adam steps (or momentum sign steps, ``optimizer="mifgsm"``),
the warp momentum sign steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor

from veilface.client.protect.cloak_config import CloakPreset
from veilface.client.protect.cloak_targets import TargetPool
from veilface.client.protect.eot_transforms import gaussian_blur, jpeg, rescale
from veilface.client.protect.face_crops import Square, cut
from veilface.client.protect.image_quality import ssim_tensor
from veilface.client.protect.surrogates import SurrogateEnsemble

_MOMENTUM: Final = 1.0
#: Stages whose feature maps the feature terms use (mid-level: they transfer best).
_FEATURE_STAGES: Final = slice(1, 4)
_SSIM_PENALTY: Final = 20.0
#: Pixels per cell of the warp's displacement grid, and its sign step (in units of warp_px).
_WARP_CELL: Final = 10
_WARP_STEP: Final = 0.08


@dataclass(frozen=True)
class SearchResult:
    """The perturbed image before the SSIM floor, and how the surrogates moved."""

    adversarial: Tensor
    similarity_first: float
    similarity_last: float


def warp(x: Tensor, flow: Tensor, mask: Tensor, max_px: float) -> Tensor:
    """``x`` displaced by the smooth field ``flow`` (in ``[-1, 1]``, times ``max_px`` pixels)."""
    _, _, h, w = x.shape
    f = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=False) * mask * max_px
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx + f[0, 0] * 2 / w, gy + f[0, 1] * 2 / h], dim=-1)[None]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def work_region(squares: Sequence[Square], width: int, height: int) -> tuple[int, int, int, int]:
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


def random_transform(x: Tensor, gen: torch.Generator) -> Tensor:
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


def face_crops(
    images: Tensor, squares: Sequence[Square], gen: torch.Generator, jitter: bool, size: int
) -> Tensor:
    """Face crops of every image (``(K, 3, H, W)``) and square: ``(K * F, 3, size, size)``."""
    out = []
    for k in range(images.shape[0]):
        for sq in squares:
            if jitter:
                r = torch.rand(4, generator=gen).tolist()
                sq = sq.jittered(
                    scale=0.94 + 0.12 * r[0], dx=(r[1] - 0.5) * 0.06, dy=(r[2] - 0.5) * 0.06
                )
                crop = cut(images[k : k + 1], sq, size)
                if r[3] < 0.5:
                    crop = crop.flip(-1)
            else:
                crop = cut(images[k : k + 1], sq, size)
            out.append(crop)
    return torch.cat(out)


def _map_distance(a: Tensor, ref: Tensor) -> Tensor:
    return ((a - ref) ** 2).mean() / (ref**2).mean().clamp(min=1e-6)


def objective(
    ensemble: SurrogateEnsemble,
    adv_crops: Mapping[int, Tensor],
    clean_crops: Mapping[int, Tensor],
    anchors: Sequence[Tensor],
    cfg: CloakPreset,
    targets: Sequence[tuple[Tensor, ...]] | None,
) -> tuple[Tensor, float]:
    """Loss to minimise and the mean cosine similarity to the original embeddings.

    ``adv_crops`` and ``clean_crops`` map a crop side to the crops at that side;
    ``targets`` holds, per surrogate, the target's maps of the feature stages.
    """
    first = next(iter(adv_crops.values()))
    total = first.new_zeros(())
    sims = 0.0
    reps = first.shape[0] // anchors[0].shape[0]
    for i, (model, anchor) in enumerate(zip(ensemble.models, anchors, strict=True)):
        emb, maps = model.features(adv_crops[model.crop_size])
        with torch.no_grad():
            _, clean_maps = model.features(clean_crops[model.crop_size])
        cos = F.cosine_similarity(emb, anchor.repeat(reps, 1), dim=1).mean()
        stages = list(zip(maps, clean_maps, strict=True))[_FEATURE_STAGES]
        away = sum((_map_distance(a, c) for a, c in stages), first.new_zeros(()))
        total = total + cos - cfg.feature_weight * away / len(stages)
        if targets is not None and cfg.target_weight:
            toward = sum(
                (_map_distance(a, t) for a, t in zip(maps[_FEATURE_STAGES], targets[i],
                                                     strict=True)),
                first.new_zeros(()),
            )
            total = total + cfg.target_weight * toward / len(stages)
        sims += float(cos.detach())
    return total / len(ensemble.models), sims / len(ensemble.models)


class _Adam:
    """Adam on a tensor (bias-corrected), steps of ``lr`` times the scale given."""

    def __init__(self, like: Tensor) -> None:
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = 0

    def direction(self, grad: Tensor) -> Tensor:
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad**2
        m_hat = self.m / (1 - 0.9**self.t)
        v_hat = self.v / (1 - 0.999**self.t)
        return m_hat / (v_hat.sqrt() + 1e-12)


def search(
    x0: Tensor,
    squares: Sequence[Square],
    mask: Tensor,
    cfg: CloakPreset,
    ensemble: SurrogateEnsemble,
    gen: torch.Generator,
    pools: Mapping[str, TargetPool] | None,
) -> SearchResult:
    """Optimise the perturbation of ``x0`` (``float32 (1, 3, H, W)`` in ``[0, 1]``)."""
    height, width = x0.shape[-2:]
    eps = cfg.epsilon / 255.0
    alpha = 2.0 * eps / max(1, cfg.steps) * 1.25
    # Adam's steps start near lr * eps: short runs need larger ones to reach the budget
    # (the MI-FGSM step above covers the box 2.5 times over the run; so does this floor)
    lr = max(cfg.lr, 2.5 / max(1, cfg.steps))
    sizes = sorted({m.crop_size for m in ensemble.models})
    with torch.no_grad():
        anchors = [
            F.normalize(m(face_crops(x0, squares, gen, False, m.crop_size)))
            for m in ensemble.models
        ]
    targets = None
    if pools is not None and cfg.target_weight:
        targets = [pools[m.arch].farthest(a) for m, a in zip(ensemble.models, anchors, strict=True)]
    grid_shape = (1, 3, math.ceil(height / cfg.grid), math.ceil(width / cfg.grid))
    # a small random start inside the box helps leave the flat region
    param = (torch.rand(grid_shape, generator=gen) * 2 - 1) * eps * 0.25
    flow = torch.zeros(1, 2, math.ceil(height / _WARP_CELL), math.ceil(width / _WARP_CELL))

    def render(p: Tensor, fl: Tensor) -> Tensor:
        if cfg.grid > 1:
            p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
        base = warp(x0, fl, mask, cfg.warp_px) if cfg.warp_px else x0
        return (base + p * mask).clamp(0, 1)

    momentum = torch.zeros_like(param)
    flow_momentum = torch.zeros_like(flow)
    adam = _Adam(param)
    # work on the part of the image around the faces, on the 16-px grid JPEG uses
    left, top, right, bottom = work_region(squares, width, height)
    x0r = x0[:, :, top:bottom, left:right]
    local = [Square(sq.cx - left, sq.cy - top, sq.side) for sq in squares]
    sim_first = sim_last = float("nan")
    for step in range(cfg.steps):
        param.requires_grad_(True)
        flow.requires_grad_(bool(cfg.warp_px))
        x = render(param, flow)
        gen_clean = torch.Generator()
        gen_clean.set_state(gen.get_state())
        xr = x[:, :, top:bottom, left:right]
        adv_batch = torch.cat([random_transform(xr, gen) for _ in range(cfg.eot)])
        with torch.no_grad():
            clean_batch = torch.cat([random_transform(x0r, gen_clean) for _ in range(cfg.eot)])
        crop_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        adv_crops, clean_crops = {}, {}
        for size in sizes:  # the same jitter for every crop side, adversarial and clean
            adv_crops[size] = face_crops(
                adv_batch, local, torch.Generator().manual_seed(crop_seed), True, size
            )
            with torch.no_grad():
                clean_crops[size] = face_crops(
                    clean_batch, local, torch.Generator().manual_seed(crop_seed), True, size
                )
        loss, sim = objective(ensemble, adv_crops, clean_crops, anchors, cfg, targets)
        penalty = F.relu(cfg.ssim_floor + cfg.ssim_margin - ssim_tensor(x, x0)).sum()
        loss = loss + _SSIM_PENALTY * penalty
        if cfg.warp_px:
            grad, flow_grad = torch.autograd.grad(loss, [param, flow])
        else:
            (grad,) = torch.autograd.grad(loss, param)
            flow_grad = None
        if step == 0:
            sim_first = sim
        sim_last = sim
        with torch.no_grad():
            if cfg.optimizer == "adam":
                param = param.detach() - lr * eps * adam.direction(grad)
            else:
                momentum = _MOMENTUM * momentum + grad / grad.abs().mean().clamp(min=1e-12)
                param = param.detach() - alpha * momentum.sign()
            param = param.clamp(-eps, eps)
            if flow_grad is not None:
                flow_momentum = flow_momentum + flow_grad / flow_grad.abs().mean().clamp(
                    min=1e-12
                )
                flow = (flow.detach() - _WARP_STEP * flow_momentum.sign()).clamp(-1, 1)
    with torch.no_grad():
        final = render(param.detach(), flow.detach())
    return SearchResult(final, sim_first, sim_last)


__all__ = ["SearchResult", "face_crops", "objective", "random_transform", "search", "warp",
           "work_region"]
