"""Local VI-ReID training and evaluation in torch (what one site runs; no Flower here).

The losses follow L2RW (Jiang et al., arXiv 2503.12232) in spirit:

- identity cross-entropy on the BN-neck embedding through a classifier
  (local to the site, or global for the plain-FedAvg baseline);
- batch-hard triplet loss (soft margin) on the GeM features;
- a prototype loss once global identity prototypes exist: the L2-normalised
  embedding of a sample is pulled to its identity's global prototype
  (MSE + cosine, as L2RW's ``Prototype_loss``), plus a prototype-contrastive
  cross-entropy over all global prototypes. Global prototypes average the
  per-identity means of *every* site that saw the identity, so a site with
  only infrared cameras is pulled toward where visible sites put the same
  person: this is what aligns the modalities under camera isolation.

Images are ``(N, S, S, 3)`` uint8 arrays (see
:mod:`veilface.federated.vireid.proxy`); they are normalised with the
ImageNet mean/std here.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veilface.errors import InvalidArgument
from veilface.federated.metrics import RetrievalMetrics, evaluate_retrieval
from veilface.federated.vireid.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IdentityClassifier,
    TwoStreamReID,
)
from veilface.federated.vireid.proxy import ReIDArrays, proxy_query_gallery

logger = logging.getLogger(__name__)

__all__ = [
    "LocalTrainConfig",
    "Prototypes",
    "batch_hard_triplet",
    "compute_prototypes",
    "embed",
    "evaluate_model",
    "local_accuracy",
    "local_train",
    "make_optimizer",
    "modality_bn_copy",
]


@dataclass(frozen=True)
class LocalTrainConfig:
    """Hyper-parameters of one local training pass.

    Attributes
    ----------
    epochs : float
        Passes over the local data; a fraction (e.g. 0.5) trains on that
        share of an epoch's batches, so short rounds can split an epoch.
    batch_ids, batch_instances : int
        P x K identity sampling: P identities, K images each per batch.
    lr : float
        Adam learning rate for the classifier and neck (a fresh optimiser
        each call, as each federated round starts anew); the stems and
        backbone use ``lr * backbone_lr_mult``.
    backbone_lr_mult : float
    weight_decay : float
    proto_weight : float
        Weight of the prototype loss (0 disables it).
    proto_temperature : float
        Temperature of the prototype-contrastive cross-entropy.
    triplet_weight : float
    seed : int
    """

    epochs: float = 1.0
    batch_ids: int = 8
    batch_instances: int = 4
    lr: float = 1e-3
    backbone_lr_mult: float = 0.35
    weight_decay: float = 5e-4
    proto_weight: float = 0.0
    proto_temperature: float = 0.1
    triplet_weight: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Prototypes:
    """Per-identity mean embeddings.

    Attributes
    ----------
    pids : numpy.ndarray
        ``(n,)`` int64 person ids.
    vectors : numpy.ndarray
        ``(n, D)`` float32, means of L2-normalised embeddings (norm <= 1;
        the server re-normalises the global ones).
    counts : numpy.ndarray
        ``(n,)`` float32, images behind each mean.
    """

    pids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    counts: npt.NDArray[np.float32]


def _to_tensor(images: npt.NDArray[np.uint8]) -> Tensor:
    """``(N, S, S, 3)`` uint8 -> ``(N, 3, S, S)`` float32, ImageNet-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flip and a random crop from a 4-px reflect pad, per image."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    pad = max(2, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def _pk_batches(
    labels: npt.NDArray[np.int64], p: int, k: int, rng: np.random.Generator
) -> list[npt.NDArray[np.int64]]:
    """One epoch of P x K batches (indices); identities with < K images are sampled with replacement."""
    by_id: dict[int, npt.NDArray[np.int64]] = {}
    for lab in np.unique(labels):
        by_id[int(lab)] = np.flatnonzero(labels == lab)
    ids = np.array(sorted(by_id), dtype=np.int64)
    batches: list[npt.NDArray[np.int64]] = []
    # as many batches as it takes to show each image about once
    n_batches = max(1, int(np.ceil(labels.size / (p * k))))
    for _ in range(n_batches):
        chosen = rng.choice(ids, size=min(p, ids.size), replace=False)
        idx = [rng.choice(by_id[int(c)], size=k, replace=by_id[int(c)].size < k) for c in chosen]
        batches.append(np.concatenate(idx))
    return batches


