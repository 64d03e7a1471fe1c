"""Per-tenant fair scheduling of the jobs sent to one scoring worker.

Each worker process runs one job at a time (SEAL's evaluator is
single-threaded). A plain executor queue is first come, first served: a
tenant that keeps several expensive jobs queued (a burst of bulk imports,
strict searches of a large gallery, or a hostile client flooding valid but
useless requests) delays every other tenant's query by all of them. A
:class:`FairLane` keeps one queue per tenant and hands the worker the next
job round-robin over the tenants that are waiting, so another tenant's job
waits for at most the one job in progress (a tenant that was not waiting
goes first; one that was waits for one job of each other waiting tenant),
whatever the size of their backlogs.

Which tenant a job belongs to is read from :data:`share`, a context
variable the authentication interceptor sets for the call
(``veilface.server.auth``). Background work started by a call (bin
preloads after a bulk import, centre precomputation, compaction) runs under
the tenant's *background* share (:func:`background_share`), a queue of its
own: a tenant's acknowledged enrollments and queries wait for at most one
background job (one bin), not for all the bins its import left to load.
Calls with no tenant (start-up, the admin) share one lane of their own.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

#: The fair-share key of the current call (the tenant id; "" for none).
share: contextvars.ContextVar[str] = contextvars.ContextVar("veilface_share", default="")


def background_share(key: str) -> str:
    """The share key of background work started under ``key`` (never a tenant id: NUL inside)."""
    return key if key.endswith("\x00background") else f"{key}\x00background"


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    done: asyncio.Future[Any]


class FairLane:
    """Round-robin over tenants in front of a single-process executor."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self._waiting: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._busy = False
        self.waiting = 0  # jobs queued, as a plain int the metrics endpoint reads from its thread

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(fn, args, loop.create_future())
        tenant = share.get()
        if tenant not in self._waiting:
            # A tenant that was not waiting goes first: the ones waiting were served last.
            self._waiting[tenant] = deque()
            self._waiting.move_to_end(tenant, last=False)
        self._waiting[tenant].append(job)
        self.waiting += 1
        self._next()
        return await job.done

    def _next(self) -> None:
        while not self._busy and self._waiting:
            tenant, jobs = next(iter(self._waiting.items()))
            job = jobs.popleft()
            self.waiting -= 1
            if jobs:
                self._waiting.move_to_end(tenant)  # the others go first next time
            else:
                del self._waiting[tenant]
            if job.done.cancelled():  # its caller gave up while it waited
                continue
            self._busy = True
            running = asyncio.get_running_loop().run_in_executor(self.executor, job.fn, *job.args)
            running.add_done_callback(functools.partial(self._finished, job=job))

    def _finished(self, result: asyncio.Future[Any], job: _Job) -> None:
        self._busy = False
        if not job.done.cancelled():
            if result.cancelled():
                job.done.cancel()
            elif (exc := result.exception()) is not None:
                job.done.set_exception(exc)
            else:
                job.done.set_result(result.result())
        self._next()
