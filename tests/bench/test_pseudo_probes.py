"""``veilface bench pseudo-probes``: real second photos against the tuner's pseudo-probes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from veilface.bench.pseudo_probes import format_report, run_pseudo_probe_check
from veilface.bench.synthetic import SyntheticFaces
from veilface.cli.main import main
from veilface.errors import InvalidArgument


def _npz(path: Path, people: int) -> Path:
    emb, labels = SyntheticFaces().sample(people, 2, seed=7)
    np.savez(path, emb=emb, labels=labels)
    return path


def _pairs(people: int) -> tuple[np.ndarray, list[str]]:
    emb, labels = SyntheticFaces().sample(people, 2, seed=7)
    return emb, [str(x) for x in labels]


def test_the_report_compares_real_and_pseudo_probes(tmp_path: Path) -> None:
    report = run_pseudo_probe_check(*_pairs(1500), nlist=8)
    assert report.gallery == report.probes == 1500 and report.nlist == 8
    real, tuner, origin = (report.sets[k] for k in ("real second photos", "pseudo-probes (tuner)", "origin draw (before)"))
    for s in (real, tuner, origin):
        recalls = list(s.recall_by_nprobe.values())
        assert recalls == sorted(recalls) and 0.0 < recalls[0] <= recalls[-1] == 1.0  # all 8 lists probed
    # the tuner's probes are as near to other people as real ones; the old draw was farther
    assert abs(tuner.impostor_cosine - real.impostor_cosine) < 0.01
    assert origin.impostor_cosine < real.impostor_cosine - 0.02
    assert "pseudo-probes (tuner)" in format_report(report)


def test_cli_writes_json_and_refuses_a_file_without_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "pseudo-probes", "--embeddings", str(_npz(tmp_path / "e.npz", 400)),
                 "--nlist", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["sets"]["real second photos"]["recall_by_nprobe"]
    assert "real second photos" in capsys.readouterr().out
    emb, labels = SyntheticFaces().sample(300, 1, seed=1)
    with pytest.raises(InvalidArgument, match="two photos"):
        run_pseudo_probe_check(emb, list(labels))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    assert main(["bench", "pseudo-probes", "--embeddings", str(junk)]) != 0
    assert "expected an npz" in capsys.readouterr().err
