"""The scoring backend interface: how a query is split over shards, on the local pool and a fake.

The Ray backend implements the same interface over a real cluster
(tests/server/test_ray_scoring.py); here, what does not need one: its
options and its refusal of an unreachable cluster.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from veilface.errors import InvalidArgument, NotFound, Unavailable
from veilface.server import fair_queue, worker
from veilface.server.config import ServerSettings
from veilface.server.scoring import ScoringBackend, WorkerPool, open_scoring
from veilface.server.store.sqlite_store import SQLiteStore

T = TypeVar("T")


class _RecordingBackend(ScoringBackend):
    """Runs nothing: records which shard got which call, answers one blob per unit."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.calls: list[tuple[int, str, tuple[Any, ...]]] = []
        self.shares: dict[str, str] = {}

    async def call(self, idx: int, fn: Callable[..., T], *args: Any) -> T:
        self.calls.append((idx, fn.__name__, args))
        self.shares[fn.__name__] = fair_queue.share.get()
        if fn is worker.score:
            units = args[2]
            return [f"{idx}:{u.bin_id}:{u.first_giant}".encode() for u in units]  # type: ignore[return-value]
        return idx  # type: ignore[return-value]

    def shutdown(self) -> None:
        pass


def _score(backend: ScoringBackend, bins: list[tuple[int, int]], giants: range) -> dict[int, list[bytes]]:
    keep = {b: (0, 1) for b, _ in bins}
    return asyncio.run(backend.score("t", "k", bins, [b"probe"], giants, keep, query_id="q"))


def test_few_bins_are_split_over_every_shard() -> None:
    backend = _RecordingBackend(3)
    out = _score(backend, [(7, 2)], range(6))
    # bin 7's owner is shard 1; its giant steps go to shards 1, 2, 0 in thirds
    assert [(idx, name) for idx, name, _ in backend.calls] == [(1, "score"), (2, "score"), (0, "score")]
    assert out == {7: [b"1:7:0", b"2:7:2", b"0:7:4"]}
    units = [args[2][0] for _, _, args in backend.calls]
    assert [(u.first_giant, u.stop_giant, u.version) for u in units] == [(0, 2, 2), (2, 4, 2), (4, 6, 2)]


def test_many_bins_go_to_their_owners() -> None:
    backend = _RecordingBackend(2)
    out = _score(backend, [(1, 1), (2, 1), (3, 5), (4, 1)], range(4))
    by_shard = {idx: [u.bin_id for u in args[2]] for idx, _, args in backend.calls}
    assert by_shard == {0: [2, 4], 1: [1, 3]}
    assert sorted(out) == [1, 2, 3, 4] and out[3] == [b"1:3:0"]


def test_an_unbalanced_query_warms_the_idle_shard_and_the_next_is_balanced() -> None:
    backend = _RecordingBackend(2)
    bins = [(2, 1), (4, 1), (6, 1), (8, 3), (3, 1)]  # owners: four on shard 0, one on shard 1

    async def twice() -> None:
        fair_queue.share.set("t")
        await backend.score("t", "k", bins, [b"probe"], range(4), {b: (0,) for b, _ in bins}, query_id="q")
        await asyncio.sleep(0)  # the background warm-up runs
        backend.calls.append((-1, "mark", ()))
        await backend.score("t", "k", bins, [b"probe"], range(4), {b: (0,) for b, _ in bins}, query_id="q")

    asyncio.run(twice())
    mark = [c[1] for c in backend.calls].index("mark")
    first, second = backend.calls[:mark], backend.calls[mark + 1 :]
    # first query: owners only, and shard 1 is asked to load one of shard 0's bins for next time
    assert {idx: [u.bin_id for u in a[2]] for idx, name, a in first if name == "score"} == {0: [2, 4, 6, 8], 1: [3]}
    warm = [(idx, a) for idx, name, a in first if name == "preload_foreign"]
    assert warm == [(1, ("t", "k", [8]))]
    assert backend.shares["preload_foreign"] == fair_queue.background_share("t")  # not the tenant's own queue
    # second query: that bin moves (scored as foreign there): 3 / 2 instead of 4 / 1
    by_shard = {idx: a[2] for idx, name, a in second if name == "score"}
    assert [u.bin_id for u in by_shard[0]] == [2, 4, 6] and [u.bin_id for u in by_shard[1]] == [3, 8]
    assert [u.foreign for u in by_shard[1]] == [False, True] and by_shard[1][1].version == 3
    backend.max_foreign_bins = 0  # no foreign cache: owners only, nothing warmed
    backend.calls.clear()
    _score(backend, bins, range(4))
    assert [name for _, name, _ in backend.calls] == ["score", "score"]


def test_broadcast_reaches_every_shard() -> None:
    backend = _RecordingBackend(4)
    assert asyncio.run(backend.broadcast(worker.ping)) == [0, 1, 2, 3]
    assert backend.owner(9) == 1


