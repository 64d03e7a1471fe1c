"""The liveness gate: a presentation-attack detector run before any face is embedded.

- :mod:`~veilface.client.liveness.model`: :class:`LivenessModel` loads a
  ``.vfpad`` artifact and scores faces (torch, imported on first use).
"""

from __future__ import annotations

__all__ = ["LivenessModel", "LivenessScore", "default_model_path"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from veilface.client.liveness import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
