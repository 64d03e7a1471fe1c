"""Composite target faces and the warp of the cloak's search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from veilface.client.protect.cloak_search import warp
from veilface.client.protect.cloak_targets import (
    TARGET_STAGES,
    TARGETS_FILE,
    build_targets,
    load_targets,
    target_pools,
)
from veilface.client.protect.surrogate_models import build_surrogate
from veilface.client.protect.surrogates import (
    DEFAULT_WEIGHTS_DIR,
    SurrogateEnsemble,
    SurrogateWeightsNotFound,
    default_ensemble,
)


def test_the_shipped_targets_load_and_match_the_surrogate() -> None:
    ens = default_ensemble()
    pools = load_targets(ens.archs)
    for model in ens.models:
        pool = pools[model.arch]
        assert pool.centroids.shape[0] == 16
        x = torch.rand(1, 3, model.crop_size, model.crop_size)
        with torch.no_grad():
            _, maps = model.features(x)
        for stage, target in zip(TARGET_STAGES, pool.maps, strict=True):
            assert target.shape[1:] == maps[stage].shape[1:]


def test_the_target_is_the_composite_least_like_the_owner() -> None:
    ens = default_ensemble()
    pool = load_targets(ens.archs)[ens.archs[0]]
    for i in range(3):
        owner = pool.centroids[i : i + 1]
        chosen = pool.farthest(owner)
        sims = (pool.centroids @ owner.T)[:, 0]
        j = int(sims.argmin())
        assert j != i
        assert torch.equal(chosen[0], pool.maps[0][j : j + 1])


def test_missing_and_corrupt_target_files(tmp_path: Path) -> None:
    with pytest.raises(SurrogateWeightsNotFound, match="build-targets"):
        load_targets(["mnv2"], tmp_path)
    (tmp_path / TARGETS_FILE).write_bytes(b"not a zip file")
    with pytest.raises(SurrogateWeightsNotFound, match="cannot be read"):
        load_targets(["mnv2"], tmp_path)
    np.savez(tmp_path / TARGETS_FILE, **{"resnet.centroids": np.zeros((2, 4), np.float32)})
    with pytest.raises(SurrogateWeightsNotFound, match="no target faces for surrogate 'mnv2'"):
        load_targets(["mnv2"], tmp_path)


def test_surrogates_without_targets_cloak_without_the_target_term(tmp_path: Path) -> None:
    ens = default_ensemble()
    other = SurrogateEnsemble(ens.models, ens.thresholds, str(tmp_path))
    assert target_pools(other) is None
    assert target_pools(ens) is not None
    assert Path(ens.source) == DEFAULT_WEIGHTS_DIR


def test_build_targets_averages_the_members_of_each_cluster() -> None:
    torch.manual_seed(0)
    model = build_surrogate("mobilenet")  # small, random: the mechanics only
    model.eval()
    crops = torch.rand(40, 3, model.crop_size, model.crop_size)
    arrays = build_targets(model, crops, clusters=4, per_target=3)
    cents = arrays["mobilenet.centroids"]
    assert cents.shape == (4, 128)
    assert np.allclose(np.linalg.norm(cents, axis=1), 1, atol=1e-4)
    for j in TARGET_STAGES:
        assert arrays[f"mobilenet.stage{j}"].shape[0] == 4
    with pytest.raises(ValueError, match="at least 8 faces"):
        build_targets(model, crops[:5], clusters=4)


def test_a_zero_warp_is_the_identity_and_a_warp_is_bounded() -> None:
    x = torch.rand(1, 3, 40, 50)
    mask = torch.ones(1, 1, 40, 50)
    flow = torch.zeros(1, 2, 4, 5)
    assert torch.allclose(warp(x, flow, mask, 2.0), x, atol=1e-5)
    # a uniform shift of one pixel to the right moves every column by one
    ramp = torch.arange(50, dtype=torch.float32).expand(1, 3, 40, 50).clone()
    shifted = warp(ramp, torch.ones(1, 2, 4, 5), mask, 1.0)
    inner = (shifted - ramp)[..., 2:-2, 2:-2]
    assert torch.allclose(inner, torch.ones_like(inner), atol=1e-3)


def test_build_targets_on_a_folder_without_training_faces(tmp_path: Path) -> None:
    from veilface.cli.main import main

    (tmp_path / "Nobody").mkdir()
    assert main(["protect", "build-targets", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert not (tmp_path / TARGETS_FILE).exists()
