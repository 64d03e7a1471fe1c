"""RunArtifacts: metrics JSON, plots, atomic checkpoints with model fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from veilface.errors import InvalidArgument, VeilfaceError
from veilface.federated.run_artifacts import (
    CheckpointError,
    RunArtifacts,
    arrays_fingerprint,
    load_checkpoint,
)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "backbone.w": rng.normal(size=(4, 3)).astype(np.float32),
        "neck.n": np.array(7, dtype=np.int64),
    }


def test_log_round_writes_json_and_png(tmp_path: Path) -> None:
    art = RunArtifacts(tmp_path / "run", "vireid")
    art.log_round(0, {"rank1": 0.1, "map": 0.05})
    art.log_round(2, {"rank1": 0.3, "map": float("nan")})
    art.log_round(1, {"rank1": 0.2, "map": 0.1})
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert data["task"] == "vireid"
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    assert data["rounds"][1]["rank1"] == pytest.approx(0.2)
    assert data["rounds"][2]["map"] is None  # NaN -> null, still valid JSON
    png = (tmp_path / "run" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # logging a round again replaces it; a resumed run appends to the same file
    art.log_round(2, {"rank1": 0.35})
    again = RunArtifacts(tmp_path / "run", "vireid", plot=False)
    assert [r["rank1"] for r in again.rounds] == pytest.approx([0.1, 0.2, 0.35])
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no temp files left behind


def test_metrics_of_another_task_or_corrupt_refused(tmp_path: Path) -> None:
    RunArtifacts(tmp_path, "pad", plot=False).log_round(1, {"hter": 0.2})
    with pytest.raises(InvalidArgument, match="belongs to task 'pad'"):
        RunArtifacts(tmp_path, "vireid")
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not a veilface metrics file"):
        RunArtifacts(tmp_path, "pad")


def test_checkpoint_roundtrip_and_latest(tmp_path: Path) -> None:
    art = RunArtifacts(tmp_path, "vireid", plot=False)
    arrays = _arrays()
    p1 = art.save_checkpoint(1, arrays, model_id="tiny")
    arrays2 = {k: v + 1 for k, v in arrays.items()}
    art.save_checkpoint(2, arrays2, model_id="tiny")
    assert p1.name == "round_0001.npz"
    back = load_checkpoint(p1, model_id="tiny", expected=arrays)
    assert set(back) == set(arrays)
    np.testing.assert_array_equal(back["backbone.w"], arrays["backbone.w"])
    assert back["neck.n"].shape == () and int(back["neck.n"]) == 7
    latest = load_checkpoint(art.latest_checkpoint)
    np.testing.assert_array_equal(latest["backbone.w"], arrays2["backbone.w"])


def test_the_initial_model_is_never_latest(tmp_path: Path) -> None:
    art = RunArtifacts(tmp_path, "vireid", plot=False)
    p0 = art.save_checkpoint(0, _arrays(), model_id="tiny", latest=False)
    assert p0.is_file() and not art.latest_checkpoint.exists()
    art.save_checkpoint(1, _arrays(), model_id="tiny")
    assert art.latest_checkpoint.is_file()


def test_checkpoint_from_another_model_is_a_clear_error(tmp_path: Path) -> None:
    art = RunArtifacts(tmp_path, "vireid", plot=False)
    path = art.save_checkpoint(1, _arrays(), model_id="vireid-mnv2-w0.25")
    with pytest.raises(CheckpointError, match="from model 'vireid-mnv2-w0.25', not 'vireid-mnv2-w1.0'"):
        load_checkpoint(path, model_id="vireid-mnv2-w1.0")
    other = {"backbone.w": np.zeros((5, 3), np.float32), "neck.n": np.array(1)}
    with pytest.raises(CheckpointError, match=r"does not fit this model.*shape mismatches"):
        load_checkpoint(path, expected=other)
    assert issubclass(CheckpointError, VeilfaceError)


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.npz"
    np.savez(plain, w=np.zeros(3))
    with pytest.raises(CheckpointError, match="no veilface metadata"):
        load_checkpoint(plain)
    art = RunArtifacts(tmp_path / "r", "vireid", plot=False)
    with pytest.raises(InvalidArgument, match="reserved"):
        art.save_checkpoint(1, {"__meta__": np.zeros(1)}, model_id="m")
    with pytest.raises(InvalidArgument, match="at least one array"):
        art.save_checkpoint(1, {}, model_id="m")


def test_fingerprint_depends_on_names_shapes_dtypes() -> None:
    a = _arrays()
    assert arrays_fingerprint(a) == arrays_fingerprint({k: v.copy() for k, v in a.items()})
    assert arrays_fingerprint(a) != arrays_fingerprint({**a, "neck.n": np.array(7, np.int32)})
    assert arrays_fingerprint(a) != arrays_fingerprint({"x": a["backbone.w"], "neck.n": a["neck.n"]})
