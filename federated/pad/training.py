"""Local training, consolidation and evaluation steps of incremental PAD (torch).

These are the pieces a Flower client runs (:mod:`veilface.federated.pad.flower`)
on the data of the domain it currently holds; nothing here keeps data of
an earlier domain.

Methods
-------
``"svlp"``
    Multi-Aspect Prompting + Selective EWC (:class:`~veilface.federated.pad.models.PromptedPAD`
    with prompts; penalty ``ewc_lambda * SelectiveEWC.penalty``).
``"naive"``
    Sequential fine-tuning of the same backbone and head without prompts or
    penalty: the baseline that forgets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from veilface.errors import InvalidArgument
from veilface.federated.metrics import auc, hter, pad_error_rates
from veilface.federated.pad.models import (
    CLIP_MEAN,
    CLIP_STD,
    AdaptedCNNPAD,
    CLIPVisionConfig,
    CNNConfig,
    PADModel,
    PromptedPAD,
    SelectiveEWC,
    compute_fisher,
    iter_batches,
)
from veilface.federated.pad.proxy import SPECIES

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "MODEL_CONFIGS",
    "DomainMetrics",
    "TrainSettings",
    "build_model",
    "domain_fisher",
    "evaluate_domain",
    "images_to_tensor",
    "train_domain",
]

Method = Literal["svlp", "naive"]
METHODS: tuple[str, ...] = ("svlp", "naive")
MODEL_CONFIGS: dict[str, CLIPVisionConfig] = {
    "tiny": CLIPVisionConfig.tiny(),
    "small": CLIPVisionConfig.small(),
    "kiosk": CLIPVisionConfig.kiosk(),
    "vit-b16": CLIPVisionConfig.vit_b16(),
}
THRESHOLD = 0.5
"""Decision threshold on P(live) for HTER and ACER (fixed, not tuned on test data)."""


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings.

    Attributes
    ----------
    epochs : int
        Passes over the local data per round.
    lr : float
        AdamW learning rate for the backbone and head.
    prompt_lr : float
        Learning rate for prompts.
    batch_size : int
    ewc_lambda : float
        Weight of the Selective EWC penalty (``svlp`` only).
    weight_decay : float
    augment : bool
        Mirror each batch's images left-right at random (the kiosk model's
        sites; the proxy benchmark trains without it).
    shared_lr_scale : float
        Prompted models only: the shared weights' learning rate is ``lr *
        shared_lr_scale`` from the second domain on (prompts and domain heads
        keep ``prompt_lr``), trading plasticity of the shared part for stability.
    """

    epochs: int = 1
    lr: float = 3e-4
    prompt_lr: float = 3e-3
    batch_size: int = 32
    ewc_lambda: float = 1000.0
    weight_decay: float = 0.0
    shared_lr_scale: float = 1.0
    augment: bool = False


def build_model(size: str, method: str, *, n_prompts: int = 4) -> PADModel:
    """A fresh model: ``size`` in :data:`MODEL_CONFIGS`, ``method`` in :data:`METHODS`."""
    if size not in MODEL_CONFIGS and size != "kiosk-cnn":
        sizes = [*sorted(MODEL_CONFIGS), "kiosk-cnn"]
        raise InvalidArgument(f"unknown model size {size!r}; use one of {sizes}")
    if method not in METHODS:
        raise InvalidArgument(f"unknown PAD method {method!r}; use one of {list(METHODS)}")
    if size == "kiosk-cnn":
        return AdaptedCNNPAD(CNNConfig(), adapters=method == "svlp")
    n = n_prompts if method == "svlp" else 0
    return PromptedPAD(MODEL_CONFIGS[size], n_universal=n, n_domain=n)


