"""The PAD proxy renderer: attacks, capture domains, the built set, the real-sample check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from veilface.errors import InvalidArgument
from veilface.federated.pad.proxy import (
    CAPTURE_DOMAINS,
    build_pad_proxy,
    capture,
    compare_with_real_samples,
    image_statistics,
    load_pad_proxy,
    render_print,
    render_replay,
)


def _face(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A smooth, saturated synthetic 'face' (float32 RGB in [0, 1])."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.8 - 0.3 * yy, 0.5 + 0.2 * xx, 0.3 + 0.1 * yy * xx], axis=2)
    return np.clip(base + rng.normal(0, 0.01, base.shape), 0, 1).astype(np.float32)


def fake_lfw(root: Path, people: int = 40, per_person: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for p in range(people):
        d = root / f"Person_{p:03d}"
        d.mkdir(parents=True)
        for k in range(per_person):
            colour = rng.integers(40, 220, 3)
            img = np.clip(rng.normal(colour, 25, (250, 250, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"Person_{p:03d}_{k + 1:04d}.jpg")
    return root


def test_print_and_replay_renderings_differ_from_live_as_intended() -> None:
    rng = np.random.default_rng(0)
    face = _face(rng)
    printed = render_print(face, rng)
    replay = render_replay(face, rng)
    for img in (printed, replay):
        assert img.shape == face.shape and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0

    def stats(a: np.ndarray) -> dict[str, float]:
        return image_statistics((a * 255).astype(np.uint8))

    live_s, print_s, replay_s = stats(face), stats(printed), stats(replay)
    assert print_s["saturation"] < live_s["saturation"]  # ink on paper: washed out
    assert print_s["high_freq_energy"] > live_s["high_freq_energy"]  # halftone dots
    assert replay_s["spectral_peakiness"] > live_s["spectral_peakiness"]  # moiré / pixel grid


def test_capture_domains_change_the_image() -> None:
    rng = np.random.default_rng(1)
    face = _face(rng)
    outs = [capture(face, s, 32, np.random.default_rng(2)) for s in CAPTURE_DOMAINS]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    means = [float(o.mean()) for o in outs]
    assert means[2] < min(means[0], means[3])  # the dim indoor domain is darker


def test_build_save_load(tmp_path: Path) -> None:
    lfw = fake_lfw(tmp_path / "lfw")
    proxy = build_pad_proxy(lfw, per_domain=16, image_size=32, domains=CAPTURE_DOMAINS[:2])
    assert proxy.images.shape == (32, 32, 32, 3)
    for d in range(2):
        sel = proxy.domain == d
        assert np.bincount(proxy.species[sel], minlength=3).tolist() == [8, 4, 4]
        train_ids = set(proxy.identity[sel & (proxy.split == 0)])
        test_ids = set(proxy.identity[sel & (proxy.split == 1)])
        assert train_ids and test_ids and not train_ids & test_ids
    assert not set(proxy.identity[proxy.domain == 0]) & set(proxy.identity[proxy.domain == 1])
    assert proxy.labels.tolist() == (proxy.species == 0).astype(int).tolist()
    path = tmp_path / "p.npz"
    proxy.save(path)
    again = load_pad_proxy(path)
    assert np.array_equal(again.images, proxy.images) and again.domain_names == proxy.domain_names


def test_build_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no LFW folder"):
        build_pad_proxy(tmp_path / "missing")
    lfw = fake_lfw(tmp_path / "lfw", people=4)
    with pytest.raises(InvalidArgument, match="multiple of 4"):
        build_pad_proxy(lfw, per_domain=10)
    with pytest.raises(InvalidArgument, match="too few photos"):
        build_pad_proxy(lfw, per_domain=16)
    with pytest.raises(InvalidArgument, match="not a PAD proxy"):
        np.savez(tmp_path / "x.npz", a=np.zeros(1))
        load_pad_proxy(tmp_path / "x.npz")


def test_check_against_real_pad_samples(data_dir: Path, tmp_path: Path) -> None:
    samples = data_dir / "pad-samples"
    if not samples.is_dir():
        pytest.skip("pad-samples/ not found under the data root")
    proxy = build_pad_proxy(
        data_dir / "lfw", per_domain=32, image_size=48, domains=CAPTURE_DOMAINS[:2]
    )
    check = compare_with_real_samples(proxy, samples)
    assert set(check["real"]) == set(check["proxy"]) == {"live", "print", "replay"}
    # the one direction the real photos and the renderings agree on: prints are less saturated
    assert check["real"]["print"]["saturation"] < check["real"]["live"]["saturation"]
    assert check["proxy"]["print"]["saturation"] < check["proxy"]["live"]["saturation"]
    with pytest.raises(InvalidArgument, match="pad-samples"):
        compare_with_real_samples(proxy, tmp_path)
