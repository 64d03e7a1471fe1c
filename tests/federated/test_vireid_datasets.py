"""SYSU-MM01, RegDB and LLCM loaders on tiny fixture trees in the real layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from veilface.errors import InvalidArgument
from veilface.federated.vireid.datasets import (
    DatasetLayoutError,
    LabelMismatchError,
    load_llcm,
    load_regdb,
    load_sysu_mm01,
    relabel,
    sample_arrays,
    split_query_gallery,
    sysu_query_gallery,
)


def _image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (value, value, value)).save(path)


# --------------------------------------------------------------------------- SYSU-MM01

# camera -> {pid: number of images}
SYSU_TREE = {
    1: {1: 2, 2: 2, 4: 2, 5: 2},
    2: {4: 3, 5: 3},
    3: {1: 2, 4: 2, 5: 1},
    4: {3: 1, 4: 2},
    5: {},
    6: {2: 2, 3: 1, 5: 2},
}
SYSU_IDS = {"train": "1,2", "val": "3", "test": "4,5\n"}


def make_sysu(root: Path) -> Path:
    for cam, people in SYSU_TREE.items():
        (root / f"cam{cam}").mkdir(parents=True)
        for pid, n in people.items():
            for k in range(1, n + 1):
                _image(root / f"cam{cam}" / f"{pid:04d}" / f"{k:04d}.jpg", 10 * k)
    (root / "exp").mkdir()
    for name, ids in SYSU_IDS.items():
        (root / "exp" / f"{name}_id.txt").write_text(ids)
    return root


@pytest.fixture
def sysu(tmp_path: Path) -> Path:
    return make_sysu(tmp_path / "SYSU-MM01")


def test_sysu_parses_splits_cameras_and_modalities(sysu: Path) -> None:
    splits = load_sysu_mm01(sysu)
    assert {s.pid for s in splits.train} == {1, 2}
    assert {s.pid for s in splits.val} == {3}
    assert {s.pid for s in splits.test} == {4, 5}
    total = sum(n for people in SYSU_TREE.values() for n in people.values())
    assert len(splits.train) + len(splits.val) + len(splits.test) == total
    for s in splits.train + splits.val + splits.test:
        assert s.path.is_file() and s.path.is_absolute()
        assert s.path.parent.name == f"{s.pid:04d}"
        assert s.path.parent.parent.name == f"cam{s.camid}"
        assert s.modality == ("infrared" if s.camid in (3, 6) else "visible")
    pids, cams = sample_arrays(splits.test)
    assert (
        pids.dtype == np.int64
        and pids.shape == (len(splits.test),)
        and set(cams) == {1, 2, 3, 4, 6}
    )
    assert relabel(splits.train) == {1: 0, 2: 1}


def test_sysu_query_gallery_protocol(sysu: Path) -> None:
    test = load_sysu_mm01(sysu).test
    query, gallery = sysu_query_gallery(test, mode="all", shots=1, trial=0)
    assert {(s.camid, s.pid) for s in query} == {(3, 4), (3, 5), (6, 5)}
    assert len(query) == 2 + 1 + 2
    # single shot: one image per (person, visible camera)
    assert sorted((s.pid, s.camid) for s in gallery) == [(4, 1), (4, 2), (4, 4), (5, 1), (5, 2)]
    _, indoor = sysu_query_gallery(test, mode="indoor", shots=1, trial=0)
    assert {s.camid for s in indoor} == {1, 2}
    _, multi = sysu_query_gallery(test, mode="all", shots=10, trial=0)
    assert len(multi) == 2 + 3 + 2 + 2 + 3  # every image when a camera has fewer than 10
    # trials draw reproducibly, and differently
    draws = {tuple(str(s.path) for s in sysu_query_gallery(test, trial=t)[1]) for t in range(8)}
    assert len(draws) > 1
    assert sysu_query_gallery(test, trial=3)[1] == sysu_query_gallery(test, trial=3)[1]
    with pytest.raises(InvalidArgument):
        sysu_query_gallery(test, mode="outdoor")


def test_sysu_missing_camera_folder(sysu: Path) -> None:
    shutil.rmtree(sysu / "cam5")
    with pytest.raises(DatasetLayoutError, match="cam5") as err:
        load_sysu_mm01(sysu)
    assert "SYSU-MM01 layout expected" in str(err.value)


def test_sysu_missing_root_and_id_file(tmp_path: Path, sysu: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="missing folder"):
        load_sysu_mm01(tmp_path / "nowhere")
    (sysu / "exp" / "val_id.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="val_id.txt"):
        load_sysu_mm01(sysu)


def test_sysu_malformed_id_file(sysu: Path) -> None:
    (sysu / "exp" / "test_id.txt").write_text("4,five")
    with pytest.raises(DatasetLayoutError, match="'five' is not a person id"):
        load_sysu_mm01(sysu)


def test_sysu_person_folder_not_in_lists(sysu: Path) -> None:
    _image(sysu / "cam2" / "0009" / "0001.jpg")
    with pytest.raises(LabelMismatchError, match="0009"):
        load_sysu_mm01(sysu)


def test_sysu_listed_person_without_images(sysu: Path) -> None:
    (sysu / "exp" / "test_id.txt").write_text("4,5,7")
    with pytest.raises(LabelMismatchError, match="0007 \\(test\\)"):
        load_sysu_mm01(sysu)


def test_sysu_person_in_two_splits(sysu: Path) -> None:
    (sysu / "exp" / "val_id.txt").write_text("3,4")
    with pytest.raises(LabelMismatchError, match="0004 is listed in both"):
        load_sysu_mm01(sysu)


def test_sysu_bad_person_folder_name(sysu: Path) -> None:
    _image(sysu / "cam1" / "extra" / "0001.jpg")
    with pytest.raises(DatasetLayoutError, match="4-digit"):
        load_sysu_mm01(sysu)


# --------------------------------------------------------------------------- RegDB


def make_regdb(root: Path, trial: int = 1) -> Path:
    idx = root / "idx"
    idx.mkdir(parents=True)
    lists: dict[str, list[str]] = {}
    for split, folders in (("train", (1, 2)), ("test", (3,))):
        for kind, short, tag in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
            lines = []
            for label, folder in enumerate(folders, start=0 if split == "train" else 10):
                for k in (1, 2):
                    rel = f"{short}/{folder}/female_back_{tag}_{k:05d}_{folder}.bmp"
                    _image(root / rel, k)
                    lines.append(f"{rel} {label}")
            lists[f"{split}_{kind}_{trial}.txt"] = lines
    for name, lines in lists.items():
        (idx / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def regdb(tmp_path: Path) -> Path:
    return make_regdb(tmp_path / "RegDB")


def test_regdb_parses_lists(regdb: Path) -> None:
    splits = load_regdb(regdb, trial=1)
    assert splits.val == []
    assert len(splits.train) == 8 and len(splits.test) == 4
    assert {(s.pid, s.camid, s.modality) for s in splits.train} == {
        (0, 1, "visible"),
        (1, 1, "visible"),
        (0, 2, "infrared"),
        (1, 2, "infrared"),
    }
    assert all(s.path.suffix == ".bmp" and s.path.is_file() for s in splits.train)
    query, gallery = split_query_gallery(splits.test, query_modality="infrared")
    assert {s.modality for s in query} == {"infrared"} and {s.modality for s in gallery} == {
        "visible"
    }
    assert len(gallery) == 2  # RegDB protocol: the whole gallery, no sampling


def _rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


def test_regdb_missing_folder_and_list(regdb: Path) -> None:
    (regdb / "idx" / "test_thermal_1.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="test_thermal_1.txt") as err:
        load_regdb(regdb)
    assert "RegDB layout expected" in str(err.value)
    with pytest.raises(DatasetLayoutError, match="train_visible_2.txt"):
        load_regdb(regdb, trial=2)
    shutil.rmtree(regdb / "Thermal")
    with pytest.raises(DatasetLayoutError, match="Thermal"):
        load_regdb(regdb)
    with pytest.raises(InvalidArgument, match="1..10"):
        load_regdb(regdb, trial=11)


def test_regdb_listed_image_missing(regdb: Path) -> None:
    (regdb / "Visible" / "2" / "female_back_v_00002_2.bmp").unlink()
    with pytest.raises(
        LabelMismatchError, match="train_visible_1.txt:4: listed image .* does not exist"
    ):
        load_regdb(regdb)


def test_regdb_labels_disagree_with_person_folders(regdb: Path) -> None:
    _rewrite(
        regdb / "idx" / "train_thermal_1.txt",
        "Thermal/1/female_back_t_00002_1.bmp 0",
        "Thermal/1/female_back_t_00002_1.bmp 1",
    )
    with pytest.raises(LabelMismatchError, match="label 1 is given to images of person folders"):
        load_regdb(regdb)


def test_regdb_malformed_line_and_wrong_modality_folder(regdb: Path) -> None:
    lst = regdb / "idx" / "train_visible_1.txt"
    original = lst.read_text()
    lst.write_text(original + "Visible/1/female_back_v_00001_1.bmp\n")
    with pytest.raises(DatasetLayoutError, match="expected '<relative path> <integer label>'"):
        load_regdb(regdb)
    lst.write_text(
        original.replace(
            "Visible/1/female_back_v_00001_1.bmp", "Thermal/1/female_back_t_00001_1.bmp"
        )
    )
    with pytest.raises(DatasetLayoutError, match="should be under Visible/"):
        load_regdb(regdb)


def test_regdb_person_in_train_and_test(regdb: Path) -> None:
    with (regdb / "idx" / "test_visible_1.txt").open("a") as f:
        f.write("Visible/1/female_back_v_00001_1.bmp 11\n")
    with pytest.raises(LabelMismatchError, match="both the train and the test lists"):
        load_regdb(regdb)


# --------------------------------------------------------------------------- LLCM


def make_llcm(root: Path) -> Path:
    idx = root / "idx"
    idx.mkdir(parents=True)
    spec = {
        "train_vis.txt": [("vis", 1, 2, 0), ("vis", 2, 3, 1)],
        "train_nir.txt": [("nir", 1, 6, 0), ("nir", 2, 7, 1)],
        "test_vis.txt": [("test_vis", 3, 2, 3)],
        "test_nir.txt": [("test_nir", 3, 6, 3)],
    }
    for name, rows in spec.items():
        lines = []
        for folder, pid, cam, label in rows:
            suffix = "nir" if "nir" in folder else "vis"
            for frame in (10, 20):
                rel = f"{folder}/{pid:04d}/{pid:04d}_c{cam:02d}_s185535_f{frame}_{suffix}.jpg"
                _image(root / rel, frame)
                lines.append(f"{rel} {label}")
        (idx / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def llcm(tmp_path: Path) -> Path:
    return make_llcm(tmp_path / "LLCM")


def test_llcm_parses_lists(llcm: Path) -> None:
    splits = load_llcm(llcm)
    assert len(splits.train) == 8 and len(splits.test) == 4 and splits.val == []
    assert {(s.pid, s.camid, s.modality) for s in splits.train} == {
        (0, 2, "visible"),
        (1, 3, "visible"),
        (0, 6, "infrared"),
        (1, 7, "infrared"),
    }
    assert {s.path.parts[-3] for s in splits.test} == {"test_vis", "test_nir"}
    query, gallery = split_query_gallery(splits.test, query_modality="visible", shots=1, trial=1)
    assert len(query) == 2 and len(gallery) == 1 and gallery[0].modality == "infrared"


def test_llcm_missing_idx(llcm: Path) -> None:
    shutil.rmtree(llcm / "idx")
    with pytest.raises(DatasetLayoutError, match="idx") as err:
        load_llcm(llcm)
    assert "LLCM layout expected" in str(err.value)


def test_llcm_listed_image_missing(llcm: Path) -> None:
    (llcm / "test_nir" / "0003" / "0003_c06_s185535_f20_nir.jpg").unlink()
    with pytest.raises(LabelMismatchError, match="test_nir.txt:2"):
        load_llcm(llcm)


def test_llcm_file_name_without_camera(llcm: Path) -> None:
    old = llcm / "vis" / "0001" / "0001_c02_s185535_f10_vis.jpg"
    old.rename(llcm / "vis" / "0001" / "0001_s185535_f10_vis.jpg")
    _rewrite(
        llcm / "idx" / "train_vis.txt", "0001_c02_s185535_f10_vis.jpg", "0001_s185535_f10_vis.jpg"
    )
    with pytest.raises(DatasetLayoutError, match="no camera"):
        load_llcm(llcm)


def test_llcm_labels_disagree_with_person_folders(llcm: Path) -> None:
    _rewrite(llcm / "idx" / "train_nir.txt", "f20_nir.jpg 0", "f20_nir.jpg 5")
    with pytest.raises(LabelMismatchError, match="person folder '0001' has labels 0 and 5"):
        load_llcm(llcm)