def images_to_tensor(images: npt.NDArray[np.uint8]) -> Tensor:
    """``(N, H, W, 3)`` uint8 RGB -> ``(N, 3, H, W)`` float32 CLIP-normalised."""
    if images.ndim != 4 or images.shape[3] != 3:
        raise InvalidArgument(f"images must be (N, H, W, 3) uint8, got {images.shape}")
    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def train_domain(
    model: PADModel,
    x: Tensor,
    y: Tensor,
    domain: int,
    settings: TrainSettings,
    *,
    ewc: SelectiveEWC | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train on one domain's local data (in place).

    Parameters
    ----------
    model : PromptedPAD
        Must already hold domain ``domain`` when prompted.
    x : Tensor
        ``(N, 3, H, W)`` float32 normalised images.
    y : Tensor
        ``(N,)`` float32, 1 = live.
    domain : int
    settings : TrainSettings
    ewc : SelectiveEWC, optional, keyword-only
        Applied with weight ``settings.ewc_lambda``.
    seed : int, keyword-only
        Shuffling seed.

    Returns
    -------
    dict[str, float]
        ``loss`` (mean BCE) and ``penalty`` (mean EWC term, 0 without EWC).
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InvalidArgument("training needs a non-empty x and y of equal length")
    prompted = model.prompted
    if prompted and not 0 <= domain < model.num_domains:
        raise InvalidArgument(f"domain {domain} not added to the model")
    model.set_trainable(domain if prompted else None)
    prompt_params = [
        p
        for n, p in model.named_parameters()
        if n.startswith(("domain_", "universal_")) and p.requires_grad
    ]
    other = [
        p
        for n, p in model.named_parameters()
        if not n.startswith(("domain_", "universal_")) and p.requires_grad
    ]
    shared_lr = settings.lr * (settings.shared_lr_scale if prompted and domain > 0 else 1.0)
    groups = [{"params": other, "lr": shared_lr}]
    if prompt_params:
        groups.append({"params": prompt_params, "lr": settings.prompt_lr})
    opt = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    pens: list[float] = []
    dom = domain if prompted else None
    for _ in range(settings.epochs):
        for idx in iter_batches(x.shape[0], settings.batch_size, gen):
            xb = x[idx]
            if settings.augment:
                flip = torch.rand(xb.shape[0], generator=gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.binary_cross_entropy_with_logits(model(xb, dom), y[idx])
            total = loss
            if ewc is not None and settings.ewc_lambda > 0:
                pen = ewc.penalty(model)
                total = loss + settings.ewc_lambda * pen
                pens.append(float(pen.detach()))
            opt.zero_grad()
            total.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return {
        "loss": float(np.mean(losses)) if losses else 0.0,
        "penalty": float(np.mean(pens)) if pens else 0.0,
    }


def domain_fisher(
    model: PADModel, x: Tensor, y: Tensor, domain: int
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Local Fisher of the shared weights and the domain-key sums on one domain.

    Returns
    -------
    fisher : dict[str, Tensor]
        See :func:`~veilface.federated.pad.models.compute_fisher`.
    key_s1, key_s2 : Tensor
        ``(key_dim,)`` sum of the query descriptor and ``(key_dim, key_dim)``
        sum of its outer products
        (:meth:`~veilface.federated.pad.models.PromptedPAD.domain_key_sums`).
    """
    dom = domain if model.prompted else None
    fisher = compute_fisher(model, x, y, dom)
    s1, s2 = model.domain_key_sums(x)
    return fisher, s1, s2


@dataclass(frozen=True)
class DomainMetrics:
    """PAD metrics on one domain's test data at :data:`THRESHOLD`."""

    hter: float
    acer: float
    apcer: float
    bpcer: float
    auc: float
    domain_accuracy: float
    n: int


def evaluate_domain(
    model: PADModel,
    x: Tensor,
    species: npt.NDArray[np.int8],
    domain: int,
) -> DomainMetrics:
    """HTER, ACER (worst species), AUC and domain-selection accuracy on one domain.

    Parameters
    ----------
    model : PromptedPAD
    x : Tensor
        ``(N, 3, H, W)`` test images of domain ``domain``.
    species : numpy.ndarray
        ``(N,)`` int8 codes into :data:`~veilface.federated.pad.proxy.SPECIES` (0 = live).
    domain : int
        The true domain (for the domain-selection accuracy of prompted models).
    """
    model.eval()
    scores = model.score(x).numpy().astype(np.float64)
    labels = (species == 0).astype(np.int64)
    names = [SPECIES[int(s)] for s in species]
    rates = pad_error_rates(scores, labels, THRESHOLD, attack_species=names)
    if model.prompted and model.num_domains:
        chosen = model.select_domains(x).numpy()
        dom_acc = float(np.mean(chosen == domain))
    else:
        dom_acc = float("nan")
    return DomainMetrics(
        hter=hter(scores, labels, THRESHOLD),
        acer=rates.acer,
        apcer=rates.apcer,
        bpcer=rates.bpcer,
        auc=auc(scores, labels),
        domain_accuracy=dom_acc,
        n=int(x.shape[0]),
    )
