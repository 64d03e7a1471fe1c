"""``bench identify`` reports CPU time per template searched and the server's memory.

Not a measurement: only that the keys exist, are positive and consistent
(server part <= the whole, a server of a few hundred MiB, not zero).
"""

from __future__ import annotations

import os

import psutil
import pytest

from veilface.bench.cpu import client_cpu, tree_cpu, tree_rss_mb
from veilface.bench.identify import BenchConfig, format_table, run_identify_bench

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_strict_run_reports_cpu_per_template_and_server_rss() -> None:
    cfg = BenchConfig(gallery=300, queries=6, single=2, mode="strict", k=0, progress=False)
    result = run_identify_bench(cfg)
    whole, server = result["us_per_template_core"], result["server_us_per_template_core"]
    assert 0 < server <= whole
    assert 20 < result["server_rss_mb"] < 8192
    assert "CPU us per template searched" in format_table(result)


def test_cpu_helpers_count_a_process_tree() -> None:
    me = os.getpid()
    busy = sum(i * i for i in range(200_000))  # some CPU in this process
    assert busy > 0
    assert tree_cpu(me) > 0
    assert tree_rss_mb(me) > 10
    # with this process as "the server", the client part is only its other children
    assert client_cpu(me) >= 0
    assert psutil.Process(me).is_running()
