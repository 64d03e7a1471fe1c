"""Federated training across camera sites (Flower). Independent of the service.

Submodules are imported on first use of a name, so ``import
veilface.federated`` loads neither torch nor flwr:

- :mod:`veilface.federated.metrics` (numpy): ReID retrieval metrics
  (Rank-k, mAP, mINP) and PAD metrics (HTER, APCER/BPCER/ACER, AUC, EER
  threshold, average forgetting).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # metrics
    "PADErrorRates": "metrics",
    "RetrievalMetrics": "metrics",
    "acer": "metrics",
    "auc": "metrics",
    "average_forgetting": "metrics",
    "eer_threshold": "metrics",
    "evaluate_retrieval": "metrics",
    "hter": "metrics",
    "pad_error_rates": "metrics",
}

__all__ = [
    "PADErrorRates",
    "RetrievalMetrics",
    "acer",
    "auc",
    "average_forgetting",
    "eer_threshold",
    "evaluate_retrieval",
    "hter",
    "pad_error_rates",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
