"""Per-tenant limits on concurrent calls and on scoring work in flight.

One tenant's token must not be able to take the service from the others:
each tenant may have at most ``max_concurrent_requests`` calls in progress
(a stream counts until it ends) and at most ``max_scoring_bins`` bins being
scored at once over all its calls. Past either limit a call is answered
RESOURCE_EXHAUSTED at once (never queued, so a flood costs the server no
memory); the client retries later. One request alone is always admitted
when the tenant has nothing else being scored, so a strict query over
``max_bins_per_request`` bins still runs, and is accounted for.

The admin (no tenant) is not limited. Everything here runs on the server's
event loop, so the counters need no lock.

:func:`bound_heap_growth` keeps the process from holding on to the memory of
large requests after they are gone (see its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc

from veilface.errors import ResourceExhausted, VeilfaceError
from veilface.server.auth import current_principal
from veilface.server.errors_map import end_call

log = logging.getLogger(__name__)

# Methods of our services; health checks and reflection are not limited.
_LIMITED_PREFIX = "/veilface."


class TenantLimiter:
    """Counters of calls and of bins being scored, per tenant."""

    def __init__(self, max_requests: int, max_scoring_bins: int) -> None:
        if max_requests < 1 or max_scoring_bins < 1:
            raise ValueError("limits must be at least 1")
        self.max_requests = max_requests
        self.max_scoring_bins = max_scoring_bins
        self._requests: dict[str, int] = {}
        self._scoring: dict[str, int] = {}

    def in_progress(self, tenant_id: str) -> int:
        return self._requests.get(tenant_id, 0)

    def scoring_in_flight(self, tenant_id: str) -> int:
        return self._scoring.get(tenant_id, 0)

    def acquire_request(self, tenant_id: str) -> None:
        """Count one more call of the tenant, or raise ResourceExhausted."""
        n = self._requests.get(tenant_id, 0)
        if n >= self.max_requests:
            raise ResourceExhausted(
                f"this tenant already has {n} calls in progress, the most allowed at once; "
                "retry when one has finished"
            )
        self._requests[tenant_id] = n + 1

    def release_request(self, tenant_id: str) -> None:
        n = self._requests.get(tenant_id, 0) - 1
        if n > 0:
            self._requests[tenant_id] = n
        else:
            self._requests.pop(tenant_id, None)

    @contextlib.contextmanager
    def scoring(self, tenant_id: str, bins: int) -> Iterator[None]:
        """Hold ``bins`` bins of scoring work for the tenant while the block runs."""
        busy = self._scoring.get(tenant_id, 0)
        if busy and busy + bins > self.max_scoring_bins:
            raise ResourceExhausted(
                f"this tenant has {busy} bins being scored; {bins} more would pass the "
                f"limit of {self.max_scoring_bins} at once: retry when a query has finished"
            )
        self._scoring[tenant_id] = busy + bins
        try:
            yield
        finally:
            left = self._scoring.get(tenant_id, 0) - bins
            if left > 0:
                self._scoring[tenant_id] = left
            else:
                self._scoring.pop(tenant_id, None)


def _caller_tenant() -> str | None:
    try:
        tenant: str | None = current_principal().tenant_id
    except VeilfaceError:
        return None
    return tenant


class TenantLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuse a tenant's call past ``max_concurrent_requests`` with RESOURCE_EXHAUSTED.

    Must come after the authentication interceptor in the server's list, so
    the caller is known when the call runs.
    """

    def __init__(self, limiter: TenantLimiter, trimmer: HeapTrimmer | None = None) -> None:
        self.limiter = limiter
        self.trimmer = trimmer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not (details.method or "").startswith(_LIMITED_PREFIX):
            return handler
        return _limited(handler, self.limiter, self.trimmer)


def _limited(
    handler: grpc.RpcMethodHandler, limiter: TenantLimiter, trimmer: HeapTrimmer | None
) -> grpc.RpcMethodHandler:
    async def run(behaviour: Callable[..., Awaitable[Any]], request: Any, context: Any) -> Any:
        tenant = _caller_tenant()
        if tenant is None:
            return await behaviour(request, context)
        refused = ""
        try:
            limiter.acquire_request(tenant)
        except ResourceExhausted as err:
            refused = err.message
        if refused:
            return end_call(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            return await behaviour(request, context)
        finally:
            limiter.release_request(tenant)
            if trimmer is not None:
                trimmer.call_ended()

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await run(inner, request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_s = handler.stream_unary

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            return await run(inner_s, request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    return handler


class HeapTrimmer:
    """Give the heap memory of finished calls back to the system a moment after they end.

    A large request leaves its megabytes as free chunks in the heaps of the
    threads that handled it (gRPC's, the event loop's, ``to_thread``'s),
    which glibc keeps mapped: with the reference cycles of refused requests
    (see :func:`veilface.server.errors_map.end_call`) the server grew by
    gigabytes under a fuzzer and stayed there. A moment after calls end
    this runs ``malloc_trim(0)``, at most once per ``delay_s``, on the event
    loop (a few milliseconds). A no-op where this is not glibc.
    """

    def __init__(self, delay_s: float = 2.0) -> None:
        self.delay_s = delay_s
        self._scheduled = False
        try:
            self._trim: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def call_ended(self) -> None:
        if self._trim is None or self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._scheduled = True
        loop.call_later(self.delay_s, self._run)

    def _run(self) -> None:
        self._scheduled = False
        if self._trim is not None:
            self._trim(0)


def bound_heap_growth(mmap_threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``mmap_threshold`` bytes and more with mmap.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a
    large mmapped block is freed; after a few large requests, megabyte
    buffers (gRPC messages, packed bins) come from the heap and stay mapped
    after they are freed: the process kept 2 GB after a fuzz run. A fixed
    threshold turns that adjustment off, so a large buffer goes back to the
    system when it is freed. Small allocations (ciphertexts, SEAL's pools)
    are not affected. Returns False where this is not glibc (nothing done).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(
        mallopt(m_trim_threshold, 2 * mmap_threshold)
    )
    if not ok:
        log.debug("mallopt refused the heap settings")
    return ok


__all__ = ["HeapTrimmer", "TenantLimitInterceptor", "TenantLimiter", "bound_heap_growth"]
