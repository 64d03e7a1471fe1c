"""``veilface bench face``: the per-photo timing of the face pipeline, on a few real LFW photos."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from veilface.bench.face import FaceBenchConfig, format_table, list_images, run_face_bench
from veilface.cli import bench as bench_cli
from veilface.errors import InvalidArgument


@pytest.fixture
def photos(data_dir: Path, tmp_path: Path) -> Path:
    lfw = data_dir / "lfw"
    if not lfw.is_dir():
        pytest.skip(f"LFW not found at {lfw}")
    root = tmp_path / "photos"
    for person in ("Tony_Blair", "Serena_Williams"):
        (root / person).mkdir(parents=True)
        (root / person / f"{person}_0001.jpg").symlink_to(lfw / person / f"{person}_0001.jpg")
    (root / "Blank").mkdir()
    Image.new("RGB", (250, 250), (90, 90, 90)).save(root / "Blank" / "Blank_0001.jpg")
    (root / "Blank" / "Blank_0002.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.mark.data
@pytest.mark.slow
def test_bench_face_dlib(photos: Path, tmp_path: Path) -> None:
    result = run_face_bench(FaceBenchConfig(images=photos, limit=10, progress=False))
    assert result["backend"] == "dlib"
    assert (result["n_images"], result["n_embedded"]) == (4, 2)
    assert result["refused"] == {"ImageDecodeError": 1, "NoFaceFound": 1}
    per = result["sec_per_image"]
    assert 0 < per["median"] <= per["p95"] <= per["max"]
    assert result["detect_s"]["mean"] > 0 and result["embed_s"]["mean"] > 0
    assert result["cpu_sec_per_image"]["mean"] > 0
    assert "end to end" in format_table(result)

    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers())
    out = tmp_path / "out" / "face.json"
    args = parser.parse_args(
        [
            "bench",
            "face",
            "--images",
            str(photos),
            "--limit",
            "2",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    written = json.loads(out.read_text())
    assert written["n_images"] == 2 and written["bench"] == "face"


def test_list_images_spreads_and_refuses_empty_folders(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"p{i}").mkdir()
        (tmp_path / f"p{i}" / "a.jpg").write_bytes(b"")
    picked = list_images(tmp_path, 3)
    assert [p.parent.name for p in picked] == ["p0", "p4", "p9"]
    assert len(list_images(tmp_path, 50)) == 10
    with pytest.raises(InvalidArgument, match="no image files"):
        list_images(_empty(tmp_path), 1)
    with pytest.raises(InvalidArgument, match="not a folder"):
        list_images(tmp_path / "absent", 1)
    with pytest.raises(InvalidArgument, match="model-dir"):
        run_face_bench(FaceBenchConfig(images=tmp_path, backend="insightface", progress=False))


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty
