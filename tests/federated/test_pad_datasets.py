"""PAD loaders on small fixtures built in each data set's real layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veilface.errors import InvalidArgument
from veilface.federated.pad.datasets import (
    DatasetLayoutError,
    LabelMismatchError,
    load_casia_fasd,
    load_celeba_spoof,
    load_msu_mfsd,
    load_oulu_npu,
    load_replay_attack,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0")
    return path


# ---------------------------------------------------------------- OULU-NPU


def _oulu(root: Path) -> Path:
    users = {"Train": ("01", "02"), "Dev": ("21",), "Test": ("36", "37")}
    proto = root / "Protocols" / "Protocol_1"
    proto.mkdir(parents=True)
    for stem, us in users.items():
        lines = []
        for u in us:
            for f, lab in ((1, "+1"), (2, "-1"), (4, "-2")):
                name = f"1_1_{u}_{f}"
                _touch(root / f"{stem}_files" / f"{name}.avi")
                lines.append(f"{lab},{name}")
        (proto / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_oulu_npu_protocol_1(tmp_path: Path) -> None:
    splits = load_oulu_npu(_oulu(tmp_path))
    assert len(splits.train) == 6 and len(splits.dev) == 3 and len(splits.test) == 6
    assert [s.species for s in splits.train[:3]] == ["live", "print", "replay"]
    assert [s.label for s in splits.train[:3]] == [1, 0, 0]
    assert splits.test[0].subject == "36" and splits.test[0].path.suffix == ".avi"


def test_oulu_npu_label_disagrees_with_file_code(tmp_path: Path) -> None:
    root = _oulu(tmp_path)
    dev = root / "Protocols" / "Protocol_1" / "Dev.txt"
    dev.write_text(dev.read_text().replace("+1,1_1_21_1", "-1,1_1_21_1"))
    with pytest.raises(LabelMismatchError, match="file code"):
        load_oulu_npu(root)


def test_oulu_npu_missing_video_and_bad_protocol(tmp_path: Path) -> None:
    root = _oulu(tmp_path)
    (root / "Test_files" / "1_1_37_4.avi").unlink()
    with pytest.raises(LabelMismatchError, match="does not exist"):
        load_oulu_npu(root)
    with pytest.raises(DatasetLayoutError, match="Protocol_2"):
        load_oulu_npu(root, protocol=2)


# ---------------------------------------------------------------- CASIA-FASD

_CASIA = ("1", "2", "3", "4", "5", "6", "7", "8", "HR_1", "HR_2", "HR_3", "HR_4")


def _casia(root: Path) -> Path:
    for release, subjects in (("train_release", ("1", "2")), ("test_release", ("1",))):
        for s in subjects:
            for v in _CASIA:
                _touch(root / release / s / f"{v}.avi")
    return root


def test_casia_fasd(tmp_path: Path) -> None:
    splits = load_casia_fasd(_casia(tmp_path))
    assert len(splits.train) == 24 and len(splits.test) == 12 and not splits.dev
    by_name = {s.path.stem: s.species for s in splits.test}
    assert by_name["HR_1"] == "live" and by_name["HR_3"] == "print" and by_name["8"] == "replay"
    assert sum(s.label for s in splits.train) == 6


def test_casia_fasd_missing_video(tmp_path: Path) -> None:
    root = _casia(tmp_path)
    (root / "train_release" / "2" / "HR_4.avi").unlink()
    with pytest.raises(DatasetLayoutError, match="HR_4"):
        load_casia_fasd(root)
    with pytest.raises(DatasetLayoutError, match="missing folder"):
        load_casia_fasd(tmp_path / "nope")


# ---------------------------------------------------------------- Replay-Attack


def _replay(root: Path) -> Path:
    for folder in ("train", "devel", "test"):
        _touch(root / folder / "real" / "client001_session01_webcam_authenticate_adverse_1.mov")
        _touch(
            root
            / folder
            / "attack"
            / "fixed"
            / "attack_print_client001_session01_highdef_photo_adverse.mov"
        )
        _touch(
            root
            / folder
            / "attack"
            / "hand"
            / "attack_mobile_client001_session01_mobile_video_controlled.mov"
        )
    return root


def test_replay_attack(tmp_path: Path) -> None:
    splits = load_replay_attack(_replay(tmp_path))
    assert [s.species for s in splits.dev] == ["live", "print", "replay"]
    assert all(s.subject == "001" for s in splits.all())


def test_replay_attack_real_video_in_attack_folder(tmp_path: Path) -> None:
    root = _replay(tmp_path)
    _touch(
        root
        / "test"
        / "attack"
        / "fixed"
        / "client002_session01_webcam_authenticate_controlled_2.mov"
    )
    with pytest.raises(LabelMismatchError, match="real video inside attack"):
        load_replay_attack(root)


# ---------------------------------------------------------------- MSU-MFSD


def _msu(root: Path) -> Path:
    for c in ("002", "003"):
        _touch(root / "scene01" / "real" / f"real_client{c}_android_SD_scene01.mp4")
        _touch(
            root / "scene01" / "attack" / f"attack_client{c}_laptop_SD_printed_photo_scene01.mov"
        )
        _touch(root / "scene01" / "attack" / f"attack_client{c}_android_SD_ipad_video_scene01.mp4")
    (root / "train_sub_list.txt").write_text("002\n")
    (root / "test_sub_list.txt").write_text("003\n")
    return root


def test_msu_mfsd(tmp_path: Path) -> None:
    splits = load_msu_mfsd(_msu(tmp_path))
    assert {s.subject for s in splits.train} == {"002"} and len(splits.test) == 3
    assert sorted(s.species for s in splits.test) == ["live", "print", "replay"]


def test_msu_mfsd_lists_disagree_with_videos(tmp_path: Path) -> None:
    root = _msu(tmp_path)
    (root / "test_sub_list.txt").write_text("003\n009\n")
    with pytest.raises(LabelMismatchError, match="009"):
        load_msu_mfsd(root)
    (root / "test_sub_list.txt").write_text("002\n003\n")
    with pytest.raises(LabelMismatchError, match="both"):
        load_msu_mfsd(root)


# ---------------------------------------------------------------- CelebA-Spoof


def _attrs(spoof_type: int, label: int) -> list[int]:
    return [0] * 40 + [spoof_type, 0, 0, label]


def _celeba(root: Path) -> Path:
    for split in ("train", "test"):
        entries = {
            f"Data/{split}/10/live/000001.jpg": _attrs(0, 0),
            f"Data/{split}/10/spoof/000002.png": _attrs(8, 1),
            f"Data/{split}/11/spoof/000003.png": _attrs(3, 1),
        }
        for rel in entries:
            _touch(root / rel)
        meta = root / "metas" / "intra_test" / f"{split}_label.json"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(entries))
    return root


def test_celeba_spoof(tmp_path: Path) -> None:
    splits = load_celeba_spoof(_celeba(tmp_path))
    assert [s.species for s in splits.train] == ["live", "replay", "print"]
    assert [s.label for s in splits.test] == [1, 0, 0]


def test_celeba_spoof_label_mismatch_and_unlabelled(tmp_path: Path) -> None:
    root = _celeba(tmp_path)
    meta = root / "metas" / "intra_test" / "train_label.json"
    data = json.loads(meta.read_text())
    data["Data/train/10/live/000001.jpg"] = _attrs(1, 1)
    meta.write_text(json.dumps(data))
    with pytest.raises(LabelMismatchError, match="disagree"):
        load_celeba_spoof(root)
    _celeba(root)  # restore
    _touch(root / "Data" / "test" / "12" / "live" / "000009.jpg")
    with pytest.raises(LabelMismatchError, match="no entry"):
        load_celeba_spoof(root)


def test_errors_are_veilface_errors() -> None:
    assert issubclass(LabelMismatchError, DatasetLayoutError)
    assert issubclass(DatasetLayoutError, InvalidArgument)
