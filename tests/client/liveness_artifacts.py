"""Small liveness artifacts for the gate's tests (until the shipped default exists).

A random-init :class:`~veilface.nn.pad_vit.PromptedPAD` (64 px input, 4 layers
of width 64, 4 domains) exported with :func:`~veilface.nn.liveness_io.write_artifact`.
``logit`` forces the decision: the shared head is zeroed and its bias set, so
every face scores ``sigmoid(logit)`` (domain keys are unset, so every image
takes domain 0, whose residual head is zero).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from veilface.nn.liveness_io import MANIFEST, WEIGHTS, CropSpec, _fingerprint, write_artifact

#: Logits that make every face live / an attack at threshold 0.5.
LIVE_LOGIT = 8.0
ATTACK_LOGIT = -8.0


def make_artifact(
    path: Path,
    *,
    logit: float | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    architecture: dict[str, Any] | None = None,
) -> Path:
    """Write a small ``.vfpad`` at ``path``; ``architecture`` overrides the manifest's section."""
    import torch

    from veilface.nn.pad_export import architecture_of, export_arrays
    from veilface.nn.pad_vit import CLIPVisionConfig, PromptedPAD

    torch.manual_seed(seed)
    model = PromptedPAD(
        CLIPVisionConfig(image_size=64, patch_size=8, width=64, layers=4, heads=4, output_dim=64)
    )
    model.ensure_domains(4)
    if logit is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(logit)
    write_artifact(
        path,
        export_arrays(model),
        architecture=architecture or architecture_of(model),
        crop=CropSpec(),
        threshold=threshold,
        threshold_rule={"bpcer": 0.05, "data": "none (test artifact)"},
        training={"run_id": "test", "proxy": True, "data": "random init"},
    )
    return path


def read_members(path: Path) -> tuple[dict[str, Any], bytes]:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(MANIFEST)), zf.read(WEIGHTS)


def rewrite(path: Path, manifest: dict[str, Any], weights: bytes, *, refingerprint: bool) -> Path:
    """Write ``manifest`` and ``weights`` back, with a recomputed fingerprint if asked."""
    if refingerprint:
        manifest = {**manifest, "fingerprint": _fingerprint(manifest, weights)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(MANIFEST, json.dumps(manifest))
        zf.writestr(WEIGHTS, weights)
    path.write_bytes(buf.getvalue())
    return path


def brightness_model(path: Path) -> Any:
    """A real loaded LivenessModel whose P(live) is the crop's mean brightness (0..1).

    Lets a test decide per image which faces are attacks (dark = attack at
    threshold 0.5) while everything else (loading, crop, checks) is real.
    """
    import numpy as np

    from veilface.client.liveness.model import LivenessModel

    class BrightnessModel(LivenessModel):
        def score_crops(self, crops: Any) -> Any:
            arr = np.asarray(crops, dtype=np.float64)
            return arr.reshape(len(arr), -1).mean(axis=1) / 255.0

    return BrightnessModel(path)


def tinted(value: int, shape: tuple[int, int] = (320, 320)) -> Any:
    """A uniform colour image of brightness about ``value`` (R > G > B, so not grey)."""
    import numpy as np

    rgb = np.array([value * 1.2, value, value * 0.8]).clip(0, 255).astype(np.uint8)
    return np.broadcast_to(rgb, (*shape, 3)).copy()
