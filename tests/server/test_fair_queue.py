"""One tenant's backlog on a worker does not delay another tenant's job."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from veilface.server import fair_queue
from veilface.server.fair_queue import FairLane


def _job(name: str, log: list[str]) -> str:
    time.sleep(0.02)
    log.append(name)
    return name


async def _as(tenant: str, lane: FairLane, name: str, log: list[str]) -> str:
    fair_queue.share.set(tenant)  # what the auth interceptor does for a call
    return str(await lane.submit(_job, name, log))


def test_round_robin_over_tenants() -> None:
    async def run() -> list[str]:
        log: list[str] = []
        with ThreadPoolExecutor(1) as ex:
            lane = FairLane(ex)
            flood = [asyncio.create_task(_as("x", lane, f"x{i}", log)) for i in range(6)]
            await asyncio.sleep(0.005)  # x's backlog is queued first
            legit = asyncio.create_task(_as("a", lane, "a0", log))
            assert await legit == "a0"
            await asyncio.gather(*flood)
        return log

    log = asyncio.run(run())
    # FIFO would run a0 seventh; fair: right after the job in progress
    assert log.index("a0") <= 1, log
    assert sorted(log) == sorted([f"x{i}" for i in range(6)] + ["a0"])


def test_a_tenants_background_work_does_not_hold_up_its_own_calls() -> None:
    async def run() -> list[str]:
        log: list[str] = []
        with ThreadPoolExecutor(1) as ex:
            lane = FairLane(ex)
            bg = fair_queue.background_share("a")
            preloads = [asyncio.create_task(_as(bg, lane, f"bg{i}", log)) for i in range(6)]
            await asyncio.sleep(0.005)
            enroll = asyncio.create_task(_as("a", lane, "a0", log))
            assert await enroll == "a0"
            await asyncio.gather(*preloads)
        return log

    log = asyncio.run(run())
    assert log.index("a0") <= 1, log  # after the one background job in progress, not all six
    assert fair_queue.background_share(fair_queue.background_share("a")) == fair_queue.background_share("a")


def test_errors_and_cancelled_waiters() -> None:
    def boom() -> None:
        raise ValueError("bad")

    async def run() -> None:
        with ThreadPoolExecutor(1) as ex:
            lane = FairLane(ex)
            with pytest.raises(ValueError, match="bad"):
                await lane.submit(boom)
            log: list[str] = []
            first = asyncio.create_task(lane.submit(_job, "1", log))
            gone = asyncio.create_task(lane.submit(_job, "2", log))
            await asyncio.sleep(0)
            gone.cancel()
            assert await first == "1"
            assert await lane.submit(_job, "3", log) == "3"
            assert log == ["1", "3"]  # the cancelled waiter's job never ran

    asyncio.run(run())
