"""``bench identify --concurrency C``: C client processes at once, qps and latencies under load.

Not a measurement (the machine is shared): only that the keys exist, qps is
positive, and the answers are those of one client at a time (the same
gallery, probes and hit rate).
"""

from __future__ import annotations

import math

import pytest

from veilface.bench.identify import BenchConfig, format_table, run_identify_bench

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _cfg(concurrency: int) -> BenchConfig:
    return BenchConfig(
        gallery=200, queries=8, single=2, mode="strict", k=0, progress=False, concurrency=concurrency
    )


def test_two_clients_at_once_report_qps_and_keep_the_hit_rate() -> None:
    one, two = run_identify_bench(_cfg(1)), run_identify_bench(_cfg(2))
    for r, c in ((one, 1), (two, 2)):
        assert r["concurrency"] == c and r["qps"] > 0 and math.isfinite(r["qps"])
        for key in ("p50_ms", "p95_ms", "hit_rate", "rank1_encrypted", "us_per_template_core"):
            assert key in r
        assert r["queries"] == 8
    assert two["p50_ms"] > 0 and two["p95_ms"] >= two["p50_ms"]
    # exact search (k = 0): the same top-1 for every probe, however many clients ask at once
    assert two["hit_rate"] == one["hit_rate"] == 1.0
    assert two["rank1_encrypted"] == one["rank1_encrypted"]
    assert two["us_per_template_core"] > 0  # the clients' own CPU is counted too
    assert "queries per second (clients at once)" in format_table(two)
    assert "(2)" in format_table(two)
