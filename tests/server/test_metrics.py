"""The Prometheus endpoint: RPC, gallery and scoring metrics, and nothing secret in them."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from veilface.bench.synthetic import SyntheticFaces
from veilface.client.admin import AdminClient
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.errors import InvalidArgument, NotFound, Unauthenticated
from veilface.server import RunningServer, ServerSettings, start_server, worker
from veilface.server import metrics as metrics_mod
from veilface.server.fair_queue import FairLane
from veilface.server.metrics import ScoringStats, start_metrics
from veilface.server.metrics_export import RpcMetrics, RpcMetricsInterceptor, ServerMetrics
from veilface.server.store.base import GalleryStore
from veilface.server.store.records import KeyStats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def samples(text: str) -> Samples:
    """(sample name, sorted labels) -> value, for every sample of a scrape."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def rpc(service: str, method: str, code: str) -> tuple[tuple[str, str], ...]:
    return (("grpc_code", code), ("grpc_method", method), ("grpc_service", service))


# -- the scoring side's counters --------------------------------------------------


def test_shard_loads_count_each_bin_once_per_worker_and_again_after_forget() -> None:
    stats = ScoringStats()
    units = [worker.ScoreUnit(5, 1, 0, 2, False, (0,)), worker.ScoreUnit(6, 1, 0, 2, False, (0,))]
    stats.track(0, worker.score, ("t", "k", units, [b"p"], ""))
    assert stats.shard_loads == 2
    stats.track(0, worker.score, ("t", "k", units, [b"p"], "q"))  # held: no load
    stats.track(0, worker.ping, ())
    assert stats.shard_loads == 2
    stats.track(1, worker.score, ("t", "k", units[:1], [b"p"], ""))  # a split bin on another worker
    assert stats.shard_loads == 3
    stats.track(0, worker.forget, ([5],))  # re-packed in place: loaded again on next use
    stats.track(0, worker.preload, ([5, 6, 7],))
    stats.track(0, worker.current, (7,))
    assert stats.shard_loads == 5
    stats.shard_loaded(4)  # what a Ray backend calls when an actor reloads its shards
    assert stats.shard_loads == 9
    with pytest.raises(ValueError):
        stats.shard_loaded(-1)


def test_tracked_worker_functions_have_the_parameters_named() -> None:
    for table in (metrics_mod._HOLDS, metrics_mod._DROPS):
        for fn, name in table.items():
            assert name in inspect.signature(fn).parameters, (fn.__name__, name)


def test_fair_lane_counts_jobs_waiting_and_running() -> None:
    async def run() -> None:
        release = threading.Event()
        with ThreadPoolExecutor(1) as ex:
            lane = FairLane(ex)
            stats = ScoringStats([lane])
            first = asyncio.ensure_future(lane.submit(release.wait, 10))
            rest = [asyncio.ensure_future(lane.submit(pow, 2, i)) for i in range(3)]
            await asyncio.sleep(0.05)
            assert (stats.jobs_running(), stats.jobs_queued()) == (1, 3)
            release.set()
            await asyncio.gather(first, *rest)
            assert (stats.jobs_running(), stats.jobs_queued()) == (0, 0)
            with stats.scoring(7):
                assert stats.bins_in_flight == 7
            assert stats.bins_in_flight == 0

    asyncio.run(run())


# -- settings and command line ----------------------------------------------------


def test_metrics_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings().metrics_port == -1  # off by default
    monkeypatch.setenv("VEILFACE_METRICS_PORT", "0")
    monkeypatch.setenv("VEILFACE_METRICS_TENANT_LABEL", "false")
    got = ServerSettings.from_env()
    assert (got.metrics_port, got.metrics_tenant_label, got.metrics_host) == (0, False, "127.0.0.1")
    assert start_metrics(ServerSettings(), cast(GalleryStore, None), ScoringStats()) is None
    with pytest.raises(InvalidArgument, match="metrics_port"):
        start_metrics(ServerSettings(metrics_port=70000), cast(GalleryStore, None), ScoringStats())


