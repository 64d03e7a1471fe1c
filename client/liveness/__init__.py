"""The liveness gate: a presentation-attack detector run before any face is embedded.

- :mod:`~veilface.client.liveness.model`: :class:`LivenessModel` loads a
  ``.vfpad`` artifact and scores faces (torch, imported on first use).
- :mod:`~veilface.client.liveness.gate`: :class:`LivenessGate`, what
  ``FacePipeline(liveness=..., liveness_policy=...)`` runs on the one face of
  a photo, and the :data:`LIVENESS_SKIPPED` marker of ``liveness=None``.
"""

from __future__ import annotations

_EXPORTS = {
    "LivenessModel": "model",
    "LivenessScore": "model",
    "default_model_path": "model",
    "DEFAULT_LIVENESS": "gate",
    "LIVENESS_SKIPPED": "gate",
    "LivenessGate": "gate",
    "LivenessSkipped": "gate",
    "liveness_record": "gate",
}

__all__ = [
    "DEFAULT_LIVENESS",
    "LIVENESS_SKIPPED",
    "LivenessGate",
    "LivenessModel",
    "LivenessScore",
    "LivenessSkipped",
    "default_model_path",
    "liveness_record",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f"veilface.client.liveness.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
