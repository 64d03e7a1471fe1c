"""Resource limits: exact public contexts, keys per tenant, resident contexts, per-tenant calls and work.

The public-context and limiter tests run in-process (no server); the
end-to-end ones start a real server with small limits set through
``VEILFACE_*`` variables, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tenseal.sealapi as seal

from tests.server.conftest import make_client
from veilface.crypto import seal_io
from veilface.crypto.keys import TenantKeys
from veilface.crypto.public_context import PublicContext, encode_public_context
from veilface.errors import InvalidContext, ResourceExhausted
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server import worker
from veilface.server.config import ServerSettings
from veilface.server.launcher import LocalServer
from veilface.server.limits import TenantLimiter

# -- public contexts ------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> TenantKeys:
    return TenantKeys.generate(128)


def _sections(blob: bytes) -> dict[str, bytes]:
    (hlen,) = struct.unpack(">I", blob[6:10])
    off, out = 10 + hlen, {}
    for name, size in json.loads(blob[10 : 10 + hlen])["sections"]:
        out[name], off = blob[off : off + size], off + size
    return out


def _with(keys: TenantKeys, **sections: bytes) -> bytes:
    parts = {**_sections(keys.public_context_bytes()), **sections}
    return encode_public_context(
        keys.param_set,
        keys.layout,
        parts["params"],
        parts["relin_keys"],
        parts["galois_keys"],
        parts.get("public_key"),
    )


def _galois(keys: TenantKeys, steps: list[int]) -> bytes:
    tool = keys.context.key_context_data().galois_tool()
    gen = seal.KeyGenerator(keys.context, keys.secret_key)
    return seal_io.to_bytes(
        gen.create_galois_keys(sorted({tool.get_elt_from_step(s) for s in steps}))
    )


def _seal_section(body: bytes, compression: int) -> bytes:
    return struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 1, compression, 0, 16 + len(body)) + body


def _zstd_rle_bomb(content: int) -> bytes:
    """A SEAL section whose zstd stream expands to ``content`` zero bytes, in 4 bytes per 128 KiB."""
    n = content // (128 * 1024)
    blocks = b"".join(
        ((1 if i == n - 1 else 0) | (1 << 1) | ((128 * 1024) << 3)).to_bytes(3, "little") + b"\0"
        for i in range(n)
    )
    return _seal_section((0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 0x38]) + blocks, 2)


@pytest.fixture
def no_seal_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if SEAL is asked to parse any key: a bomb must be refused before."""

    def refuse(*_: object) -> None:
        raise AssertionError("SEAL was asked to parse keys that should have been refused first")

    monkeypatch.setattr(seal_io, "load_galois_keys", refuse)
    monkeypatch.setattr(seal_io, "load_relin_keys", refuse)


def test_a_legitimate_context_loads(keys: TenantKeys) -> None:
    public = PublicContext.from_bytes(keys.public_context_bytes(), max_dim=512)
    assert public.supports_staging and public.galois_keys.size() == len(keys.layout.key_steps)


def test_one_extra_galois_key_is_refused(keys: TenantKeys) -> None:
    steps = [*keys.layout.key_steps, 3]  # a rotation the layout never uses
    with pytest.raises(InvalidContext, match="exactly"):
        PublicContext.from_bytes(_with(keys, galois_keys=_galois(keys, steps)))


@pytest.mark.usefixtures("no_seal_keys")
def test_many_extra_galois_keys_refused_before_parsing(keys: TenantKeys) -> None:
    steps = sorted(
        set(keys.layout.key_steps) | {1 << i for i in range(11)} | {-(1 << i) for i in range(11)}
    )
    t0 = time.perf_counter()
    with pytest.raises(ResourceExhausted, match="galois_keys"):
        PublicContext.from_bytes(_with(keys, galois_keys=_galois(keys, steps)))
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.usefixtures("no_seal_keys")
def test_compressed_key_bombs_refused_cheaply(keys: TenantKeys) -> None:
    """All-zero keys compress to almost nothing: what they expand to is bounded before SEAL inflates them."""
    zlib_bomb = _seal_section(zlib.compress(b"\0" * (32 << 20), 9), 1)
    for section in ("galois_keys", "relin_keys"):
        for bomb in (_zstd_rle_bomb(512 << 20), zlib_bomb):
            assert len(bomb) < 200_000  # a small message ...
            t0 = time.perf_counter()
            with pytest.raises(ResourceExhausted, match="expand"):  # ... that would take 32-512 MiB
                PublicContext.from_bytes(_with(keys, **{section: bomb}))
            assert time.perf_counter() - t0 < 0.5


