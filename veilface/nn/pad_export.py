"""A trained :class:`~veilface.nn.pad_vit.PromptedPAD` to and from the arrays of a ``.vfpad`` file.

Only what inference needs is exported: the backbone, the prompts, the heads,
the domain keys, and the first layer (``conv1``) of the frozen query tower,
which is all :meth:`PromptedPAD.query_descriptor` reads. The rest of the
query tower (a copy of the initial backbone, used by nothing at inference)
is left out, so the kiosk loads half the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from veilface.errors import InvalidArgument
from veilface.nn.liveness_io import LivenessModelInvalid
from veilface.nn.pad_cnn import AdaptedCNNPAD, CNNConfig
from veilface.nn.pad_vit import CLIPVisionConfig, PromptedPAD

__all__ = ["ARCHITECTURE", "architecture_of", "export_arrays", "inference_parameters", "model_from_arrays"]

ARCHITECTURE = "prompted-vit"
CNN_ARCHITECTURE = "adapted-mnv2"
_QUERY_KEPT = ("query.conv1.",)
Model = PromptedPAD | AdaptedCNNPAD


def architecture_of(model: Model) -> dict[str, Any]:
    """The ``architecture`` section of a manifest for ``model``."""
    if isinstance(model, AdaptedCNNPAD):
        return {
            "name": CNN_ARCHITECTURE,
            "model_id": model.model_id,
            "config": model.config.to_json(),
            "adapters": model.adapters,
            "num_domains": model.num_domains,
        }
    return {
        "name": ARCHITECTURE,
        "model_id": model.model_id,
        "config": asdict(model.config),
        "n_universal": model.n_universal,
        "n_domain": model.n_domain,
        "num_domains": model.num_domains,
    }


def _kept(model: Model, name: str) -> bool:
    # the ViT's query tower is a whole copy of the initial backbone, of which only
    # conv1 is read; the CNN's query is just its stem, kept whole
    if isinstance(model, AdaptedCNNPAD):
        return True
    return not name.startswith("query.") or name.startswith(_QUERY_KEPT)


def export_arrays(model: Model) -> dict[str, npt.NDArray[np.float32]]:
    """The state arrays inference needs (see the module docstring), float32."""
    return {
        k: v.detach().cpu().numpy().astype(np.float32)
        for k, v in model.state_dict().items()
        if _kept(model, k)
    }


def inference_parameters(model: Model) -> int:
    """Number of weights exported (what a kiosk loads and runs)."""
    return int(sum(v.numel() for k, v in model.state_dict().items() if _kept(model, k)))


def model_from_arrays(
    architecture: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[np.float32]]
) -> Model:
    """Rebuild the model a manifest describes and load its arrays.

    Raises
    ------
    LivenessModelInvalid
        Another architecture, a configuration this code cannot build, or
        arrays whose names or shapes do not fit it.
    """
    name = architecture.get("name")
    if name not in (ARCHITECTURE, CNN_ARCHITECTURE):
        raise LivenessModelInvalid(
            f"liveness artifact: architecture {name!r}; this veilface runs "
            f"{ARCHITECTURE!r} and {CNN_ARCHITECTURE!r}"
        )
    model: Model
    try:
        if name == CNN_ARCHITECTURE:
            model = _cnn_from(architecture)
        else:
            model = _vit_from(architecture)
    except (KeyError, TypeError, ValueError, InvalidArgument) as exc:
        raise LivenessModelInvalid(f"liveness artifact: bad architecture section ({exc})") from exc
    return _load_into(model, architecture, arrays)


def _cnn_from(architecture: Mapping[str, Any]) -> AdaptedCNNPAD:
    raw = dict(architecture["config"])
    if set(raw) != {"image_size", "depth", "adapt_at"}:
        raise InvalidArgument(f"config keys {sorted(raw)}")
    config = CNNConfig(
        image_size=int(raw["image_size"]),
        depth=int(raw["depth"]),
        adapt_at=[int(a) for a in raw["adapt_at"]],
    )
    model = AdaptedCNNPAD(config, adapters=bool(architecture["adapters"]))
    num_domains = int(architecture["num_domains"])
    if not 0 <= num_domains <= 64:
        raise InvalidArgument(f"{num_domains} domains")
    model.ensure_domains(num_domains)
    return model


def _vit_from(architecture: Mapping[str, Any]) -> PromptedPAD:
    names = {f.name for f in fields(CLIPVisionConfig)}
    raw = dict(architecture["config"])
    if set(raw) != names:
        raise InvalidArgument(f"config keys {sorted(raw)} are not {sorted(names)}")
    config = CLIPVisionConfig(**raw)
    if config.image_size > 512 or config.width > 2048 or config.layers > 48:
        raise InvalidArgument("configuration too large for a liveness model")
    model = PromptedPAD(
        config,
        n_universal=int(architecture["n_universal"]),
        n_domain=int(architecture["n_domain"]),
    )
    num_domains = int(architecture["num_domains"])
    if not 0 <= num_domains <= 64:
        raise InvalidArgument(f"{num_domains} domains")
    model.ensure_domains(num_domains)
    return model


def _load_into(
    model: Model, architecture: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[np.float32]]
) -> Model:
    if model.model_id != architecture.get("model_id"):
        raise LivenessModelInvalid(
            f"liveness artifact: model id {architecture.get('model_id')!r} does not match its "
            f"configuration ({model.model_id!r})"
        )
    expected = {k: v for k, v in model.state_dict().items() if _kept(model, k)}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        raise LivenessModelInvalid(
            f"liveness artifact: weights do not fit {model.model_id} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shape {wrong[:3]})"
        )
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
    model.load_state_dict(state, strict=False)
    model.eval()
    return model
