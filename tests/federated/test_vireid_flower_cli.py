"""``veilface fed bench``: argument parsing and the task dispatch table (no training)."""

from __future__ import annotations

import pytest

from veilface.cli.fed import BENCH_TASKS
from veilface.cli.main import build_parser


def test_fed_bench_parses_and_dispatches_by_task() -> None:
    args = build_parser().parse_args(
        ["fed", "bench", "--task", "vireid", "--json", "out.json", "--rounds", "2"]
    )
    assert args.task == "vireid" and args.rounds == 2 and str(args.json) == "out.json"
    assert args.local_epochs == 2 and args.protocol == "camera-isolation"
    bench, show = BENCH_TASKS["vireid"]
    assert callable(bench) and callable(show)


def test_fed_bench_rejects_unknown_task_and_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["fed", "bench", "--task", "reid"])
    with pytest.raises(SystemExit):
        parser.parse_args(["fed", "bench", "--task", "vireid", "--protocol", "everyone"])
    assert "invalid choice" in capsys.readouterr().err