@pytest.mark.usefixtures("no_seal_keys")
def test_oversized_relin_section_refused(keys: TenantKeys) -> None:
    galois = _sections(keys.public_context_bytes())["galois_keys"]  # 11 keys where one belongs
    with pytest.raises(ResourceExhausted, match="relin_keys"):
        PublicContext.from_bytes(_with(keys, relin_keys=galois))


def test_template_dimension_cap() -> None:
    big = TenantKeys.generate(1024)
    with pytest.raises(ResourceExhausted, match="dimension"):
        PublicContext.from_bytes(big.public_context_bytes(), max_dim=512)


# -- settings -----------------------------------------------------------------------


def test_every_limit_is_a_setting_with_a_variable_and_documented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import fields

    from veilface.errors import InvalidArgument

    limits = [f.name for f in fields(ServerSettings) if f.name.startswith("max_")]
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    for name in limits:
        assert f"`VEILFACE_{name.upper()}`" in doc, f"{name} is missing from the Limits table"
    monkeypatch.setenv("VEILFACE_MAX_KEYS_PER_TENANT", "3")
    monkeypatch.setenv("VEILFACE_MAX_SCORING_BINS", "100")
    got = ServerSettings.from_env()
    assert (got.max_keys_per_tenant, got.max_scoring_bins) == (3, 100)
    monkeypatch.setenv("VEILFACE_MAX_CONCURRENT_REQUESTS", "0")
    with pytest.raises(InvalidArgument, match="max_concurrent_requests"):
        ServerSettings.from_env()


# -- in-process limiters --------------------------------------------------------


def test_limiter_counts_calls_and_scoring_work() -> None:
    lim = TenantLimiter(max_requests=2, max_scoring_bins=100)
    lim.acquire_request("a")
    lim.acquire_request("a")
    with pytest.raises(ResourceExhausted):
        lim.acquire_request("a")
    lim.acquire_request("b")  # other tenants are not affected
    lim.release_request("a")
    lim.acquire_request("a")
    with lim.scoring("a", 4096):  # one request alone may be larger than the limit ...
        with pytest.raises(ResourceExhausted), lim.scoring("a", 1):  # ... nothing more meanwhile
            pass
        with (
            lim.scoring("b", 60),
            lim.scoring("b", 40),
            pytest.raises(ResourceExhausted),
            lim.scoring("b", 1),
        ):
            pass
    assert lim.scoring_in_flight("a") == lim.scoring_in_flight("b") == 0


def test_score_bins_accounts_work_in_flight() -> None:
    """Two queries of one tenant at once: the second is refused while the first is being scored."""
    from veilface.server.metrics import ScoringStats
    from veilface.server.service import GalleryService
    from veilface.server.store.records import BinInfo

    class HeldPool:
        n = 2

        def __init__(self) -> None:
            self.release = asyncio.Event()
            self.stats = ScoringStats()

        async def score(self, tenant_id, key_id, bins, *args, **kw):  # type: ignore[no-untyped-def]
            await self.release.wait()
            return {}

    class View:
        class layout:
            @staticmethod
            def giants(stage: str) -> range:
                return range(1)

    async def run() -> None:
        pool = HeldPool()
        svc = GalleryService(object(), pool, ServerSettings(max_scoring_bins=10))  # type: ignore[arg-type]
        bins = [BinInfo(i, 1, "", (0,)) for i in range(1, 9)]
        first = asyncio.ensure_future(svc.score_bins("t", "k", View, bins, [], "presel"))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted):
            await svc.score_bins("t", "k", View, bins[:3], [], "presel")  # type: ignore[arg-type]
        other = asyncio.ensure_future(svc.score_bins("u", "k", View, bins, [], "presel"))  # type: ignore[arg-type]
        pool.release.set()
        await asyncio.gather(first, other)
        assert svc.limits.scoring_in_flight("t") == 0
        await svc.score_bins("t", "k", View, bins[:3], [], "presel")  # type: ignore[arg-type]

    asyncio.run(run())


