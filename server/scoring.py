"""Where the homomorphic work runs, seen from the asyncio server.

:class:`ScoringBackend` is the interface the service is typed against: ``n``
shards, each running the functions of :mod:`veilface.server.worker` one job
at a time, with bin affinity (the bins of shard ``i`` are those with
``bin_id % n == i``, so each bin is deserialized once and stays in that
shard's memory). Every worker function is idempotent (reads, checks, cache
drops), so a backend may retry a call a shard lost.

Implementations: :class:`WorkerPool`, local processes (the embedded
default, started with ``spawn``: no fork of the gRPC process), and
:class:`veilface.server.ray_scoring.RayPool`, actors of a Ray cluster
(``--scoring ray``). :func:`open_scoring` picks one from the settings.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import multiprocessing
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from veilface.errors import VeilfaceError
from veilface.server import fair_queue, worker
from veilface.server.fair_queue import FairLane
from veilface.server.metrics import ScoringStats

if TYPE_CHECKING:
    from veilface.server.config import ServerSettings

T = TypeVar("T")
log = logging.getLogger(__name__)


class ScoringBackend(abc.ABC):
    """``n`` scoring shards running :mod:`veilface.server.worker` functions.

    Subclasses provide :attr:`n`, :meth:`call` and :meth:`shutdown`; bin
    ownership, broadcasts and the split of a query into per-shard work
    (:meth:`score`) are the same for every backend. A call that cannot be
    served (a shard that stays lost) raises
    :class:`veilface.errors.Unavailable`; a worker's own error (NotFound,
    InvalidCiphertext...) propagates unchanged.
    """

    n: int
    #: The backend's counters, read by the metrics endpoint (server/metrics.py).
    stats: ScoringStats
    #: Shards found restarted or re-created since start (0 for local processes).
    shard_reloads: int = 0
    #: Other shards' bins each shard may keep to balance queries (``WorkerLimits.max_foreign_bins``).
    max_foreign_bins: int = worker.WorkerLimits.max_foreign_bins

    def __init__(self) -> None:
        #: Per shard, the foreign bins this pool asked it to hold, least recently used first.
        self._foreign: dict[int, OrderedDict[int, None]] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    @abc.abstractmethod
    async def call(self, idx: int, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (a :mod:`~veilface.server.worker` function) on shard ``idx``."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop using the shards (local processes end; shared Ray actors stay)."""

    def owner(self, bin_id: int) -> int:
        return bin_id % self.n

    async def warm_up(self) -> None:
        """Until every shard answers (started, its store reader open)."""
        await self.broadcast(worker.ping)

    async def score(
        self,
        tenant_id: str,
        key_id: str,
        bins: Sequence[tuple[int, int]],
        probe: Sequence[bytes],
        giants: range,
        keep: Mapping[int, tuple[int, ...]],
        *,
        split: bool = True,
        add_center: bool = False,
        query_id: str = "",
    ) -> dict[int, list[bytes]]:
        """Score bins in parallel; returns bin_id -> score ciphertexts to add up.

        ``keep[bin_id]``: the slots of that bin the response needs; every
        other slot comes back masked (each part on its own). With fewer bins
        than shards, each bin's giant steps are split across all shards
        (every shard can load any bin; its owner keeps it warm), so a small
        gallery still uses every core. Otherwise each shard scores the bins
        it owns. ``query_id``: the probe is that cached query's (shards keep
        its deserialized form for the query's next stage).
        """
        units: dict[int, list[worker.ScoreUnit]] = {}
        if split and len(bins) < self.n and len(giants) >= 2:
            parts = min(self.n, len(giants))
            for bin_id, version in bins:
                for i in range(parts):
                    lo = giants.start + i * len(giants) // parts
                    hi = giants.start + (i + 1) * len(giants) // parts
                    units.setdefault((self.owner(bin_id) + i) % self.n, []).append(
                        worker.ScoreUnit(bin_id, version, lo, hi, add_center and i == 0, keep[bin_id])
                    )
        else:
            shares, warm_up = self._balance(bins)
            for shard, share in shares.items():
                for bin_id, version in share:
                    foreign = self.owner(bin_id) != shard
                    units.setdefault(shard, []).append(
                        worker.ScoreUnit(
                            bin_id, version, giants.start, giants.stop, add_center, keep[bin_id], foreign
                        )
                    )
                    if foreign:
                        self._note_foreign(shard, bin_id)
            for shard, bin_id in warm_up:
                self._note_foreign(shard, bin_id)
                self._background(self.call(shard, worker.preload_foreign, tenant_id, key_id, [bin_id]))
        results = await asyncio.gather(
            *(
                self.call(i, worker.score, tenant_id, key_id, group, list(probe), query_id)
                for i, group in units.items()
            )
        )
        out: dict[int, list[bytes]] = {}
        for group, res in zip(units.values(), results, strict=True):
            for unit, blob in zip(group, res, strict=True):
                if blob is not None:
                    out.setdefault(unit.bin_id, []).append(blob)
        return out

    def _balance(
        self, bins: Sequence[tuple[int, int]]
    ) -> tuple[dict[int, list[tuple[int, int]]], list[tuple[int, int]]]:
        """Each shard's bins for one query, and the (shard, bin) loads that would balance the next.

        Bins go to their owners; while the busiest shard has two bins more
        than the idlest, one of its bins that the idlest holds in its
        foreign cache (as far as this pool has asked it to) moves there.
        When none does, the idlest is asked to load one in the background
        (at most one per query, and only while its foreign cache has room),
        so that a gallery's queries balance once it has been searched a
        while, without a cold load on any query's path.
        """
        shares: dict[int, list[tuple[int, int]]] = {i: [] for i in range(self.n)}
        for b in bins:
            shares[self.owner(b[0])].append(b)
        warm_up: list[tuple[int, int]] = []
        if self.max_foreign_bins <= 0 or self.n < 2:
            return shares, warm_up
        moved: set[int] = set()
        while True:
            hi = max(shares, key=lambda i: len(shares[i]))
            lo = min(shares, key=lambda i: len(shares[i]))
            if len(shares[hi]) - len(shares[lo]) < 2:
                break
            held: Mapping[int, None] = self._foreign.get(lo, {})
            movable = [b for b in shares[hi] if b[0] not in moved]
            warm = [b for b in movable if b[0] in held]
            if not warm:
                if not warm_up and len(held) < self.max_foreign_bins and movable:
                    warm_up.append((lo, movable[-1][0]))
                break
            shares[hi].remove(warm[-1])
            shares[lo].append(warm[-1])
            moved.add(warm[-1][0])
        return shares, warm_up

    def _note_foreign(self, shard: int, bin_id: int) -> None:
        """Mirror the shard's foreign cache (least recently used first, as the worker keeps it)."""
        held = self._foreign.setdefault(shard, OrderedDict())
        held[bin_id] = None
        held.move_to_end(bin_id)
        while len(held) > self.max_foreign_bins:
            held.popitem(last=False)

    def _background(self, job: Awaitable[Any]) -> None:
        async def run() -> None:
            # the tenant's background share, as the service's own background work
            fair_queue.share.set(fair_queue.background_share(fair_queue.share.get()))
            try:
                await job
            except (VeilfaceError, RuntimeError, OSError) as exc:  # an optimization: never fail a query
                log.debug("background load of a foreign bin failed: %s", exc)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def broadcast(self, fn: Callable[..., T], *args: Any) -> list[T]:
        return list(await asyncio.gather(*(self.call(i, fn, *args) for i in range(self.n))))


