"""Train the surrogate recognizers on LFW people (identity classification, CosFace margin).

What happens, in order:

1. :func:`list_people` reads ``<data>/<person>/<image>`` and keeps people with
   at least two images. People for whom :func:`is_held_out` is true (a fixed
   quarter of all names, by hash) are *never* trained on: the protection
   benchmark uses them, so its people are unseen by the surrogates.
2. :func:`build_crops` finds each training face with dlib's HOG *detector*
   (only the detector: dlib's recognizer is the benchmark's independent judge
   and is never used here) and cuts a context square around it
   (:data:`CONTEXT_SCALE` times the canonical crop square) at
   :data:`CONTEXT_SIZE` px. Crops are cached as ``.npz``.
3. :func:`train_surrogate` trains one architecture with SGD and a CosFace
   head (normalised weights; scale 16 and margin 0.15 by default, smaller than
   the paper's 64 / 0.35 because a short CPU run converges better so; Wang et al. 2018) on
   randomly flipped, shifted, scaled and colour-jittered crops.
4. :func:`evaluate` measures verification on the held-out people (ROC AUC,
   and the cosine threshold at 1% false accepts over impostor pairs), which
   the benchmark uses to judge "the surrogates still match".

Weights are saved as float16 state dicts (``<arch>.pt``) beside a
``manifest.json`` that records the data, the held-out rule, the epochs and
the evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veilface.client.face.image_io import load_image
from veilface.client.protect.face_crops import crop_square, cut
from veilface.client.protect.surrogate_models import (
    CROP_SIZE,
    DEFAULT_ARCHS,
    EMBEDDING_DIM,
    MNV2_CROP_SIZE,
    Arch,
    ImageNetMobileNet,
    Surrogate,
    build_surrogate,
    load_imagenet_features,
)
from veilface.errors import FaceError, InvalidArgument

logger = logging.getLogger(__name__)

#: The context square is this many times the canonical crop square.
CONTEXT_SCALE: Final = 1.25
#: Side of the cached context crops, px (enough for the largest surrogate crop).
CONTEXT_SIZE: Final = round(MNV2_CROP_SIZE * CONTEXT_SCALE)
#: Images per person used in training at most (LFW has 530 of one person).
MAX_IMAGES_PER_PERSON: Final = 40
#: Held-out share of people: names whose SHA-256 starts with a byte divisible by this.
HOLDOUT_MODULUS: Final = 4
IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_held_out(name: str) -> bool:
    """True for the people reserved for the protection benchmark (about 1 in 4).

    The rule depends only on the name, so the training command and the
    benchmark agree without sharing a file.
    """
    return hashlib.sha256(name.encode("utf-8")).digest()[0] % HOLDOUT_MODULUS == 0


HeldOutSplit = Literal["train", "validation", "test"]


def heldout_split(name: str) -> HeldOutSplit:
    """Which part a person belongs to: surrogate ``train``ing, ``validation`` or ``test``.

    The held-out people (:func:`is_held_out`) are cut in two halves by a
    second byte of the same hash: ``validation`` people are the only ones
    any tuning of the protection looks at; ``test`` people are the ones
    the reported figures come from, and nothing is tuned on them.
    """
    if not is_held_out(name):
        return "train"
    second = hashlib.sha256(name.encode("utf-8")).digest()[1]
    return "validation" if second % 2 == 0 else "test"


def list_people(data: Path, *, min_images: int = 2) -> dict[str, list[Path]]:
    """People (sub-directory names) of ``data`` with at least ``min_images`` images, sorted.

    Raises
    ------
    InvalidArgument
        ``data`` is not a directory or holds no such person.
    """
    if not data.is_dir():
        raise InvalidArgument(f"{data} is not a directory; give a folder of <person>/<image> files")
    people: dict[str, list[Path]] = {}
    for sub in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) >= min_images:
            people[sub.name] = files
    if not people:
        raise InvalidArgument(
            f"{data} holds no person folder with at least {min_images} images "
            "(expected <person>/<image>.jpg)"
        )
    return people


def image_tensor(rgb: npt.NDArray[np.uint8]) -> Tensor:
    """``uint8 (H, W, 3)`` to ``float32 (1, 3, H, W)`` in ``[0, 1]``."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0


@dataclass
class CropSet:
    """Cached context crops.

    Attributes
    ----------
    crops
        ``uint8 (N, CONTEXT_SIZE, CONTEXT_SIZE, 3)``.
    labels
        ``int64 (N,)``, index into ``names``.
    names
        Person names.
    """

    crops: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    names: list[str]


