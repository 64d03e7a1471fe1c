"""The pool of scoring workers, seen from the asyncio server.

One single-process executor per worker gives bin affinity: the bins of
worker ``i`` are those with ``bin_id % n == i``, so each bin is deserialized
once and stays in that worker's memory. Workers are started with ``spawn``
(no fork of the gRPC process).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from veilface.server import worker

T = TypeVar("T")


class WorkerPool:
    def __init__(self, db_path: Path, n: int) -> None:
        if n < 1:
            raise ValueError("at least one worker is needed")
        ctx = multiprocessing.get_context("spawn")
        self.n = n
        self._execs = [
            ProcessPoolExecutor(1, mp_context=ctx, initializer=worker.init, initargs=(str(db_path),))
            for _ in range(n)
        ]

    def owner(self, bin_id: int) -> int:
        return bin_id % self.n

    async def call(self, idx: int, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._execs[idx], fn, *args)

    async def warm_up(self) -> None:
        await asyncio.gather(*(self.call(i, worker.ping) for i in range(self.n)))

    async def score(
        self,
        tenant_id: str,
        key_id: str,
        bins: Sequence[tuple[int, int]],
        probe: Sequence[bytes],
        stage: str,
    ) -> dict[int, bytes | None]:
        """Score bins on their owners in parallel; returns bin_id -> score ciphertext."""
        groups: dict[int, list[tuple[int, int]]] = {}
        for b in bins:
            groups.setdefault(self.owner(b[0]), []).append(b)
        results = await asyncio.gather(
            *(
                self.call(i, worker.score, tenant_id, key_id, group, list(probe), stage)
                for i, group in groups.items()
            )
        )
        out: dict[int, bytes | None] = {}
        for group, res in zip(groups.values(), results, strict=True):
            for (bin_id, _), blob in zip(group, res, strict=True):
                out[bin_id] = blob
        return out

    def shutdown(self) -> None:
        for ex in self._execs:
            ex.shutdown(wait=False, cancel_futures=True)
