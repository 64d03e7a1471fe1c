"""``veilface fed bench``: argument parsing and the task dispatch table (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veilface.cli.fed import BENCH_TASKS
from veilface.cli.main import build_parser


def test_fed_bench_parses_and_dispatches_by_task() -> None:
    args = build_parser().parse_args(
        ["fed", "bench", "--task", "vireid", "--json", "out.json", "--rounds", "2"]
    )
    assert args.task == "vireid" and args.rounds == 2 and str(args.json) == "out.json"
    assert args.local_epochs is None and args.protocol == "camera-isolation"
    assert args.threads == 2 and args.lr is None
    bench, show = BENCH_TASKS["vireid"]
    assert callable(bench) and callable(show)


def test_fed_bench_task_defaults_and_threads_reach_the_configs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from veilface.errors import InvalidArgument
    from veilface.federated.pad import bench as bench_pad
    from veilface.federated.vireid import bench as bench_vireid

    seen: dict[str, object] = {}
    monkeypatch.setattr(bench_vireid, "run_vireid_bench", lambda cfg, progress: seen.update(v=cfg))
    monkeypatch.setattr(bench_pad, "run_pad_bench", lambda cfg, progress: seen.update(p=cfg))
    parser = build_parser()
    BENCH_TASKS["vireid"][0](parser.parse_args(["fed", "bench", "--task", "vireid", "--threads", "1"]))
    v = seen["v"]
    assert isinstance(v, bench_vireid.VIReIDBenchConfig)
    assert (v.rounds, v.local_epochs, v.lr, v.threads) == (20, 0.5, 3e-3, 1)
    assert v.server_momentum == 0.5 and v.proto_source == "global"
    BENCH_TASKS["vireid"][0](
        parser.parse_args(
            ["fed", "bench", "--task", "vireid", "--local-epochs", "1", "--server-momentum", "0",
             "--proto-source", "local"]
        )
    )
    v = seen["v"]
    assert isinstance(v, bench_vireid.VIReIDBenchConfig)
    assert (v.rounds, v.local_epochs, v.server_momentum) == (20, 1.0, 0.0)
    assert v.proto_source == "local"
    BENCH_TASKS["pad"][0](parser.parse_args(["fed", "bench", "--task", "pad"]))
    p = seen["p"]
    assert isinstance(p, bench_pad.PADBenchConfig)
    assert (p.rounds_per_domain, p.local_epochs, p.threads) == (8, 2, 2)
    with pytest.raises(InvalidArgument, match="whole number"):
        BENCH_TASKS["pad"][0](
            parser.parse_args(["fed", "bench", "--task", "pad", "--local-epochs", "0.5"])
        )


def test_fed_bench_refuses_zero_threads(tmp_path: Path) -> None:
    from veilface.errors import InvalidArgument
    from veilface.federated.pad.bench import PADBenchConfig, run_pad_bench
    from veilface.federated.vireid.bench import VIReIDBenchConfig, run_vireid_bench

    with pytest.raises(InvalidArgument, match="threads"):
        run_vireid_bench(VIReIDBenchConfig(lfw_dir="x", work_dir=str(tmp_path), threads=0))
    with pytest.raises(InvalidArgument, match="server_momentum"):
        run_vireid_bench(VIReIDBenchConfig("x", str(tmp_path), server_momentum=1.5))
    with pytest.raises(InvalidArgument, match="proto_source"):
        run_vireid_bench(VIReIDBenchConfig("x", str(tmp_path), proto_source="server"))
    with pytest.raises(InvalidArgument, match="threads"):
        run_pad_bench(
            PADBenchConfig(lfw_dir="x", samples_dir="y", work_dir=str(tmp_path), threads=0)
        )


def test_fed_bench_rejects_unknown_task_and_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["fed", "bench", "--task", "reid"])
    with pytest.raises(SystemExit):
        parser.parse_args(["fed", "bench", "--task", "vireid", "--protocol", "everyone"])
    assert "invalid choice" in capsys.readouterr().err


def test_site_seconds_sum_the_rounds_of_run_json(tmp_path: Path) -> None:
    from veilface.federated.vireid.bench import _site_seconds

    rounds = {"1": {"train-seconds": 2.0, "proto-seconds": 0.5}, "2": {"train-seconds": 3.0}}
    (tmp_path / "run.json").write_text(json.dumps({"train_metrics": rounds}))
    assert _site_seconds(tmp_path, 4) == {"train": 20.0, "proto": 2.0}
    assert _site_seconds(tmp_path / "missing", 4) == {}