def build_crops(
    people: dict[str, list[Path]], *, progress: bool = True, max_per_person: int | None = None
) -> CropSet:
    """Detect and crop every face of ``people`` (dlib HOG detector only).

    Images whose face is not found (even with detector upsampling) are skipped
    and counted in the log.
    """
    from veilface.client.face.dlib_backend import DlibBackend

    fast, fine = DlibBackend(upsample=0), DlibBackend(upsample=1)
    crops: list[npt.NDArray[np.uint8]] = []
    labels: list[int] = []
    names = sorted(people)
    jobs = [
        (idx, path)
        for idx, name in enumerate(names)
        for path in people[name][: max_per_person or None]
    ]
    iterator: Sequence[tuple[int, Path]] = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc="cropping faces", unit="img")
    skipped = 0
    for idx, path in iterator:
        try:
            rgb = load_image(path)
        except FaceError:
            skipped += 1
            continue
        boxes = fast.detect(rgb) or fine.detect(rgb)
        if not boxes:
            skipped += 1
            continue
        box = max(boxes, key=lambda b: b.area)
        square = crop_square(box)
        context = square.jittered(scale=CONTEXT_SCALE, dx=0.0, dy=0.0)
        with torch.no_grad():
            crop = cut(image_tensor(rgb), context, CONTEXT_SIZE)[0]
        crops.append((crop.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
        labels.append(idx)
    logger.info("cropped %d faces, skipped %d images without a detected face", len(crops), skipped)
    if not crops:
        raise InvalidArgument("no face was detected in any training image")
    return CropSet(np.stack(crops), np.asarray(labels, dtype=np.int64), names)


def _context_at(batch: Tensor, size: int) -> Tensor:
    """Context crops shrunk (anti-aliased) to ``size * CONTEXT_SCALE`` when much larger."""
    side = round(size * CONTEXT_SCALE)
    if batch.shape[-1] <= side * 1.2:
        return batch
    return F.interpolate(batch, size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False)


def augment(batch: Tensor, generator: torch.Generator, size: int = CROP_SIZE) -> Tensor:
    """Random flip, shift, scale, rotation and colour jitter; context crops in, crops out.

    Parameters
    ----------
    batch
        ``float32 (N, 3, C, C)`` context crops in ``[0, 1]``.
    size
        Side of the output crops.

    Returns
    -------
    Tensor
        ``float32 (N, 3, size, size)``.
    """
    batch = _context_at(batch, size)
    n = batch.shape[0]
    rand = torch.rand(n, 6, generator=generator)
    scale = (1.0 / CONTEXT_SCALE) * (0.9 + 0.2 * rand[:, 0])
    angle = (rand[:, 1] - 0.5) * math.radians(20.0)
    shift = (rand[:, 2:4] - 0.5) * 0.12
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 0.75 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    bias = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.2
    grey = out.mean(dim=1, keepdim=True)
    sat = torch.rand(n, 1, 1, 1, generator=generator)
    out = grey + (out - grey) * (0.6 + 0.8 * sat)
    return ((out - 0.5) * gain + 0.5 + bias).clamp(0.0, 1.0)


def center_crops(batch: Tensor, size: int = CROP_SIZE) -> Tensor:
    """The canonical ``size`` px crops (no augmentation) of ``float32 (N, 3, C, C)`` context crops."""
    batch = _context_at(batch, size)
    n = batch.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / CONTEXT_SCALE
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


class CosFaceHead(nn.Module):
    """Large-margin cosine loss head (CosFace): logits ``s * (cos - m * onehot)``."""

    def __init__(self, classes: int, *, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, EMBEDDING_DIM) * 0.01)
        self.scale = scale
        self.margin = margin

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        cos = F.linear(F.normalize(emb), F.normalize(self.weight))
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.scale * (cos - self.margin * onehot)


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_surrogate`."""

    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    #: CosFace scale and margin; short CPU runs converge better with a small margin.
    scale: float = 16.0
    margin: float = 0.15
    #: ImageNet MobileNetV2 weights for the ``"mnv2"`` surrogate (``None``: random init).
    imagenet: Path | None = None
    #: The ImageNet-initialised surrogate trains at ``lr`` times this.
    pretrained_lr_scale: float = 0.5
    #: Leading stages of the ImageNet-initialised surrogate kept frozen.
    frozen_stages: int = 2


@dataclass
class TrainReport:
    """What training one surrogate did."""

    arch: str
    epochs: int
    crop_size: int
    seconds: float
    final_loss: float
    train_accuracy: float
    params: int
    eval: dict[str, float] = field(default_factory=dict)


def train_surrogate(
    arch: Arch, data: CropSet, cfg: TrainConfig, *, progress: bool = True
) -> tuple[Surrogate, TrainReport]:
    """Train one surrogate on ``data`` (identity classification with a CosFace head)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_surrogate(arch)
    lr = cfg.lr
    if isinstance(model, ImageNetMobileNet) and cfg.imagenet is not None:
        copied = load_imagenet_features(model, cfg.imagenet)
        lr = cfg.lr * cfg.pretrained_lr_scale
        # the two high-resolution stages keep their ImageNet filters (and half the compute)
        for stage in model.stages[: cfg.frozen_stages]:
            stage.requires_grad_(False)
        logger.info("%s: %d ImageNet tensors from %s; lr %.3g", arch, copied, cfg.imagenet, lr)
    frozen = [s for s in model.stages if not any(p.requires_grad for p in s.parameters())]
    head = CosFaceHead(len(data.names), scale=cfg.scale, margin=cfg.margin)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay,
                          nesterov=True)
    crops = torch.from_numpy(data.crops).permute(0, 3, 1, 2)  # uint8 NCHW
    labels = torch.from_numpy(data.labels)
    n = len(labels)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                                pct_start=0.15)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"training {arch}", unit="step")
    start = time.perf_counter()
    loss_ema, acc_ema = float("nan"), 0.0
    model.train()
    for stage in frozen:
        stage.eval()  # frozen stages keep their BatchNorm statistics too
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = augment(crops[idx].float() / 255.0, gen, model.crop_size)
            y = labels[idx]
            logits = head(model(x), y)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            acc = float((logits.argmax(1) == y).float().mean())
            value = float(loss.detach())
            loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
            acc_ema = 0.95 * acc_ema + 0.05 * acc
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.2f}", acc=f"{acc_ema:.2f}")
    if bar is not None:
        bar.close()
    model.eval()
    report = TrainReport(
        arch=arch,
        epochs=cfg.epochs,
        crop_size=model.crop_size,
        seconds=time.perf_counter() - start,
        final_loss=loss_ema,
        train_accuracy=acc_ema,
        params=sum(p.numel() for p in model.parameters()),
    )
    return model, report


@torch.no_grad()
def embed_crops(model: Surrogate, crops: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """L2-normalised ``float32 (N, EMBEDDING_DIM)`` embeddings of context crops (plus flips)."""
    out: list[Tensor] = []
    model.eval()
    for i in range(0, len(crops), 256):
        batch = torch.from_numpy(crops[i : i + 256]).permute(0, 3, 1, 2).float() / 255.0
        x = center_crops(batch, model.crop_size)
        out.append(F.normalize(model(x)))
    return torch.cat(out).numpy().astype(np.float32)


def evaluate(model: Surrogate, data: CropSet) -> dict[str, float]:
    """Verification on ``data`` (held-out people): AUC, TAR at 1% FAR and that threshold.

    Returns
    -------
    dict
        ``auc``, ``tar_at_far1`` and ``threshold_far1`` (cosine similarity;
        pairs at or above it count as a match), ``n_genuine``, ``n_impostor``.
    """
    emb = embed_crops(model, data.crops)
    sims = emb @ emb.T
    same = data.labels[:, None] == data.labels[None, :]
    upper = np.triu(np.ones_like(same, dtype=bool), k=1)
    genuine = sims[same & upper]
    impostor = sims[~same & upper]
    threshold = float(np.quantile(impostor, 0.99))
    order = np.argsort(np.concatenate([genuine, impostor]))
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    auc = (ranks[: len(genuine)].sum() - len(genuine) * (len(genuine) + 1) / 2) / (
        len(genuine) * len(impostor)
    )
    return {
        "auc": float(auc),
        "tar_at_far1": float((genuine >= threshold).mean()),
        "threshold_far1": threshold,
        "n_genuine": float(len(genuine)),
        "n_impostor": float(len(impostor)),
    }


def save_surrogate(model: Surrogate, path: Path) -> None:
    """Save ``model``'s weights as a float16 state dict."""
    state = {
        k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()
    }
    torch.save(state, path)


@dataclass
class TrainingSummary:
    """What ``veilface protect train-surrogates`` did (also written as ``manifest.json``)."""

    data: str
    context_size: int
    embedding_dim: int
    train_people: int
    train_images: int
    heldout_people: int
    heldout_images: int
    holdout_rule: str
    seconds: float
    surrogates: list[TrainReport]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def train_all(
    data: Path,
    out: Path,
    *,
    archs: Sequence[Arch] = DEFAULT_ARCHS,
    cfg: TrainConfig | None = None,
    cache: Path | None = None,
    max_people: int | None = None,
    progress: bool = True,
) -> TrainingSummary:
    """Train every surrogate of ``archs`` on the non-held-out people of ``data``; save to ``out``.

    Parameters
    ----------
    data
        ``<person>/<image>`` folder (LFW).
    out
        Directory for ``<arch>.pt`` and ``manifest.json`` (created).
    archs
        Architectures to train.
    cfg
        Training hyper-parameters.
    cache
        ``.npz`` file for the face crops (built if absent; reused if present).
    max_people
        Use at most this many training people (for quick runs and tests).
    progress
        Show tqdm bars.
    """
    cfg = cfg or TrainConfig()
    start = time.perf_counter()
    people = list_people(data, min_images=2)
    train_people = {k: v for k, v in people.items() if not is_held_out(k)}
    held = {k: v for k, v in people.items() if is_held_out(k)}
    if max_people is not None:
        train_people = dict(list(train_people.items())[:max_people])
        held = dict(list(held.items())[: max(2, max_people // 3)])
    if len(train_people) < 2:
        raise InvalidArgument(f"{data} has fewer than 2 training people with 2+ images")
    train_set = _cached_crops(train_people, cache, "train", progress)
    held_set = _cached_crops(held, cache, "heldout", progress) if len(held) >= 2 else None
    out.mkdir(parents=True, exist_ok=True)
    reports: list[TrainReport] = []
    for arch in archs:
        model, report = train_surrogate(arch, train_set, cfg, progress=progress)
        if held_set is not None:
            report.eval = evaluate(model, held_set)
        save_surrogate(model, out / f"{arch}.pt")
        logger.info("trained %s: %s", arch, report)
        reports.append(report)
    summary = TrainingSummary(
        data=str(data),
        context_size=CONTEXT_SIZE,
        embedding_dim=EMBEDDING_DIM,
        train_people=len(train_set.names),
        train_images=len(train_set.labels),
        heldout_people=len(held_set.names) if held_set else 0,
        heldout_images=len(held_set.labels) if held_set else 0,
        holdout_rule=f"sha256(name)[0] % {HOLDOUT_MODULUS} == 0 (people with 2+ images)",
        seconds=time.perf_counter() - start,
        surrogates=reports,
    )
    doc = summary.to_json()
    manifest = out / "manifest.json"
    if manifest.is_file():  # keep the entries of architectures trained by another run
        trained = {r.arch for r in reports}
        try:
            earlier = json.loads(manifest.read_text()).get("surrogates", [])
        except (OSError, ValueError):
            earlier = []
        kept = [r for r in earlier if isinstance(r, dict) and r.get("arch") not in trained]
        doc["surrogates"] = kept + doc["surrogates"]  # type: ignore[operator]
    manifest.write_text(json.dumps(doc, indent=2) + "\n")
    return summary


def _cached_crops(
    people: dict[str, list[Path]], cache: Path | None, tag: str, progress: bool
) -> CropSet:
    limit = MAX_IMAGES_PER_PERSON if tag == "train" else 10
    path = None if cache is None else cache.with_name(f"{cache.stem}-{tag}.npz")
    listing = [[k, [p.name for p in v[:limit]]] for k, v in people.items()]
    key = hashlib.sha256(json.dumps([CONTEXT_SIZE, listing]).encode()).hexdigest()
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as d:
            if str(d["key"]) == key:
                return CropSet(d["crops"], d["labels"], [str(x) for x in d["names"]])
    crops = build_crops(people, progress=progress, max_per_person=limit)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, crops=crops.crops, labels=crops.labels, names=np.asarray(crops.names),
                 key=np.asarray(key))
    return crops


__all__ = [
    "CONTEXT_SIZE",
    "HOLDOUT_MODULUS",
    "CosFaceHead",
    "CropSet",
    "TrainConfig",
    "TrainReport",
    "TrainingSummary",
    "augment",
    "build_crops",
    "center_crops",
    "embed_crops",
    "evaluate",
    "image_tensor",
    "is_held_out",
    "list_people",
    "save_surrogate",
    "train_all",
    "train_surrogate",
]
