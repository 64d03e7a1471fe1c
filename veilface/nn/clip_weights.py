"""Loading CLIP visual-tower weights into :class:`~veilface.nn.pad_vit.CLIPVisionTransformer`.

Weight formats accepted by :func:`load_clip_visual`
    - a plain visual-tower state dict with OpenAI CLIP key names
      (``conv1.weight``, ``class_embedding``, ``positional_embedding``,
      ``ln_pre.*``, ``transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}.*``,
      ``ln_post.*``, ``proj``);
    - a full CLIP state dict (text tower ignored) with those keys under
      ``visual.``, e.g. ``torch.jit.load("ViT-B-16.pt").state_dict()`` saved
      with ``torch.save`` (OpenAI JIT archives themselves are not read: they
      hold code);
    - an open_clip checkpoint (``{"state_dict": {...}}``, keys optionally
      prefixed ``module.``) of a ``ViT-*`` model, whose visual keys are the same.
    A positional embedding for another grid size is resized bicubically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from veilface.errors import CheckpointError
from veilface.nn.pad_vit import CLIPVisionTransformer

logger = logging.getLogger(__name__)

__all__ = ["load_clip_visual"]


def _strip_visual_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    has_visual = any(k.removeprefix("module.").startswith("visual.") for k in state)
    for key, value in state.items():
        k = key.removeprefix("module.")
        if has_visual:
            if not k.startswith("visual."):
                continue  # text tower, logit_scale, ...
            k = k.removeprefix("visual.")
        out[k] = value
    return out


def load_clip_visual(model: CLIPVisionTransformer, path: str | Path) -> int:
    """Load CLIP visual-tower weights from a user-given file (formats: module docstring).

    Parameters
    ----------
    model : CLIPVisionTransformer
        Its config must match the checkpoint's (width, layers, patch size,
        output_dim); only the image size may differ (positions are resized).
    path : str or pathlib.Path
        A ``torch.save`` file, read with ``weights_only=True``.

    Returns
    -------
    int
        Number of tensors copied.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, or keys/shapes of another model.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(
            f"no CLIP weights file at {file}; pass the path of a saved state dict"
        )
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign files
        raise CheckpointError(
            f"{file} is not a readable torch state dict ({type(exc).__name__}); an OpenAI JIT "
            "archive must be converted: torch.save(torch.jit.load(p).state_dict(), out)"
        ) from exc
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in raw.items()
    ):
        raise CheckpointError(f"{file} does not hold a state dict of named tensors")
    state = _strip_visual_prefix(raw)
    expected = model.state_dict()
    pos_key = "positional_embedding"
    if pos_key in state and state[pos_key].shape != expected[pos_key].shape:
        state[pos_key] = _resize_positions(state[pos_key], model.config.grid)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(
            f"{file} is not a CLIP visual tower for {asdict(model.config)}: a checkpoint from "
            f"another model? {'; '.join(parts)}"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    logger.info("loaded %d CLIP visual tensors from %s", len(state), file)
    return len(state)


def _resize_positions(pos: Tensor, grid: int) -> Tensor:
    n = pos.shape[0] - 1
    old = round(math.sqrt(n))
    if pos.ndim != 2 or old * old != n:
        raise CheckpointError(
            f"positional_embedding of shape {tuple(pos.shape)} is not a square grid"
        )
    cls, grid_pos = pos[:1], pos[1:]
    g = grid_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls.float(), g.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)
