"""Selective EWC and the Fisher information for incremental face PAD (after SVLP-IL).

The prompted ViT itself is :mod:`veilface.nn.pad_vit` (shared with the
client's liveness gate); its names are re-exported here.

Selective EWC (:class:`SelectiveEWC`)
    After each domain the diagonal (empirical) Fisher information of the
    shared weights (backbone, universal prompts, head) is computed on that
    domain's training data and accumulated over domains; the quadratic
    penalty ``lambda/2 * sum(mask * F * (theta - theta*)^2)`` anchors
    ``theta*`` (the weights after the last domain) and is restricted by
    ``mask`` to the top-``p`` fraction of weights by accumulated Fisher (one
    global threshold over all shared weights).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veilface.errors import CheckpointError, InvalidArgument
from veilface.nn.clip_weights import load_clip_visual
from veilface.nn.pad_cnn import AdaptedCNNPAD, CNNConfig
from veilface.nn.pad_vit import (
    CLIP_MEAN,
    CLIP_STD,
    KEY_RIDGE,
    CLIPVisionConfig,
    CLIPVisionTransformer,
    PromptedPAD,
)

logger = logging.getLogger(__name__)

PADModel = PromptedPAD | AdaptedCNNPAD
"""Either incremental-PAD architecture (the proxy benchmark's ViT, the kiosk's CNN)."""

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "KEY_RIDGE",
    "AdaptedCNNPAD",
    "CLIPVisionConfig",
    "CLIPVisionTransformer",
    "CNNConfig",
    "CheckpointError",
    "PADModel",
    "PromptedPAD",
    "SelectiveEWC",
    "compute_fisher",
    "load_clip_visual",
    "numpy_to_state",
]


def compute_fisher(
    model: PADModel,
    x: Tensor,
    y: Tensor,
    domain: int | None,
    *,
    batch_size: int = 8,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of the shared weights on one domain's data.

    ``F = mean over mini-batches of (d loss_batch / d theta)^2 * batch_size``
    with the binary cross-entropy of the true labels (mini-batches of
    ``batch_size`` approximate per-sample gradients).

    Parameters
    ----------
    model : PromptedPAD
    x : Tensor
        ``(N, 3, H, W)`` float32 normalised images.
    y : Tensor
        ``(N,)`` float32, 1 = live.
    domain : int or None
        Prompt set used in the forward pass (``None`` for the naive model).

    Returns
    -------
    dict[str, Tensor]
        Parameter name -> Fisher tensor of its shape (float32, >= 0).
    """
    names = [n for n, _ in model.shared_parameters()]
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    was_training = model.training
    model.eval()
    batches = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        loss = F.binary_cross_entropy_with_logits(model(xb, domain), yb)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                fisher[n] += g.detach() ** 2 * xb.shape[0]
        batches += 1
    model.train(was_training)
    return {n: f / max(batches, 1) for n, f in fisher.items()}


class SelectiveEWC:
    """Fisher penalty restricted to the top-``p`` most important shared weights.

    Parameters
    ----------
    fisher : Mapping[str, Tensor]
        Accumulated diagonal Fisher per parameter name.
    anchor : Mapping[str, Tensor]
        Weights ``theta*`` after the last consolidated domain (same names, shapes).
    top_p : float
        Fraction in ``(0, 1]`` of weights (over all names together) the penalty covers.
    """

    def __init__(
        self, fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor], *, top_p: float
    ) -> None:
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
        if set(fisher) != set(anchor):
            raise InvalidArgument("fisher and anchor must name the same parameters")
        for k in fisher:
            if fisher[k].shape != anchor[k].shape:
                raise InvalidArgument(f"fisher and anchor shapes differ for {k}")
        self.top_p = top_p
        self.fisher = {k: v.detach().float().clone() for k, v in fisher.items()}
        self.anchor = {k: v.detach().float().clone() for k, v in anchor.items()}
        flat = torch.cat([v.flatten() for v in self.fisher.values()]) if self.fisher else None
        if flat is None or flat.numel() == 0:
            self.mask: dict[str, Tensor] = {}
            return
        keep = max(1, round(top_p * flat.numel()))
        threshold = torch.topk(flat, keep, sorted=True).values[-1]
        self.mask = {k: (v >= threshold) & (v > 0) for k, v in self.fisher.items()}
        # scale so the masked Fisher averages 1: lambda does not depend on loss scale
        masked = torch.cat([v[self.mask[k]] for k, v in self.fisher.items()])
        if masked.numel() and float(masked.mean()) > 0:
            scale = float(masked.mean())
            self.fisher = {k: v / scale for k, v in self.fisher.items()}

    @property
    def num_masked(self) -> int:
        """Weights the penalty covers."""
        return int(sum(int(m.sum()) for m in self.mask.values()))

    def penalty(self, model: nn.Module) -> Tensor:
        """``0.5 * sum(mask * F * (theta - theta*)^2)`` (scalar; multiply by lambda)."""
        params = dict(model.named_parameters())
        total = torch.zeros(())
        for k, m in self.mask.items():
            p = params[k]
            total = total + (self.fisher[k] * m * (p - self.anchor[k]) ** 2).sum()
        return 0.5 * total

    def to_numpy(self) -> dict[str, npt.NDArray[np.float32]]:
        """``fisher.<name>`` and ``anchor.<name>`` arrays for an ArrayRecord (masked Fisher)."""
        out: dict[str, npt.NDArray[np.float32]] = {}
        for k in self.fisher:
            out[f"fisher.{k}"] = (self.fisher[k] * self.mask[k]).numpy().astype(np.float32)
            out[f"anchor.{k}"] = self.anchor[k].numpy().astype(np.float32)
        return out

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, npt.NDArray[np.float32]]) -> SelectiveEWC | None:
        """Rebuild from :meth:`to_numpy` output (Fisher already masked; ``None`` if empty)."""
        names = [k.removeprefix("fisher.") for k in arrays if k.startswith("fisher.")]
        if not names:
            return None
        fisher = {n: torch.from_numpy(np.array(arrays[f"fisher.{n}"])) for n in names}
        anchor = {n: torch.from_numpy(np.array(arrays[f"anchor.{n}"])) for n in names}
        ewc = cls.__new__(cls)
        ewc.top_p = float("nan")
        ewc.fisher = {k: v.float() for k, v in fisher.items()}
        ewc.anchor = {k: v.float() for k, v in anchor.items()}
        ewc.mask = {n: f > 0 for n, f in ewc.fisher.items()}
        return ewc


def accumulate_fisher(
    previous: Mapping[str, Tensor] | None, new: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Sum of the Fisher of all consolidated domains (``previous`` may be ``None``)."""
    if previous is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: previous[k] + new[k] for k in new}


def numpy_to_state(model: PADModel, arrays: Mapping[str, npt.NDArray[np.float32]]) -> None:
    """Load numpy arrays into ``model``, growing its domains first.

    Raises
    ------
    CheckpointError
        Keys or shapes are not those of this architecture.
    """
    n_dom = sum(1 for k in arrays if k.startswith("domain_prompts."))
    model.ensure_domains(n_dom)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = [
        k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"arrays do not fit {model.model_id}: a checkpoint from another model? "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {sorted(wrong)[:3]}"
        )
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
    )


def iter_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[Tensor]:
    """Shuffled index batches over ``range(n)``."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
