"""``veilface bench liveness``: ISO/IEC 30107-3 rates on a stub rendered set, pad-samples, a user folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.client.liveness_artifacts import (
    ATTACK_LOGIT,
    LIVE_LOGIT,
    brightness_model,
    make_artifact,
    tinted,
)
from veilface.bench.liveness import LivenessBenchConfig, format_table, run_liveness_bench
from veilface.errors import InvalidArgument

BOX = (100, 100, 200, 200)


@pytest.fixture(scope="module")
def live_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("pad") / "live.vfpad", logit=LIVE_LOGIT)


@pytest.fixture(scope="module")
def attack_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("pad") / "attack.vfpad", logit=ATTACK_LOGIT)


def stub_renderer(n_print_accepted: int = 1) -> Any:
    """Live scenes bright, attacks dark except ``n_print_accepted`` bright prints; one tiny box."""
    calls: list[dict[str, Any]] = []

    def render(lfw_root: Path, *, n_people: int, seed: int) -> Any:
        calls.append({"lfw_root": lfw_root, "n_people": n_people, "seed": seed})
        images, boxes, labels = [], [], []
        for person in range(n_people):
            for label in (0, 1, 2):
                bright = label == 0 or (label == 1 and person < n_print_accepted)
                images.append(tinted(200 if bright else 40))
                boxes.append(BOX)
                labels.append(label)
        images.append(tinted(200))
        boxes.append((10, 10, 20, 20))  # crop region 25 px < 64: the gate cannot judge it
        labels.append(0)
        return np.stack(images), np.asarray(boxes), np.asarray(labels)

    render.calls = calls  # type: ignore[attr-defined]
    return render


def cfg(tmp_path: Path, **kw: Any) -> LivenessBenchConfig:
    base: dict[str, Any] = {
        "pad_samples": tmp_path / "absent", "lfw": tmp_path / "lfw", "n_people": 10,
        "seed": 3, "timing_runs": 3, "progress": False,
    }
    return LivenessBenchConfig(**{**base, **kw})


def test_rates_on_a_stub_rendered_set(tmp_path: Path, live_artifact: Path) -> None:
    render = stub_renderer(n_print_accepted=1)
    r = run_liveness_bench(cfg(tmp_path), renderer=render, model=brightness_model(live_artifact))
    assert render.calls == [{"lfw_root": tmp_path / "lfw", "n_people": 10, "seed": 3}]
    assert r["bpcer_rendered"] == 0.0
    assert r["apcer_per_species"]["rendered"] == {"print": 0.1, "replay": 0.0}
    assert r["apcer_rendered"] == 0.1  # the worst species
    assert r["acer_rendered"] == pytest.approx(0.05)
    assert r["hter_rendered"] == pytest.approx((1 / 20) / 2)  # attacks pooled
    assert r["counts"]["rendered"] == {
        "bona fide": 10, "print": 10, "replay": 10, "unprocessed": {"FaceTooSmall": 1},
    }
    assert r["apcer_pad_samples"] is None and "pad_samples" in r["skipped"]
    assert r["threshold"] == 0.5 and len(r["model_fingerprint"]) == 64
    assert r["ms_per_face"] > 0 and r["ms_gate"] > 0 and r["torch_threads"] == 1
    assert r["targets"]["acer_rendered_le_0.05"] is True
    assert "rendered" in format_table(r)


def test_the_renderer_may_return_an_object_and_bad_results_are_refused(
    tmp_path: Path, live_artifact: Path
) -> None:
    model = brightness_model(live_artifact)

    def as_object(lfw_root: Path, *, n_people: int, seed: int) -> Any:
        images, boxes, labels = stub_renderer(0)(lfw_root, n_people=n_people, seed=seed)
        return SimpleNamespace(images=list(images), boxes=[tuple(b) for b in boxes], labels=labels)

    r = run_liveness_bench(cfg(tmp_path), renderer=as_object, model=model)
    assert r["acer_rendered"] == 0.0
    with pytest.raises(InvalidArgument, match="expected 0 live"):
        run_liveness_bench(
            cfg(tmp_path), model=model,
            renderer=lambda root, **kw: ([tinted(200)], [BOX], [7]),
        )
    with pytest.raises(InvalidArgument, match="2 images, 1 boxes"):
        run_liveness_bench(
            cfg(tmp_path), model=model,
            renderer=lambda root, **kw: ([tinted(200)] * 2, [BOX], [0, 1]),
        )


def test_a_missing_renderer_or_lfw_is_reported_not_fatal(tmp_path: Path, live_artifact: Path) -> None:
    r = run_liveness_bench(cfg(tmp_path), model=brightness_model(live_artifact))
    assert r["apcer_rendered"] is None and "rendered" in r["skipped"]
    assert r["ms_per_face"] is None  # nothing processed to time


@pytest.fixture(scope="module")
def samples(data_dir: Path) -> Path:
    root = data_dir / "pad-samples"
    if not (root / "image_F1.jpg").is_file():
        pytest.skip(f"pad-samples not found at {root}: set VEILFACE_DATA to ../shared/data")
    return root


def test_pad_samples_through_the_real_pipeline(
    tmp_path: Path, samples: Path, attack_artifact: Path, live_artifact: Path
) -> None:
    r = run_liveness_bench(cfg(tmp_path, pad_samples=samples, model=attack_artifact))
    by_file = {e["file"]: e for e in r["pad_samples"]}
    assert set(by_file) == {"image_F1.jpg", "image_F2.jpg", "image_T1.jpg", "image_T2.jpg"}
    assert by_file["image_F1.jpg"]["species"] == "print"
    assert by_file["image_F2.jpg"]["species"] == "replay"
    assert all(e["score"] < 0.01 and not e["accepted"] for e in by_file.values())
    assert r["apcer_pad_samples"] == 0.0 and r["bpcer_pad_samples"] == 1.0
    assert r["counts"]["pad_samples"]["bona fide"] == 2
    assert r["targets"]["pad_samples_all_correct"] is False
    assert r["timing_image"] == "1617x2160"  # image_T2, EXIF-rotated portrait, timed with its crop
    # a user's folder: live/ and attack/<species>/
    user = tmp_path / "mine"
    for sub, name in (("live", "image_T1.jpg"), ("attack/print", "image_F1.jpg"),
                      ("attack/replay", "image_F2.jpg")):
        (user / sub).mkdir(parents=True)
        shutil.copy(samples / name, user / sub / name)
    (user / "attack" / "notes.txt").write_text("ignored: not an image")
    r = run_liveness_bench(cfg(tmp_path, pad_samples=tmp_path / "absent", attacks=user,
                               model=live_artifact))
    assert r["apcer_user"] == 1.0 and r["bpcer_user"] == 0.0 and r["acer_user"] == 0.5
    assert r["apcer_per_species"]["user"] == {"print": 1.0, "replay": 1.0}
    with pytest.raises(InvalidArgument, match="live/ and attack/"):
        run_liveness_bench(cfg(tmp_path, attacks=user / "live", model=live_artifact))


def test_the_command_writes_json(
    tmp_path: Path, live_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from veilface.cli.main import main

    out = tmp_path / "bench" / "liveness.json"
    code = main([
        "bench", "liveness", "--json", str(out), "--model", str(live_artifact),
        "--pad-samples", str(tmp_path / "absent"), "--lfw", str(tmp_path / "no-lfw"),
        "--no-progress", "--timing-runs", "2",
    ])
    assert code == 0
    got = json.loads(out.read_text())
    for key in ("apcer_pad_samples", "bpcer_pad_samples", "apcer_rendered", "bpcer_rendered",
                "acer_rendered", "hter_rendered", "ms_per_face", "ms_gate", "threshold",
                "model_fingerprint", "pad_samples", "counts"):
        assert key in got
    assert "skipped" in capsys.readouterr().out
