"""The pool of scoring workers, seen from the asyncio server.

One single-process executor per worker gives bin affinity: the bins of
worker ``i`` are those with ``bin_id % n == i``, so each bin is deserialized
once and stays in that worker's memory. Workers are started with ``spawn``
(no fork of the gRPC process).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from veilface.server import worker
from veilface.server.fair_queue import FairLane
from veilface.server.metrics import ScoringStats

T = TypeVar("T")


class WorkerPool:
    def __init__(self, db: Path | str, n: int) -> None:
        """``n`` workers, each reading the store ``db`` names (a SQLite path or a store URL)."""
        if n < 1:
            raise ValueError("at least one worker is needed")
        ctx = multiprocessing.get_context("spawn")
        self.n = n
        self._execs = [
            ProcessPoolExecutor(1, mp_context=ctx, initializer=worker.init, initargs=(str(db),))
            for _ in range(n)
        ]
        # One job at a time per worker, round-robin over the tenants waiting
        # for it (server/fair_queue.py): no tenant's backlog delays another's query.
        self._lanes = [FairLane(ex) for ex in self._execs]
        self.stats = ScoringStats(self._lanes)  # read by the metrics endpoint (server/metrics.py)

    def owner(self, bin_id: int) -> int:
        return bin_id % self.n

    async def call(self, idx: int, fn: Callable[..., T], *args: Any) -> T:
        self.stats.track(idx, fn, args)  # counts the bins the job makes the worker load
        result: T = await self._lanes[idx].submit(fn, *args)
        return result

    async def warm_up(self) -> None:
        await asyncio.gather(*(self.call(i, worker.ping) for i in range(self.n)))

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
        than workers, each bin's giant steps are split across all workers
        (every worker can load any bin; its owner keeps it warm), so a small
        gallery still uses every core. Otherwise each worker scores the bins
        it owns. ``query_id``: the probe is that cached query's (workers keep
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
            for bin_id, version in bins:
                units.setdefault(self.owner(bin_id), []).append(
                    worker.ScoreUnit(
                        bin_id, version, giants.start, giants.stop, add_center, keep[bin_id]
                    )
                )
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

    async def broadcast(self, fn: Callable[..., T], *args: Any) -> list[T]:
        return list(await asyncio.gather(*(self.call(i, fn, *args) for i in range(self.n))))

    def shutdown(self) -> None:
        for ex in self._execs:
            ex.shutdown(wait=False, cancel_futures=True)
