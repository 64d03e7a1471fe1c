"""The worker's idle-time filler of encryptions of zero (server/idle_work.py)."""

from __future__ import annotations

import time

from tests.server.conftest import eventually
from veilface.crypto.keys import TenantKeys
from veilface.crypto.public_context import PublicContext
from veilface.crypto.rerandomize import Rerandomizer
from veilface.server.idle_work import IdleFiller


def test_the_filler_fills_only_while_no_call_runs() -> None:
    public = PublicContext.from_bytes(TenantKeys.generate(128).public_context_bytes())
    assert public.public_key is not None
    pool = Rerandomizer(public.context, public.public_key, pool_size=4)
    filler = IdleFiller()
    with filler.busy():
        filler.want(pool)
        time.sleep(0.3)
        assert pool.pooled == 0  # a call is running: nothing is made
    assert eventually(lambda: pool.pooled == 4)  # idle: filled up to the pool's size, no further
    time.sleep(0.1)
    assert pool.pooled == 4
    filler.want(Rerandomizer(public.context, public.public_key, pool_size=0))  # no pool: ignored
    filler.want(None)


def test_the_filler_follows_the_last_key() -> None:
    public = PublicContext.from_bytes(TenantKeys.generate(128).public_context_bytes())
    assert public.public_key is not None
    first = Rerandomizer(public.context, public.public_key, pool_size=2)
    second = Rerandomizer(public.context, public.public_key, pool_size=2)
    filler = IdleFiller()
    filler.want(first)
    assert eventually(lambda: first.pooled == 2)
    filler.want(second)
    assert eventually(lambda: second.pooled == 2)


def test_the_filler_waits_while_the_server_has_a_job_on_its_way() -> None:
    import multiprocessing

    public = PublicContext.from_bytes(TenantKeys.generate(128).public_context_bytes())
    assert public.public_key is not None
    pool = Rerandomizer(public.context, public.public_key, pool_size=3)
    filler = IdleFiller()
    filler.pending = multiprocessing.get_context("spawn").RawValue("i", 1)  # as WorkerPool shares it
    filler.want(pool)
    time.sleep(0.3)
    assert pool.pooled == 0
    filler.pending.value = 0
    filler.want(pool)  # the next call's end wakes it
    assert eventually(lambda: pool.pooled == 3)