def test_serve_metrics_port_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import veilface.server
    from veilface.cli.main import main

    seen: list[ServerSettings] = []

    async def fake_serve(settings: ServerSettings, *, announce: bool = True) -> None:
        seen.append(settings)

    monkeypatch.setattr(veilface.server, "serve", fake_serve)
    assert main(["serve", "--db", str(tmp_path / "g.db"), "--metrics-port", "0"]) == 0
    assert main(["serve", "--db", str(tmp_path / "g.db")]) == 0
    assert [s.metrics_port for s in seen] == [0, -1]


# -- the exporter alone -------------------------------------------------------------


@dataclass
class _Token:
    tenant_id: str


class _CountingStore:
    """The two store reads the gallery collector makes (a unit-test double)."""

    def __init__(self, keys: dict[str, list[KeyStats]]) -> None:
        self.keys = keys
        self.reads = 0
        self.down = False

    def active_tokens(self) -> list[_Token]:
        if self.down:
            raise OSError("database is down")
        self.reads += 1
        return [_Token(t) for t in self.keys for _ in range(2)]  # two tokens each

    def list_keys(self, tenant_id: str) -> list[tuple[object, KeyStats]]:
        return [(None, s) for s in self.keys[tenant_id]]


@pytest.fixture
def two_tenants() -> _CountingStore:
    return _CountingStore(
        {
            "tenant-a": [KeyStats(subjects=10, bins=1, stored_bytes=0, staged=2),
                         KeyStats(subjects=5, bins=2, stored_bytes=0)],
            "tenant-b": [KeyStats(subjects=7, bins=1, stored_bytes=0)],
        }
    )


def test_per_tenant_counts_from_the_store_on_scrape(two_tenants: _CountingStore) -> None:
    m = ServerMetrics.start(cast(GalleryStore, two_tenants), ScoringStats(), port=0)
    try:
        got = samples(scrape(m.url))
        assert got[("veilface_tenants", ())] == 2
        assert got[("veilface_bins", (("tenant", "tenant-a"),))] == 3
        assert got[("veilface_templates", (("tenant", "tenant-a"),))] == 15
        assert got[("veilface_staged_templates", (("tenant", "tenant-a"),))] == 2
        assert got[("veilface_templates", (("tenant", "tenant-b"),))] == 7
        scrape(m.url)
        assert two_tenants.reads == 1  # reused for TENANT_REFRESH_S, not read per scrape
    finally:
        m.stop()


def test_tenant_label_can_be_dropped(two_tenants: _CountingStore) -> None:
    m = ServerMetrics.start(cast(GalleryStore, two_tenants), ScoringStats(), tenant_label=False)
    try:
        text = scrape(m.url)
        got = samples(text)
        assert got[("veilface_bins", ())] == 4 and got[("veilface_templates", ())] == 22
        assert "tenant-a" not in text and "tenant-b" not in text
    finally:
        m.stop()


def test_a_store_that_is_down_leaves_the_counts_out(two_tenants: _CountingStore) -> None:
    two_tenants.down = True
    m = ServerMetrics.start(cast(GalleryStore, two_tenants), ScoringStats())
    try:
        got = samples(scrape(m.url))
        assert ("veilface_tenants", ()) not in got
        assert got[("veilface_gallery_read_errors_total", ())] == 1
        assert got[("veilface_scoring_jobs_queued", ())] == 0  # the rest is still served
    finally:
        m.stop()


def test_two_servers_in_one_process_keep_their_own_registries(
    two_tenants: _CountingStore,
) -> None:
    store = cast(GalleryStore, two_tenants)
    a, b = ServerMetrics.start(store, ScoringStats()), ServerMetrics.start(store, ScoringStats())
    try:
        assert a.port != b.port
        a.rpc.ended(("veilface.v1.Tenants", "DescribeTenant"), "OK", 0.01)
        key = ("veilface_rpc_handled_total", rpc("veilface.v1.Tenants", "DescribeTenant", "OK"))
        assert samples(scrape(a.url))[key] == 1
        assert key not in samples(scrape(b.url))
    finally:
        a.stop()
        b.stop()
    with pytest.raises(OSError):
        scrape(a.url)  # stopped: nothing listens any more