def test_worker_keeps_a_bounded_lru_of_contexts(
    tmp_path: Path, keys: TenantKeys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from veilface.server.store.sqlite_store import SQLiteStore

    SQLiteStore(tmp_path / "w.db").close()
    worker.init(str(tmp_path / "w.db"))
    blob = keys.public_context_bytes()
    state = worker._s()
    monkeypatch.setattr(state.reader, "key_context", lambda t, k: (blob, "fp", None))
    worker.configure(worker.WorkerLimits(max_resident_keys=2))
    for k in ("k0", "k1"):
        state.kernel("t", k)
    state.kernel("t", "k0")  # k0 is now the most recently used
    state.kernel("t", "k2")
    assert list(state.kernels) == [("t", "k0"), ("t", "k2")]  # k1 went first
    assert worker.resident_keys() == 2
    worker.configure(worker.WorkerLimits(max_resident_keys=1))
    assert list(state.kernels) == [("t", "k2")]


# -- a real server with small limits ---------------------------------------------


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    db = tmp_path_factory.mktemp("limits") / "g.db"
    env = {
        "VEILFACE_MAX_KEYS_PER_TENANT": "2",
        "VEILFACE_MAX_CONCURRENT_REQUESTS": "2",
        "VEILFACE_MAX_RESERVATIONS_PER_TENANT": "3",
        "VEILFACE_RESERVATION_TTL_S": "1.0",
    }
    with LocalServer(db, env=env) as srv:
        yield srv


@pytest.mark.slow
def test_keys_per_tenant_cap(tight: LocalServer) -> None:
    with make_client(tight, "keys") as c:  # k1
        tr = c.transport
        ctx = TenantKeys.generate(128).public_context_bytes()
        k2 = pb.RegisterKeyRequest(tenant_id="keys", key_id="k2", public_context=ctx)
        tr.call(tr.tenants.RegisterKey, k2)
        k3 = pb.RegisterKeyRequest(tenant_id="keys", key_id="k3", public_context=ctx)
        with pytest.raises(ResourceExhausted, match="keys"):
            tr.call(tr.tenants.RegisterKey, k3)
        tr.call(tr.tenants.RegisterKey, k2)  # the same key again is not a new one
        assert [k.key_id for k in c.describe().keys] == ["k1", "k2"]


@pytest.mark.slow
def test_reservations_per_tenant_cap_and_abandoned_bins_removed(tight: LocalServer) -> None:
    """A flood of ReserveSlots can neither hold unbounded reservations nor pile up empty bins."""
    import sqlite3
    import time

    with make_client(tight, "resv") as c:
        tr = c.transport

        def reserve() -> pb.ReserveSlotsResponse:
            req = pb.ReserveSlotsRequest(tenant_id="resv", key_id="k1", label="x", count=2048)
            return tr.call(tr.enrollment.ReserveSlots, req)

        got = [reserve().bin_id for _ in range(3)]
        # 2,048 slots each (the most one reservation takes): two fill a bin of
        # 4,096 (layout 2), the third needs a new, empty bin
        assert c.layout.capacity == 4096 and got[0] == got[1] != got[2]
        with pytest.raises(ResourceExhausted, match="reservations"):
            reserve()
        time.sleep(1.2)  # all three expire unused
        reserve()
        with sqlite3.connect(tight.db_path) as db:
            (bins,) = db.execute("SELECT COUNT(*) FROM bins WHERE tenant_id='resv'").fetchone()
        assert bins == 1  # the abandoned bins went; only the new reservation's is left


@pytest.mark.slow
def test_concurrent_calls_per_tenant(tight: LocalServer) -> None:
    with make_client(tight, "busy") as busy, make_client(tight, "calm") as calm:
        tr = busy.transport
        release = threading.Event()

        def held() -> Iterator[pb.EnrollRequest]:
            release.wait(60)  # an open stream that sends nothing
            return
            yield  # pragma: no cover

        futs = [
            tr.enrollment.Enroll.future(held(), metadata=tr._metadata, timeout=60) for _ in range(2)
        ]
        try:
            time.sleep(0.5)  # both streams are open on the server
            with pytest.raises(ResourceExhausted, match="calls in progress"):
                busy.describe()
            assert calm.describe().keys[0].key_id == "k1"  # another tenant is not held up
        finally:
            release.set()
            for f in futs:
                with pytest.raises(grpc.RpcError):
                    f.result(timeout=30)  # empty streams: refused
        assert busy.describe().keys[0].key_id == "k1"  # the slots were given back


# -- memory under concurrent large requests -----------------------------------------


def _rss_mb(pid: int) -> float:
    """The server and its workers' RSS, as the chaos benchmark measures it."""
    from veilface.bench.chaos_target import rss_mb

    return rss_mb(pid)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    db = tmp_path_factory.mktemp("rss") / "g.db"
    with LocalServer(db) as srv:
        yield srv


@pytest.mark.slow
def test_concurrent_near_limit_messages_do_not_take_gigabytes(
    default_server: LocalServer, faces
) -> None:  # type: ignore[no-untyped-def]
    """Rounds of 4 concurrent messages just under the default limit: the server + workers stay within a few hundred MB."""
    from concurrent.futures import ThreadPoolExecutor

    gallery, names, _ = faces
    limit = ServerSettings().max_message_bytes
    with make_client(default_server, "rss") as c:
        c.enroll_many(names[:4], gallery[:4])
        tr = c.transport
        n = c.layout.n_ciphertexts
        each = (
            limit - (1 << 20)
        ) // n  # n blobs filling the message, each far over a ciphertext's size
        blobs = [bytes([i % 251]) * each for i in range(n)]
        handle = c.state.handles().encode(names[0])
        requests = [
            lambda: tr.call(
                tr.tenants.RegisterKey,
                pb.RegisterKeyRequest(
                    tenant_id="rss",
                    key_id="big",
                    public_context=b"VFPC1\n" + b"\0" * (limit - (1 << 20)),
                ),
            ),
            lambda: tr.call(
                tr.enrollment.Enroll,
                iter(
                    [
                        pb.EnrollRequest(
                            tenant_id="rss",
                            key_id="k1",
                            reservation_id=res.reservation_id,
                            handles=["h"],
                            ciphertexts=blobs,
                        )
                    ]
                ),
            ),
            lambda: tr.call(
                tr.enrollment.BulkEnroll,
                iter(
                    [
                        pb.BulkEnrollChunk(
                            tenant_id="rss",
                            key_id="k1",
                            handles=["h"],
                            slots=[0],
                            total_bins=1,
                            ciphertexts=blobs,
                        )
                    ]
                ),
            ),
            lambda: tr.call(
                tr.enrollment.DeleteSubject,
                pb.DeleteSubjectRequest(
                    tenant_id="rss", handle=handle, bin_id=1, bin_version=1, ciphertexts=blobs
                ),
            ),
        ]
        time.sleep(1.0)
        before = _rss_mb(default_server.proc.pid)  # type: ignore[union-attr]
        peak = before
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_mb(default_server.proc.pid))  # type: ignore[union-attr]
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(4) as ex:
                for _ in range(3):
                    res = tr.call(
                        tr.enrollment.ReserveSlots,
                        pb.ReserveSlotsRequest(tenant_id="rss", key_id="k1", label="", count=1),
                    )
                    futs = [ex.submit(r) for r in requests]
                    for f in futs:
                        with pytest.raises(ResourceExhausted):
                            f.result()
            time.sleep(2.0)
        finally:
            done.set()
            watcher.join()
        after = _rss_mb(default_server.proc.pid)  # type: ignore[union-attr]
        print(f"rss before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB")
        assert peak - before < 512, (
            before,
            peak,
            after,
        )  # 4 x 39 MB in flight, a couple of copies each
        assert after - before < 100, (before, peak, after)  # and given back once they are refused
        assert c.identify(gallery[1]).subject_id == names[1]
