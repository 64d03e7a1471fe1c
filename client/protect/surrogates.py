"""Load the shipped surrogate recognizers as an ensemble.

The weights live in ``veilface/client/protect/weights/`` (``<arch>.pt``,
float16 state dicts, plus ``manifest.json``) and are produced by
``veilface protect train-surrogates``. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import torch

from veilface.client.protect.surrogate_models import ARCHS, Arch, Surrogate, build_surrogate
from veilface.errors import FailedPrecondition

logger = logging.getLogger(__name__)

#: Where the shipped weights are.
DEFAULT_WEIGHTS_DIR: Final = Path(__file__).resolve().parent / "weights"


class SurrogateWeightsNotFound(FailedPrecondition):
    """The surrogate weights are missing or unreadable."""


@dataclass
class SurrogateEnsemble:
    """Frozen surrogate recognizers in eval mode.

    Attributes
    ----------
    models
        The surrogates (parameters do not require gradients).
    thresholds
        Per architecture, the cosine similarity at 1% false accepts measured on
        held-out people at training time (``nan`` when unknown).
    source
        Where the weights were loaded from.
    """

    models: list[Surrogate]
    thresholds: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def archs(self) -> list[str]:
        return [m.arch for m in self.models]


def load_ensemble(
    weights_dir: str | Path | None = None, *, archs: Sequence[Arch] | None = None
) -> SurrogateEnsemble:
    """Load the surrogates of ``weights_dir`` (default: the shipped weights).

    Parameters
    ----------
    weights_dir
        Directory holding ``<arch>.pt`` files (and optionally ``manifest.json``).
    archs
        Which architectures to load; default every one present.

    Raises
    ------
    SurrogateWeightsNotFound
        No weights file found, or one cannot be loaded.
    """
    directory = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR
    wanted = tuple(archs) if archs is not None else ARCHS
    thresholds: dict[str, float] = {}
    manifest = directory / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        for rep in info.get("surrogates", []):
            thresholds[str(rep["arch"])] = float(rep.get("eval", {}).get("threshold_far1", "nan"))
    models: list[Surrogate] = []
    for arch in wanted:
        path = directory / f"{arch}.pt"
        if not path.is_file():
            if archs is not None:
                raise SurrogateWeightsNotFound(
                    f"surrogate weights {path} not found; train them with "
                    "'veilface protect train-surrogates --data <lfw> --out DIR'"
                )
            continue
        model = build_surrogate(arch)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in state.items()})
        except Exception as exc:
            raise SurrogateWeightsNotFound(
                f"surrogate weights {path} cannot be loaded ({type(exc).__name__}); retrain "
                "them with 'veilface protect train-surrogates'"
            ) from exc
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models.append(model)
    if not models:
        raise SurrogateWeightsNotFound(
            f"no surrogate weights (<arch>.pt for {', '.join(wanted)}) in {directory}; "
            "reinstall veilface or train them with "
            "'veilface protect train-surrogates --data <lfw> --out DIR'"
        )
    logger.debug("loaded surrogates %s from %s", [m.arch for m in models], directory)
    return SurrogateEnsemble(models, thresholds, str(directory))


_lock = threading.Lock()
_default: SurrogateEnsemble | None = None


def default_ensemble() -> SurrogateEnsemble:
    """The shipped ensemble, loaded once per process (models are read-only, so sharing is safe)."""
    global _default
    with _lock:
        if _default is None:
            _default = load_ensemble()
        return _default


__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "SurrogateEnsemble",
    "SurrogateWeightsNotFound",
    "default_ensemble",
    "load_ensemble",
]