def test_local_pool_is_a_backend(tmp_path: Path) -> None:
    SQLiteStore(tmp_path / "g.db").close()
    settings = ServerSettings(db_path=tmp_path / "g.db", workers=2, max_resident_keys=3)

    async def run() -> None:
        pool = await open_scoring(settings, str(tmp_path / "g.db"))
        try:
            assert isinstance(pool, WorkerPool) and isinstance(pool, ScoringBackend)
            assert pool.n == 2 and pool.stats.jobs_queued() == 0 and pool.shard_reloads == 0
            assert await pool.broadcast(worker.resident_keys) == [0, 0]
            assert await pool.call(1, worker.preload, [5, 6]) == 0  # no such bins: skipped
            assert await pool.call(0, worker.current, 5) is None
            with pytest.raises(NotFound):  # a worker's own error comes back as it is
                await pool.call(1, worker.check_stored, "t", "k", 5, 0, 1)
        finally:
            pool.shutdown()

    asyncio.run(run())


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    settings = ServerSettings(db_path=tmp_path / "g.db", scoring="spark")
    with pytest.raises(InvalidArgument, match="local or ray"):
        asyncio.run(open_scoring(settings, str(tmp_path / "g.db")))


def test_ray_needs_an_address() -> None:
    from veilface.server.ray_scoring import RayOptions

    with pytest.raises(InvalidArgument, match="--ray-address"):
        RayOptions.from_settings(ServerSettings(scoring="ray"))


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on return: nothing listens there


def test_unreachable_ray_cluster_is_unavailable_naming_it(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_dead_port()}"
    settings = ServerSettings(db_path=tmp_path / "g.db", scoring="ray", ray_address=address)
    t = time.monotonic()
    with pytest.raises(Unavailable, match=f"Ray cluster at {address}"):
        asyncio.run(open_scoring(settings, str(tmp_path / "g.db")))
    assert time.monotonic() - t < 30


def test_serve_fails_at_start_naming_the_ray_address(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_dead_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "veilface.cli.main", "serve", "--db", str(tmp_path / "g.db"),
         "--port", "0", "--scoring", "ray", "--ray-address", address],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot reach the Ray cluster at {address}" in proc.stderr
    assert "veilface listening" not in proc.stdout


def test_namespace_ignores_the_password() -> None:
    from veilface.server.ray_scoring import namespace_for

    a = namespace_for("postgresql://u:secret1@h:5432/db")
    assert a == namespace_for("postgresql://u:other@h:5432/db")
    assert a != namespace_for("postgresql://u:secret1@h:5432/db2")
    assert "secret" not in a


class _FakeRay:
    """``ray.get`` answering from a script: an exception to raise, or a value to return."""

    def __init__(self, script: list[object]) -> None:
        self.script = script
        self.gets = 0

    def get(self, ref: object, timeout: float) -> object:
        self.gets += 1
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, BaseException):
            raise step
        return step

    def cancel(self, ref: object, force: bool) -> None:
        pass

    def get_actor(self, name: str, namespace: str) -> object:
        return _FakeHandle()


class _FakeHandle:
    class run:  # the actor method's name
        @staticmethod
        def remote(*args: object) -> object:
            return object()


def _fake_pool(script: list[object], recovery_s: float = 5.0) -> Any:
    import threading

    from veilface.server.ray_scoring import RayOptions, RayPool

    pool = object.__new__(RayPool)  # no cluster: only the retry logic runs
    pool._ray = _FakeRay(script)
    pool.options = RayOptions("127.0.0.1:1", recovery_s=recovery_s)
    pool.namespace = "test"
    pool.n = 2
    pool._handles = [_FakeHandle(), _FakeHandle()]
    pool._lock = threading.Lock()
    pool.shard_reloads = 0
    pool._restarted = [False, False]
    return pool


def test_a_lost_shard_is_retried_until_it_is_back() -> None:
    ray_exc = pytest.importorskip("ray.exceptions")
    lost = [ray_exc.ActorUnavailableError("restarting", None), ray_exc.NodeDiedError("gone")]
    pool = _fake_pool([*lost, "answer"])
    assert pool._call_blocking(0, worker.ping, ()) == "answer"
    assert pool._ray.gets == 3 and pool.shard_reloads == 1
    assert pool._restarted == [True, False]  # its bins count as loads again (metrics)


def test_a_shard_that_stays_lost_is_unavailable() -> None:
    ray_exc = pytest.importorskip("ray.exceptions")
    pool = _fake_pool([ray_exc.ActorUnavailableError("down", None)] * 100, recovery_s=0.5)
    with pytest.raises(Unavailable, match="shard 1 of 2 was lost"):
        pool._call_blocking(1, worker.ping, ())


def test_worker_errors_come_back_as_they_are_and_ray_failures_are_unavailable() -> None:
    ray_exc = pytest.importorskip("ray.exceptions")
    wrapped = ray_exc.RayTaskError("run", "tb", NotFound("no bin 5"))
    with pytest.raises(NotFound, match="no bin 5"):
        _fake_pool([wrapped])._call_blocking(0, worker.current, (5,))
    with pytest.raises(Unavailable, match="did not answer"):
        _fake_pool([ray_exc.GetTimeoutError("slow")])._call_blocking(0, worker.ping, ())
    with pytest.raises(Unavailable, match="Ray cluster failed"):
        _fake_pool([ray_exc.ObjectStoreFullError("full")])._call_blocking(0, worker.ping, ())
    with pytest.raises(ValueError, match="not a veilface.server.worker function"):
        _fake_pool([])._call_blocking(0, print, ())