def _epoch_batches(
    labels: npt.NDArray[np.int64], config: LocalTrainConfig, rng: np.random.Generator
) -> list[list[npt.NDArray[np.int64]]]:
    """``config.epochs`` worth of P x K batches, one list per (possibly partial) epoch."""
    whole = int(config.epochs)
    part = config.epochs - whole
    out = [
        _pk_batches(labels, config.batch_ids, config.batch_instances, rng) for _ in range(whole)
    ]
    if part > 1e-9:
        batches = _pk_batches(labels, config.batch_ids, config.batch_instances, rng)
        out.append(batches[: max(1, round(len(batches) * part))])
    return out


def batch_hard_triplet(features: Tensor, labels: Tensor) -> Tensor:
    """Soft-margin batch-hard triplet loss (Hermans et al. 2017) on L2-normalised features.

    Parameters
    ----------
    features : torch.Tensor
        ``(B, D)`` float32.
    labels : torch.Tensor
        ``(B,)`` int64.

    Returns
    -------
    torch.Tensor
        Scalar; 0 when the batch has no positive or no negative pair.
    """
    f = F.normalize(features, dim=1)
    dist = (2 - 2 * f @ f.t()).clamp_min(1e-12).sqrt()
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    if not bool(pos.any()) or not bool((~same).any()):
        return features.sum() * 0.0
    hardest_pos = (dist * pos).max(dim=1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
    valid = pos.any(dim=1) & torch.isfinite(hardest_neg)
    return F.softplus(hardest_pos[valid] - hardest_neg[valid]).mean()


def _prototype_loss(
    embedding: Tensor, pids: Tensor, protos: Prototypes, temperature: float
) -> Tensor:
    """L2RW prototype pull (MSE + cosine) plus a prototype-contrastive cross-entropy."""
    table = {int(p): i for i, p in enumerate(protos.pids.tolist())}
    rows = torch.tensor([table.get(int(p), -1) for p in pids.tolist()], dtype=torch.int64)
    has = rows >= 0
    if not bool(has.any()):
        return embedding.sum() * 0.0
    z = F.normalize(embedding[has], dim=1)
    bank = torch.from_numpy(protos.vectors)
    target = bank[rows[has]]
    pull = F.mse_loss(z, target, reduction="none").sum(dim=1).mean() + (
        1 - (z * target).sum(dim=1)
    ).mean()
    logits = z @ bank.t() / temperature
    contrast = F.cross_entropy(logits, rows[has])
    return pull + contrast


def make_optimizer(
    model: TwoStreamReID, classifier: IdentityClassifier, config: LocalTrainConfig
) -> torch.optim.Adam:
    """Adam over the encoder (stems and backbone at ``lr * backbone_lr_mult``), GeM and
    BN-neck, and the classifier (at ``lr``), with ``config.weight_decay``."""
    head_params = list(model.neck.parameters()) + list(model.pool.parameters())
    head_ids = {id(p) for p in head_params}
    base = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    return torch.optim.Adam(
        [
            {"params": base, "lr": config.lr * config.backbone_lr_mult},
            {"params": [p for p in head_params if p.requires_grad], "lr": config.lr},
            {"params": list(classifier.parameters()), "lr": config.lr},
        ],
        weight_decay=config.weight_decay,
    )


def local_train(
    model: TwoStreamReID,
    classifier: IdentityClassifier,
    data: ReIDArrays,
    labels: npt.NDArray[np.int64],
    config: LocalTrainConfig,
    *,
    prototypes: Prototypes | None = None,
    round_seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Train ``model`` and ``classifier`` in place on one site's data.

    Parameters
    ----------
    model : TwoStreamReID
    classifier : IdentityClassifier
        Outputs one logit per class of ``labels``.
    data : ReIDArrays
        The site's images; ``data.modalities`` chooses the stem per image.
    labels : numpy.ndarray
        ``(N,)`` int64 class indices for the classifier, ``0 .. num_ids-1``.
    config : LocalTrainConfig
    prototypes : Prototypes, optional, keyword-only
        Global identity prototypes keyed by ``data.pids``; used when
        ``config.proto_weight > 0``.
    round_seed : int, keyword-only
        Mixed into the sampling seed so rounds differ.
    optimizer : torch.optim.Optimizer, optional, keyword-only
        Reused across calls when given (centralized training keeps one Adam
        state over all its epochs); default a fresh :func:`make_optimizer`,
        as each federated round starts anew.

    Returns
    -------
    dict of str to float
        ``loss``, ``id_loss``, ``triplet_loss``, ``proto_loss`` (epoch means)
        and ``accuracy`` (training classification accuracy).
    """
    if len(data) == 0:
        raise InvalidArgument("this site holds no training images")
    if not config.epochs > 0:
        raise InvalidArgument(f"local epochs must be > 0, got {config.epochs}")
    if labels.shape != (len(data),):
        raise InvalidArgument(f"labels must be ({len(data)},), got {labels.shape}")
    rng = np.random.default_rng(config.seed * 1000 + round_seed)
    gen = torch.Generator().manual_seed(config.seed * 1000 + round_seed)
    opt = optimizer if optimizer is not None else make_optimizer(model, classifier, config)
    x_all = _to_tensor(data.images)
    mods = torch.from_numpy(data.modalities)
    pids_all = torch.from_numpy(data.pids)
    y_all = torch.from_numpy(labels)
    use_protos = prototypes is not None and config.proto_weight > 0 and prototypes.pids.size > 0
    model.train()
    classifier.train()
    sums = {"loss": 0.0, "id_loss": 0.0, "triplet_loss": 0.0, "proto_loss": 0.0}
    correct = seen = steps = 0
    for batches in _epoch_batches(labels, config, rng):
        for idx in batches:
            it = torch.from_numpy(idx)
            x = _augment(x_all[it], gen)
            y = y_all[it]
            out = model(x, mods[it])
            logits = classifier(out.embedding)
            id_loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            tri = batch_hard_triplet(out.features, y)
            loss = id_loss + config.triplet_weight * tri
            proto = torch.zeros(())
            if use_protos:
                assert prototypes is not None
                proto = _prototype_loss(
                    out.embedding, pids_all[it], prototypes, config.proto_temperature
                )
                loss = loss + config.proto_weight * proto
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sums["loss"] += float(loss.detach())
            sums["id_loss"] += float(id_loss.detach())
            sums["triplet_loss"] += float(tri.detach())
            sums["proto_loss"] += float(proto.detach())
            correct += int((logits.argmax(1) == y).sum())
            seen += int(y.numel())
            steps += 1
    out_metrics = {k: v / max(steps, 1) for k, v in sums.items()}
    out_metrics["accuracy"] = correct / max(seen, 1)
    return out_metrics


@torch.no_grad()
def embed(model: TwoStreamReID, data: ReIDArrays, *, batch_size: int = 128) -> npt.NDArray[np.float32]:
    """L2-normalised BN-neck embeddings, ``(N, D)`` float32, in eval mode."""
    model.eval()
    chunks: list[Tensor] = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        x = _to_tensor(data.images[sl])
        out = model(x, torch.from_numpy(data.modalities[sl]))
        chunks.append(F.normalize(out.embedding, dim=1))
    if not chunks:
        return np.zeros((0, model.feature_dim), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


@torch.no_grad()
def local_accuracy(
    model: TwoStreamReID,
    classifier: IdentityClassifier,
    data: ReIDArrays,
    labels: npt.NDArray[np.int64],
    *,
    batch_size: int = 128,
) -> float:
    """Fraction of ``data`` whose classifier argmax equals ``labels`` (eval mode)."""
    model.eval()
    classifier.eval()
    hits = 0
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        out = model(_to_tensor(data.images[sl]), torch.from_numpy(data.modalities[sl]))
        hits += int((classifier(out.embedding).argmax(1).numpy() == labels[sl]).sum())
    return hits / max(len(data), 1)


def compute_prototypes(
    model: TwoStreamReID, data: ReIDArrays, *, modality_bn: bool = True
) -> Prototypes:
    """Per-identity means of the site's L2-normalised embeddings (what the site shares).

    With ``modality_bn`` (default) each modality's images are embedded with
    BatchNorm statistics re-estimated on that modality's local images
    (:func:`modality_bn_copy`), as the test-time evaluation does.
    """
    if modality_bn:
        emb = np.zeros((len(data), model.feature_dim), dtype=np.float32)
        for m in np.unique(data.modalities):
            rows = data.modalities == m
            part = data.subset(rows)
            emb[rows] = embed(modality_bn_copy(model, part), part)
    else:
        emb = embed(model, data)
    pids = np.unique(data.pids)
    vecs = np.stack([emb[data.pids == p].mean(axis=0) for p in pids]).astype(np.float32)
    counts = np.array([(data.pids == p).sum() for p in pids], dtype=np.float32)
    return Prototypes(pids.astype(np.int64), vecs, counts)


@torch.no_grad()
def modality_bn_copy(
    model: TwoStreamReID, data: ReIDArrays, *, batch_size: int = 64
) -> TwoStreamReID:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``data`` (AdaBN).

    Under camera isolation every site trains the shared backbone's
    BatchNorm layers on one modality, and the averaged running statistics
    fit neither modality at test time. Re-estimating them on the (unlabelled)
    images of one modality, e.g. all queries, then all gallery images, with
    the learned weights unchanged, removes that mismatch (Li et al. 2016,
    "Revisiting Batch Normalization for Practical Domain Adaptation").

    Parameters
    ----------
    model : TwoStreamReID
        Left unchanged.
    data : ReIDArrays
        Images of one modality (labels are not used).
    batch_size : int, keyword-only

    Returns
    -------
    TwoStreamReID
        The copy, in eval mode.
    """
    clone = copy.deepcopy(model)
    for mod in clone.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over all batches
    clone.train()
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        if data.images[sl].shape[0] < 2:
            continue
        clone(_to_tensor(data.images[sl]), torch.from_numpy(data.modalities[sl]))
    clone.eval()
    return clone


def evaluate_model(
    model: TwoStreamReID, test: ReIDArrays, *, modality_bn: bool = True
) -> RetrievalMetrics:
    """Infrared-to-visible retrieval on the proxy test split (cosine distance).

    Parameters
    ----------
    model : TwoStreamReID
        Not modified.
    test : ReIDArrays
        Test identities; query = infrared, gallery = visible.
    modality_bn : bool, keyword-only
        Re-estimate BatchNorm statistics on the query set and on the gallery
        set separately (:func:`modality_bn_copy`; unlabelled, transductive)
        before embedding each. Default True; every method in the benchmark is
        evaluated the same way.
    """
    query, gallery = proxy_query_gallery(test)
    if modality_bn:
        q = embed(modality_bn_copy(model, query), query)
        g = embed(modality_bn_copy(model, gallery), gallery)
    else:
        q = embed(model, query)
        g = embed(model, gallery)
    dist = 1.0 - q @ g.T
    return evaluate_retrieval(
        dist, query.pids, gallery.pids, query.camids, gallery.camids, protocol="standard"
    )
