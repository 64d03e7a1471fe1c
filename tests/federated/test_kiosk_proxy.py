"""The kiosk liveness proxy: scenes, the client's crop, people split, the training set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.federated.test_pad_proxy import fake_lfw
from veilface.errors import InvalidArgument
from veilface.federated.pad.export import choose_threshold
from veilface.federated.pad.kiosk_proxy import (
    KIOSK_CROP,
    KIOSK_DOMAINS,
    build_kiosk_proxy,
    camera,
    person_part,
    render_bench_set,
    render_scene,
)
from veilface.nn.liveness_io import CropSpec, liveness_crop


def test_person_part_is_stable_and_splits_about_one_in_five() -> None:
    names = [f"Person_{i:04d}" for i in range(2000)]
    parts = [person_part(n) for n in names]
    assert parts == [person_part(n) for n in names]
    share = parts.count("bench") / len(parts)
    assert 0.15 < share < 0.26


@pytest.mark.parametrize("species", [0, 1, 2])
def test_scene_box_lies_on_the_face_and_inside_the_image(tmp_path: Path, species: int) -> None:
    root = fake_lfw(tmp_path / "lfw", people=4)
    files = sorted(root.glob("*/*.jpg"))
    rng = np.random.default_rng(species)
    scene = render_scene(species, files[0], files[1], rng)
    h, w = scene.image.shape[:2]
    left, top, right, bottom = scene.box
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    assert 90 <= right - left <= 175  # dlib's LFW box, scaled for attacks
    shot = camera(scene, KIOSK_DOMAINS[1], rng)
    crop = liveness_crop(shot.image, shot.box, KIOSK_CROP)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8


def test_unknown_species_is_refused(tmp_path: Path) -> None:
    files = sorted(fake_lfw(tmp_path / "lfw", people=2).glob("*/*.jpg"))
    with pytest.raises(InvalidArgument):
        render_scene(3, files[0], files[1], np.random.default_rng(0))


def test_crop_stays_inside_the_image_and_never_pads() -> None:
    rgb = np.zeros((100, 200, 3), dtype=np.uint8)
    rgb[:, :100] = 255  # left half white: a padded crop would show black
    crop = liveness_crop(rgb, (0, 0, 60, 60), CropSpec(scale=2.5, size=32))
    assert crop[:, :8].min() > 200  # shifted into the image, not padded on the left
    with pytest.raises(InvalidArgument):
        liveness_crop(rgb, (10, 10, 10, 40), CropSpec())


def test_build_kiosk_proxy_has_both_splits_and_all_species(tmp_path: Path) -> None:
    root = fake_lfw(tmp_path / "lfw", people=200)
    proxy = build_kiosk_proxy(root, per_domain=16, seed=0)
    assert proxy.images.shape == (64, 64, 64, 3)
    assert set(proxy.split.tolist()) == {0, 1}
    assert set(proxy.species.tolist()) == {0, 1, 2}
    names = sorted(p.name for p in root.iterdir())
    bench = {i for i, n in enumerate(names) if person_part(n) == "bench"}
    assert bench  # the fake folder has bench people, and the proxy used none of them
    for d in range(4):
        ids_train = set(proxy.identity[(proxy.domain == d) & (proxy.split == 0)].tolist())
        ids_val = set(proxy.identity[(proxy.domain == d) & (proxy.split == 1)].tolist())
        assert not ids_train & ids_val


def test_renders_show_the_same_photos_again_with_their_own_species(tmp_path: Path) -> None:
    root = fake_lfw(tmp_path / "lfw", people=200)
    once = build_kiosk_proxy(root, per_domain=16, seed=0)
    twice = build_kiosk_proxy(root, per_domain=16, seed=0, renders=2)
    assert twice.images.shape[0] == 2 * once.images.shape[0]
    for d in range(4):
        in_d = twice.domain == d
        assert np.bincount(twice.species[in_d], minlength=3).tolist() == [16, 8, 8]
        # the same people (and so the same train/validation split) as one render
        assert set(twice.identity[in_d].tolist()) == set(once.identity[once.domain == d].tolist())
        ids_train = set(twice.identity[in_d & (twice.split == 0)].tolist())
        assert not ids_train & set(twice.identity[in_d & (twice.split == 1)].tolist())
    with pytest.raises(InvalidArgument, match="renders"):
        build_kiosk_proxy(root, per_domain=16, renders=0)


def test_bench_set_uses_only_bench_people(tmp_path: Path) -> None:
    root = fake_lfw(tmp_path / "lfw", people=60)
    bench = render_bench_set(root, n_people=5)
    assert len(bench.images) == 15 and bench.labels.tolist().count(0) == 5
    assert bench.people == 5


def test_choose_threshold_meets_the_target_bpcer() -> None:
    rng = np.random.default_rng(0)
    live, attack = rng.uniform(0.3, 1.0, 1000), rng.uniform(0.0, 0.5, 1000)
    thr, bpcer, apcer = choose_threshold(live, attack, 0.05)
    assert bpcer <= 0.05 and abs(bpcer - 0.05) < 0.01
    assert apcer == pytest.approx(float(np.mean(attack >= thr)))
    with pytest.raises(InvalidArgument):
        choose_threshold(np.array([]), attack, 0.05)
