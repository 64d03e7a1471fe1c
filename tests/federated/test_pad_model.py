"""Prompted CLIP-style PAD model, Selective EWC and checkpoint checks (tiny random config)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from veilface.errors import InvalidArgument
from veilface.federated.arrays import state_arrays
from veilface.federated.pad.models import (
    CheckpointError,
    CLIPVisionConfig,
    CLIPVisionTransformer,
    PromptedPAD,
    SelectiveEWC,
    compute_fisher,
    load_clip_visual,
    numpy_to_state,
)
from veilface.federated.pad.training import TrainSettings, build_model, train_domain
from veilface.federated.run_artifacts import RunArtifacts, load_checkpoint

TINY = CLIPVisionConfig.tiny()


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _batch(n: int = 8, bright: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, TINY.image_size, TINY.image_size) * 0.5 + bright
    y = torch.tensor([1.0, 0.0] * (n // 2))
    return x, y


def test_forward_shapes_and_prompts_added_per_domain() -> None:
    model = PromptedPAD(TINY, n_universal=2, n_domain=3)
    assert model.num_domains == 0
    assert model.add_domain() == 0 and model.add_domain() == 1
    x, _ = _batch(4)
    assert model(x, 0).shape == (4,)
    assert model(x, torch.tensor([0, 1, 1, 0])).shape == (4,)
    assert model.domain_prompts[1].shape == (TINY.layers, 3, TINY.width)
    keys = set(model.state_dict())
    assert {"domain_prompts.1", "domain_heads.1", "domain_keys.1"} <= keys
    with pytest.raises(InvalidArgument):
        model(x, 5)
    with pytest.raises(InvalidArgument, match="images must be"):
        model(torch.zeros(2, 3, 16, 16), 0)


def test_training_a_domain_leaves_earlier_prompts_frozen() -> None:
    model = build_model("tiny", "svlp", n_prompts=2)
    model.add_domain()
    x, y = _batch(8)
    settings = TrainSettings(epochs=1, batch_size=4)
    train_domain(model, x, y, 0, settings)
    model.add_domain()
    before0 = model.domain_prompts[0].detach().clone()
    before1 = model.domain_prompts[1].detach().clone()
    head0 = model.domain_heads[0].detach().clone()
    train_domain(model, x, y, 1, settings)
    assert torch.equal(model.domain_prompts[0], before0)
    assert torch.equal(model.domain_heads[0], head0)
    assert not torch.equal(model.domain_prompts[1], before1)


def test_naive_model_has_no_prompts() -> None:
    model = build_model("tiny", "naive")
    assert not model.prompted and model.query is None
    x, _ = _batch(2)
    assert model.score(x).shape == (2,)


def test_selective_ewc_zero_at_anchor_and_only_on_masked_weights() -> None:
    model = build_model("tiny", "svlp", n_prompts=2)
    model.add_domain()
    x, y = _batch(8)
    fisher = compute_fisher(model, x, y, 0, batch_size=4)
    anchor = {n: p.detach().clone() for n, p in model.shared_parameters()}
    ewc = SelectiveEWC(fisher, anchor, top_p=0.1)
    total = sum(f.numel() for f in fisher.values())
    assert abs(ewc.num_masked - round(0.1 * total)) <= 0.01 * total
    assert float(ewc.penalty(model)) == 0.0
    with torch.no_grad():
        for _, p in model.shared_parameters():
            p.add_(0.01 * torch.randn_like(p))
    pen = ewc.penalty(model)
    assert float(pen) > 0
    model.zero_grad()
    pen.backward()  # type: ignore[no-untyped-call]
    params = dict(model.named_parameters())
    for name, mask in ewc.mask.items():
        grad = params[name].grad
        if grad is None:
            assert not mask.any()
            continue
        assert torch.all(grad[~mask] == 0)
    # round trip through arrays (what the server sends to the sites)
    again = SelectiveEWC.from_numpy(ewc.to_numpy())
    assert again is not None and again.num_masked == ewc.num_masked
    assert torch.allclose(again.penalty(model), pen)
    with pytest.raises(InvalidArgument):
        SelectiveEWC(fisher, anchor, top_p=0.0)


def test_domain_selection_by_nearest_key() -> None:
    model = build_model("tiny", "svlp", n_prompts=1)
    dark, _ = _batch(16, bright=-1.5)
    light, _ = _batch(16, bright=1.5)
    for d, x in enumerate((dark, light)):
        model.add_domain()
        s1, s2 = model.domain_key_sums(x)
        mean = s1 / len(x)
        model.set_domain_key(d, mean, s2 / len(x) - torch.outer(mean, mean))
    assert model.select_domains(dark).tolist() == [0] * 16
    assert model.select_domains(light).tolist() == [1] * 16


def test_state_round_trip_grows_domains_and_refuses_other_models(tmp_path: Path) -> None:
    model = build_model("tiny", "svlp", n_prompts=2)
    model.add_domain()
    model.add_domain()
    arrays = state_arrays(model, dtype=np.float32)
    fresh = build_model("tiny", "svlp", n_prompts=2)
    numpy_to_state(fresh, arrays)
    assert fresh.num_domains == 2
    x, _ = _batch(2)
    assert torch.allclose(fresh(x, 1), model(x, 1))
    other = build_model("tiny", "svlp", n_prompts=3)
    with pytest.raises(CheckpointError, match="another model"):
        numpy_to_state(other, arrays)
    run = RunArtifacts(tmp_path, "pad", plot=False)
    path = run.save_checkpoint(1, arrays, model.model_id)
    assert set(load_checkpoint(path, model_id=model.model_id)) == set(arrays)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, model_id=build_model("tiny", "naive").model_id)


def test_load_clip_visual_formats_and_errors(tmp_path: Path) -> None:
    src = CLIPVisionTransformer(TINY)
    full = {f"visual.{k}": v for k, v in src.state_dict().items()}
    full["token_embedding.weight"] = torch.zeros(4, 4)  # a text-tower key, ignored
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, path)
    dst = CLIPVisionTransformer(TINY)
    assert load_clip_visual(dst, path) == len(src.state_dict())
    assert torch.equal(dst.proj, src.proj)
    # another image size: positions resized
    bigger = CLIPVisionTransformer(CLIPVisionConfig(**{**TINY.__dict__, "image_size": 48}))
    load_clip_visual(bigger, path)
    assert bigger.positional_embedding.shape == (37, TINY.width)
    # another width: refused
    wide = CLIPVisionTransformer(CLIPVisionConfig(**{**TINY.__dict__, "width": 64}))
    with pytest.raises(CheckpointError, match="another model"):
        load_clip_visual(wide, path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_clip_visual(dst, junk)
    with pytest.raises(CheckpointError):
        load_clip_visual(dst, tmp_path / "missing.pt")
    model = PromptedPAD(TINY, n_universal=1, n_domain=1)
    model.load_backbone(path)
    assert model.query is not None and torch.equal(model.query.proj, src.proj)


def test_config_validation() -> None:
    with pytest.raises(InvalidArgument):
        CLIPVisionConfig(image_size=30, patch_size=8)
    with pytest.raises(InvalidArgument):
        CLIPVisionConfig(width=30, heads=4)
    with pytest.raises(InvalidArgument):
        build_model("huge", "svlp")
    with pytest.raises(InvalidArgument):
        build_model("tiny", "replay")
    assert np.isfinite(float(build_model("tiny", "svlp").universal_prompts.sum()))