# -- the interceptor on every kind of call ------------------------------------------


def test_interceptor_records_status_of_unary_and_streaming_calls() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def aborted(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        raise AssertionError("unreachable")

    async def raises(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("a bug")

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(10)
        return request

    async def items(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield request

    async def summed(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return b"".join([r async for r in requests])

    handlers = {
        "Ok": grpc.unary_unary_rpc_method_handler(ok),
        "Aborted": grpc.unary_unary_rpc_method_handler(aborted),
        "Raises": grpc.unary_unary_rpc_method_handler(raises),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Items": grpc.unary_stream_rpc_method_handler(items),
        "Summed": grpc.stream_unary_rpc_method_handler(summed),
    }
    registry = CollectorRegistry()

    async def run() -> None:
        server = grpc.aio.server(interceptors=[RpcMetricsInterceptor(RpcMetrics(registry))])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                assert await ch.unary_unary("/t.S/Ok")(b"x") == b"x"
                for name, code in [("Aborted", grpc.StatusCode.PERMISSION_DENIED),
                                   ("Raises", grpc.StatusCode.UNKNOWN),
                                   ("Nope", grpc.StatusCode.UNIMPLEMENTED)]:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await ch.unary_unary(f"/t.S/{name}")(b"x")
                    assert err.value.code() == code
                with pytest.raises(grpc.aio.AioRpcError):
                    await ch.unary_unary("/t.S/Slow")(b"x", timeout=0.2)
                assert [m async for m in ch.unary_stream("/t.S/Items")(b"y")] == [b"y"] * 3
                assert await ch.stream_unary("/t.S/Summed")(iter([b"a", b"b"])) == b"ab"
            await asyncio.sleep(0.2)  # the cancelled call's handler ends
        finally:
            await server.stop(0)

    asyncio.run(run())
    got = samples(generate_latest(registry).decode())
    handled = "veilface_rpc_handled_total"
    for method, code in [("Ok", "OK"), ("Aborted", "PERMISSION_DENIED"), ("Raises", "UNKNOWN"),
                         ("Slow", "DEADLINE_EXCEEDED"), ("Items", "OK"), ("Summed", "OK")]:
        assert got[(handled, rpc("t.S", method, code))] == 1, (method, code)
        assert got[("veilface_rpc_duration_seconds_count", rpc("t.S", method, code))] == 1
        assert got[("veilface_rpc_in_progress", (("grpc_method", method), ("grpc_service", "t.S")))] == 0
    assert got[(handled, rpc("unknown", "unknown", "UNIMPLEMENTED"))] == 1


# -- a real server ------------------------------------------------------------------


class ThreadedServer:
    """``start_server`` on an event loop of its own thread, so this test can call it."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: RunningServer | None = None

    def __enter__(self) -> RunningServer:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(start_server(self.settings), self.loop)
        self.running = fut.result(timeout=180)
        return self.running

    def __exit__(self, *exc: object) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(0.5), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    db = tmp_path_factory.mktemp("metrics") / "gallery.db"
    with ThreadedServer(ServerSettings(db_path=db, port=0, workers=1, metrics_port=0)) as srv:
        yield srv, db


@pytest.mark.slow
def test_real_server_scrape_has_rpc_gallery_and_scoring_metrics_and_no_secret(
    live: tuple[RunningServer, Path],
) -> None:
    srv, db = live
    assert srv.metrics is not None
    target = f"127.0.0.1:{srv.port}"
    admin_token = srv.admin_token_path.read_text().strip() if srv.admin_token_path else ""
    tenant = "metrics-tenant-q7"
    with AdminClient(target, token=admin_token) as admin:
        token = admin.create_tenant(tenant).api_token
    emb, labels = SyntheticFaces().sample(24, 2, seed=5)
    gallery, names, probes = emb[0::2], [f"person-{x}" for x in labels[0::2]], emb[1::2]
    state = TenantState.new(tenant, dim=128, key_id="key-metrics-zq7")
    with VeilClient(target, state, token=token, encrypt_workers=0) as c:
        c.register_key()
        c.enroll_many(names[:-1], gallery[:-1])  # a BulkEnroll stream
        c.enroll(names[-1], gallery[-1], fold="now")  # a single enrollment
        assert c.identify(probes[3]).subject_id == names[3]  # strict default: one stage
        assert c.identify(probes[3], k=8).subject_id == names[3]  # preselect, then re-rank
        assert c.verify(names[4], probes[4]).score > 0.5
        with pytest.raises(NotFound):
            c.verify("nobody-enrolled", probes[4])
    bad_token = "vf_wrongtoken_" + "x" * 30
    with (
        VeilClient(target, state, token=bad_token, encrypt_workers=0) as c,
        pytest.raises(Unauthenticated),
    ):
        c.describe()
    with grpc.insecure_channel(target) as ch:  # a server stream, cut by its deadline
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=0.3)
        with pytest.raises(grpc.RpcError):
            list(watch)

    handled = "veilface_rpc_handled_total"
    deadline = time.monotonic() + 10
    while True:  # the server may see the stream's end a moment after the client does
        text = scrape(srv.metrics.url)
        got = samples(text)
        watch_codes = {dict(k[1])["grpc_code"] for k in got
                       if k[0] == handled and ("grpc_method", "Watch") in k[1]}
        if watch_codes or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert watch_codes & {"DEADLINE_EXCEEDED", "CANCELLED"}
    ident, enroll = "veilface.v1.Identification", "veilface.v1.Enrollment"
    for service, method, code in [
        ("veilface.v1.Tenants", "CreateTenant", "OK"),
        ("veilface.v1.Tenants", "RegisterKey", "OK"),
        (enroll, "BulkEnroll", "OK"),
        (ident, "Preselect", "OK"),
        (ident, "ScoreCandidates", "OK"),
        (ident, "Verify", "OK"),
        (ident, "Verify", "NOT_FOUND"),
        ("veilface.v1.Tenants", "DescribeTenant", "UNAUTHENTICATED"),
    ]:
        assert got.get((handled, rpc(service, method, code)), 0) >= 1, (method, code)
        bucket = ("veilface_rpc_duration_seconds_bucket",
                  tuple(sorted([*rpc(service, method, code), ("le", "+Inf")])))
        assert got[bucket] >= 1
    assert got[("veilface_tenants", ())] == 1
    assert got[("veilface_templates", (("tenant", tenant),))] + got[
        ("veilface_staged_templates", (("tenant", tenant),))
    ] == len(names)
    assert got[("veilface_bins", (("tenant", tenant),))] >= 1
    assert got[("veilface_shard_loads_total", ())] >= 1
    # background jobs (bin preloads, centre scores) may still be queued or running
    assert got[("veilface_scoring_jobs_queued", ())] >= 0
    assert 0 <= got[("veilface_scoring_jobs_running", ())] <= srv.pool.n
    assert got[("veilface_scoring_bins_in_flight", ())] == 0  # no query in progress
    assert ("process_resident_memory_bytes", ()) in got

    # Nothing secret or identifying: tokens, their ids and hashes, handles, bin
    # labels, the key id and fingerprint, addresses.
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = [
            *con.execute("SELECT handle FROM subjects"),
            *con.execute("SELECT handle FROM staged"),
            *con.execute("SELECT label FROM bins"),
            *con.execute("SELECT token_id FROM tokens"),
            *con.execute("SELECT token_hash FROM tokens"),
            *con.execute("SELECT key_id FROM keys"),
            *con.execute("SELECT fingerprint FROM keys"),
        ]
    forbidden = {str(r[0]) for r in rows} | {token, admin_token, bad_token, "127.0.0.1"}
    assert len(forbidden) > len(names) + 5  # the handles and labels were read
    leaked = sorted(s for s in forbidden if s and s in text)
    assert not leaked, leaked