class WorkerPool(ScoringBackend):
    """``n`` local worker processes, one single-process executor each."""

    def __init__(self, db: Path | str, n: int) -> None:
        """``n`` workers, each reading the store ``db`` names (a SQLite path or a store URL)."""
        if n < 1:
            raise ValueError("at least one worker is needed")
        super().__init__()
        ctx = multiprocessing.get_context("spawn")
        self.n = n
        # Jobs submitted to each worker and not yet answered, in shared memory: the worker's
        # idle-time filler waits while its count is above zero (server/idle_work.py), so it
        # never takes the GIL from a job whose arguments are still arriving.
        self._pending = [ctx.RawValue("i", 0) for _ in range(n)]
        self._execs = [
            ProcessPoolExecutor(
                1, mp_context=ctx, initializer=worker.init, initargs=(str(db), self._pending[i])
            )
            for i in range(n)
        ]
        # One job at a time per worker, round-robin over the tenants waiting
        # for it (server/fair_queue.py): no tenant's backlog delays another's query.
        self._lanes = [FairLane(ex) for ex in self._execs]
        self.stats = ScoringStats(self._lanes)

    async def call(self, idx: int, fn: Callable[..., T], *args: Any) -> T:
        self.stats.track(idx, fn, args)  # counts the bins the job makes the worker load
        self._pending[idx].value += 1  # the event loop's thread only: no lock needed
        try:
            result: T = await self._lanes[idx].submit(fn, *args)
        finally:
            self._pending[idx].value -= 1
        return result

    def shutdown(self) -> None:
        for ex in self._execs:
            ex.shutdown(wait=False, cancel_futures=True)


async def open_scoring(settings: ServerSettings, db: str) -> ScoringBackend:
    """The backend ``settings.scoring`` names, started and configured.

    ``db``: the store as the shards open it (``StoreURL.target``). A Ray
    cluster that cannot be reached raises Unavailable naming its address.
    """
    backend: ScoringBackend
    limits = worker.WorkerLimits(
        settings.max_resident_keys, settings.max_foreign_bins, settings.zero_pool
    )
    if settings.scoring == "ray":
        from veilface.server.ray_scoring import RayOptions, RayPool

        backend = await asyncio.to_thread(RayPool, db, RayOptions.from_settings(settings), limits)
    elif settings.scoring == "local":
        backend = WorkerPool(db, settings.workers)
    else:
        from veilface.errors import InvalidArgument

        raise InvalidArgument(f"--scoring {settings.scoring!r}: use local or ray")
    try:
        await backend.warm_up()
        await backend.broadcast(worker.configure, limits)
        backend.max_foreign_bins = limits.max_foreign_bins
    except BaseException:
        backend.shutdown()
        raise
    log.info("scoring: %s, %d shards", settings.scoring, backend.n)
    return backend


__all__ = ["ScoringBackend", "WorkerPool", "open_scoring"]
