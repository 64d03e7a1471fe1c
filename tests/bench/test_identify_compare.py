"""``bench identify --compare-db`` / ``--compare-scoring`` at a tiny gallery: both runs, one invocation, ratios.

Not a measurement (the machine is shared): the figures' values are not
judged, only that both backends ran the same gallery and queries, answered
them, and that the ratios are those of the runs' figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres_server import TestPostgres
from veilface.bench.identify import BenchConfig, run_identify_bench
from veilface.bench.identify_compare import FIGURES, compare
from veilface.errors import InvalidArgument

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _tiny(**kw: object) -> BenchConfig:
    return BenchConfig(gallery=200, queries=8, single=4, mode="routed", progress=False, **kw)  # type: ignore[arg-type]


def _check_pair(result: dict[str, object], labels: list[str]) -> None:
    runs = result["runs"]
    assert isinstance(runs, dict) and list(runs) == labels
    for run in runs.values():
        assert run["gallery"] == 200 and run["queries"] == 8
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert run["rank1_encrypted"] >= 0.75  # the encrypted search works on both
    ratios = result["ratios"][labels[1]]  # type: ignore[index]
    assert ratios["p50_ms"] == pytest.approx(runs[labels[1]]["p50_ms"] / runs[labels[0]]["p50_ms"])
    assert ratios["enroll_bulk_per_s"] == pytest.approx(
        runs[labels[0]]["enroll_bulk_per_s"] / runs[labels[1]]["enroll_bulk_per_s"]
    )
    assert isinstance(result["within_target"], bool)


def test_compare_db_sqlite_and_postgresql(postgres: TestPostgres, tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    result = run_identify_bench(_tiny(db=postgres.url, compare_db=("sqlite", "postgresql")))
    _check_pair(result, ["sqlite", "postgresql"])
    assert result["target"]["max_slowdown"] == 1.25  # type: ignore[index]
    assert {r["store"] for r in result["runs"].values()} == {"sqlite", "postgresql"}  # type: ignore[union-attr]
    out.write_text(json.dumps(result))
    # the bench's scratch schema is gone: the database holds no bench tables
    import psycopg

    with psycopg.connect(postgres.url) as conn:
        left = conn.execute(
            b"SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'veilface_bench_%'"
        ).fetchone()
    assert left is not None and left[0] == 0


def test_compare_scoring_local_and_ray_from_the_cli(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="pip install 'veilface[ray]'")
    out = tmp_path / "cmp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "veilface.cli.main", "bench", "identify", "--gallery", "200",
         "--queries", "8", "--single", "4", "--mode", "routed", "--no-progress",
         "--compare-scoring", "local,ray", "--json", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray/local" in proc.stdout and "target <= 1.5x" in proc.stdout
    result = json.loads(out.read_text())
    _check_pair(result, ["local", "ray"])
    assert result["target"] == {"max_slowdown": 1.5, "figures": ["p50_ms"]}


def test_compare_needs_two_known_backends_and_not_both_kinds() -> None:
    with pytest.raises(InvalidArgument):
        run_identify_bench(_tiny(compare_db=("sqlite",)))
    with pytest.raises(InvalidArgument):
        run_identify_bench(_tiny(compare_scoring=("local", "spark")))
    with pytest.raises(InvalidArgument):
        run_identify_bench(_tiny(compare_db=("sqlite", "postgresql"), compare_scoring=("local", "ray")))
    with pytest.raises(InvalidArgument, match="needs --db postgresql"):
        run_identify_bench(_tiny(compare_db=("sqlite", "postgresql")))


def test_ratios_are_slowdowns() -> None:
    base = {name: 10.0 for name, _ in FIGURES}
    slow = {name: (20.0 if is_time else 5.0) for name, is_time in FIGURES}
    result = compare("scoring", {"local": base, "ray": slow})
    assert all(v == pytest.approx(2.0) for v in result["ratios"]["ray"].values())
    assert result["worst_slowdown"] == pytest.approx(2.0) and result["within_target"] is False
