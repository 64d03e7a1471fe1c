"""``veilface bench chaos``: its judgements hold (fast), and a small run end to end (slow)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from veilface.bench.chaos_bombs import (
    ContextParts,
    crafted_context,
    galois_element,
    stuffed_context,
)
from veilface.bench.chaos_fuzz import (
    FAILING_CORRUPTIONS,
    Call,
    Case,
    Expect,
    FuzzStats,
    all_rpcs,
    corrupt,
    execute,
    message_class,
)
from veilface.bench.chaos_generic import malformed_bytes
from veilface.bench.chaos_target import ChaosServer, RawResult, call_unary, summarize_log
from veilface.bench.chaos_world import KeySet
from veilface.client.tenant_state import TenantState
from veilface.crypto import seal_io
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import InvalidCiphertext

KEYS = (
    "fuzz_rpcs", "crashes", "hangs", "internal_errors", "unexpected_successes", "status_counts",
    "peak_rss_mb", "rss_before_mb", "memory_bomb_rss_growth_mb", "legit_p50_quiet_ms",
    "legit_p50_under_attack_ms", "exact_after_fuzz", "kills", "acknowledged", "lost", "duplicates",
    "partial_bulk_visible", "generators", "methods", "seed",
)


@pytest.fixture(scope="module")
def key() -> KeySet:
    state = TenantState.new("chaos-t", dim=128)
    zeros = np.zeros((1, 128), dtype=np.float32)
    return KeySet("t.k1", "chaos-t", "tok", state, [], zeros, zeros)


def test_malformed_bytes_never_parse() -> None:
    """What the fuzzer sends as "not a message" is refused by protobuf itself, for every RPC."""
    rng = np.random.default_rng(0)
    for rpc in all_rpcs():
        for _ in range(20):
            with pytest.raises(DecodeError):
                message_class(rpc.input)().ParseFromString(malformed_bytes(rng, rpc.input)[1])


def test_failing_corruptions_never_load(key: KeySet) -> None:
    """A ciphertext corrupted the "must fail" ways cannot be loaded by any server."""
    crypto = TenantCrypto(key.state.keys())
    good = crypto.encrypt_probe(np.ones(128) / np.sqrt(128))[0]
    seal_io.load_ciphertext(key.state.keys().context, good)
    rng = np.random.default_rng(1)
    for kind in FAILING_CORRUPTIONS:
        for _ in range(5):
            with pytest.raises(InvalidCiphertext):
                seal_io.load_ciphertext(key.state.keys().context, corrupt(rng, good, kind))


def test_galois_elements_and_zero_keys_match_seal(key: KeySet) -> None:
    keys = key.state.keys()
    tool = keys.context.key_context_data().galois_tool()
    for step in (1, 2, 16, 112, 2047, -1, -16):
        assert galois_element(step, 4096) == tool.get_elt_from_step(step)
    ctx = keys.public_context_bytes()
    steps = keys.layout.key_steps
    exact = ContextParts.parse(crafted_context(key, ctx, steps=steps)).sections["galois_keys"]
    loaded = seal_io.load_galois_keys(keys.context, exact)
    assert all(loaded.has_key(tool.get_elt_from_step(s)) for s in steps)
    bomb = stuffed_context(key, ctx, keys=4096)
    assert len(bomb) < 2 * 1024 * 1024  # under 2 MB on the wire ...
    parts = ContextParts.parse(bomb)
    assert parts.sections["params"] == ContextParts.parse(ctx).sections["params"]
    # ... and 4,096 keys (512 MiB) once loaded: checked by size, not loaded here.
    assert parts.sections["galois_keys"][:2] == b"\x5e\xa1"


def test_verdicts() -> None:
    stats = FuzzStats()
    fail, any_ = Expect.FAIL, Expect.ANY
    path = "/veilface.v1.Identification/Preselect"
    stats.record("g", Call(path, b"", None, fail), RawResult("OK", "", 0.1))
    stats.record("g", Call(path, b"", None, any_), RawResult("OK", "", 0.1))
    stats.record("g", Call(path, b"", None, any_), RawResult("INTERNAL", "x", 0.1))
    stats.record("g", Call(path, b"", None, fail), RawResult("DEADLINE_EXCEEDED", "", 60))
    stats.record("cut", Call(path, [b""], None, fail, cut="raise"), RawResult("UNKNOWN", "", 0.1))
    stats.record("cut", Call(path, [b""], None, fail, cut="raise", absent=(("t", "h"),)),
                 RawResult("CANCELLED", "", 0.1))
    assert stats.totals() == {"internal_errors": 1, "unexpected_successes": 1, "hangs": 1}
    assert stats.status["CLIENT_CUT"] == 2 and stats.methods["Preselect"].rpcs == 6
    assert len(stats.pending_absent) == 1
    stats.mark_visible("cut", path, "1/1 visible")
    assert stats.totals()["unexpected_successes"] == 2


def test_plan_covers_every_method_each_round() -> None:
    from veilface.bench.chaos import plan

    rpcs = all_rpcs()
    it = plan(3, rpcs)
    first = [next(it) for _ in range(len(rpcs))]
    assert {item[0].path for item in first} == {r.path for r in rpcs}
    again = plan(3, rpcs)
    assert [(i[0].path, i[1]) for i in first] == [(i[0].path, i[1]) for i in (next(again) for _ in rpcs)]


def test_log_summary(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "2026 ERROR veilface.server.errors_map: request ab12 failed in EnrollmentServicer.FetchBin\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
        "OverflowError: Python int too large to convert to SQLite INTEGER\n"
        "2026 ERROR veilface.server.errors_map: request cd34 failed in EnrollmentServicer.FetchBin\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "OverflowError: Python int too large to convert to SQLite INTEGER\n"
    )
    assert summarize_log(log) == [{
        "where": "EnrollmentServicer.FetchBin",
        "exception": "OverflowError: Python int too large to convert to SQLite INTEGER",
        "count": 2,
    }]


def test_a_dead_server_is_restarted_and_counted(tmp_path: Path) -> None:
    srv = ChaosServer(tmp_path / "c.db", workers=1, log_path=tmp_path / "server.log")
    srv.start()
    try:
        srv.kill()  # as if it crashed
        stats = FuzzStats()
        method = "/veilface.v1.Tenants/DescribeTenant"
        execute(srv, stats, Case("g", [Call(method, b"", None, Expect.FAIL, timeout_s=10)]))
        assert stats.status["UNAVAILABLE"] == 1
        assert srv.crashes == 1 and srv.alive() and srv.rss_mb() > 0
        res = call_unary(srv.channel()[0], method, b"", auth=None, timeout_s=10)
        assert res.status == "UNAUTHENTICATED"
    finally:
        srv.stop()
    assert (tmp_path / "server.log").read_text()  # the server's stderr went to the log


@pytest.mark.slow
def test_chaos_bench_small_run(tmp_path: Path) -> None:
    """300 hostile RPCs and 2 kills on a real server; what is already fixed must hold."""
    from veilface.cli import bench as bench_cli

    out = tmp_path / "chaos.json"
    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers())
    args = parser.parse_args([
        "bench", "chaos", "--fuzz-rpcs", "300", "--kills", "2", "--workers", "1", "--gallery", "200",
        "--concurrency", "2", "--seed", "1", "--json", str(out), "--no-progress",
    ])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert set(KEYS) <= set(result)
    assert result["fuzz_rpcs"] == 300 and result["seed"] == 1
    assert result["methods_missing"] == [], "every RPC of the descriptors is fuzzed"
    assert result["generator_errors"] == {}, "a generator is out of step with the messages"
    assert sum(result["status_counts"].values()) == 300
    assert result["crashes"] == 0 and result["hangs"] == 0
    assert result["kills"] == 2 and result["acknowledged"] > 64
    assert result["lost"] == 0 and result["duplicates"] == 0
    # the hardening of issue 10: nothing hostile succeeds, nothing is INTERNAL,
    # no partial bulk import shows, identification stays exact
    assert result["internal_errors"] == 0, result.get("generators")
    assert result["unexpected_successes"] == 0, result.get("generators")
    assert result["partial_bulk_visible"] == 0
    assert result["exact_after_fuzz"] is True
    assert result["memory_bomb_rss_growth_mb"] <= 256
    assert result["legit_p50_quiet_ms"] > 0 and result["rss_before_mb"] > 0
    # Tightened by the lead once the fixes of issue 10 are in: internal_errors,
    # unexpected_successes, partial_bulk_visible, exact_after_fuzz, memory growth.
