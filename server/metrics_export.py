"""The Prometheus endpoint: RPC metrics from an interceptor, gallery and scoring gauges.

Imported only when the endpoint is on (:func:`veilface.server.metrics.start_metrics`);
``prometheus_client`` is in the ``server`` extra. Every server has its own
:class:`~prometheus_client.CollectorRegistry` (never the process-wide
default), served over HTTP by prometheus-client's WSGI server on its own
thread and stopped with the server. The metrics are listed in
docs/architecture.md, "Metrics".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from veilface.loopback import is_loopback_host
from veilface.server.metrics import ScoringStats
from veilface.server.store.base import GalleryStore

log = logging.getLogger(__name__)

#: Latency buckets (seconds): a DescribeTenant takes about a millisecond, a
#: strict search of a large gallery seconds, a bulk import stream minutes.
RPC_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
)

#: Seconds the per-tenant counts read from the store are reused: a scrape
#: every few seconds then costs the database one read per tenant this often.
TENANT_REFRESH_S = 30.0

_UNKNOWN = ("unknown", "unknown")  # a method no service registers (UNIMPLEMENTED)


def _split(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return (service, name) if service and name else _UNKNOWN


def _code_name(code: object) -> str:
    """The gRPC code name the call ended with (``None``: nothing set, so OK)."""
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN"


class RpcMetrics:
    """Calls per method and status, their latency, and calls in progress."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_service", "grpc_method")
        self.handled = Counter(
            "veilface_rpc_handled",
            "RPCs completed, by method and gRPC status code name",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.duration = Histogram(
            "veilface_rpc_duration_seconds",
            "Time from the start of a call's handler to its end (a stream: to its last message)",
            (*labels, "grpc_code"),
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "veilface_rpc_in_progress", "RPCs being handled now", labels, registry=registry
        )

    def ended(self, labels: tuple[str, str], code: str, seconds: float) -> None:
        self.handled.labels(*labels, code).inc()
        self.duration.labels(*labels, code).observe(seconds)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Count and time every call, unary and streaming, with the status it ended with.

    First in the server's interceptor list, so calls the later interceptors
    refuse (an unknown token, a scope, a tenant's call limit, a malformed
    message) are counted with their status too. The status is what the call
    set (``context.set_code``, ``context.abort``), OK when it set none,
    UNKNOWN when its handler raised, CANCELLED or DEADLINE_EXCEEDED when it
    was cancelled. Only the method and the code name are labels.
    """

    def __init__(self, rpc: RpcMetrics) -> None:
        self.rpc = rpc

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:  # gRPC answers UNIMPLEMENTED; the name is the caller's, not ours
            self.rpc.handled.labels(*_UNKNOWN, "UNIMPLEMENTED").inc()
            return handler
        return _observed(handler, _split(details.method or ""), self.rpc)


@dataclass
class _Call:
    """One call being measured."""

    rpc: RpcMetrics
    labels: tuple[str, str]
    context: grpc.aio.ServicerContext
    started: float = 0.0
    code: str = "UNKNOWN"

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.rpc.in_progress.labels(*self.labels).inc()

    def finished(self) -> None:
        self.code = _code_name(self.context.code())

    def failed(self, err: BaseException) -> None:
        if isinstance(err, grpc.aio.AbortError):
            self.code = _code_name(self.context.code())
        elif isinstance(err, (asyncio.CancelledError, GeneratorExit)):
            left = self.context.time_remaining()
            self.code = "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
        else:  # gRPC answers UNKNOWN for an exception out of a handler
            self.code = "UNKNOWN"

    def close(self) -> None:
        self.rpc.in_progress.labels(*self.labels).dec()
        self.rpc.ended(self.labels, self.code, time.perf_counter() - self.started)


def _observed(
    handler: grpc.RpcMethodHandler, labels: tuple[str, str], rpc: RpcMetrics
) -> grpc.RpcMethodHandler:
    """``handler`` with the same shape and (de)serializers, measured."""
    serializers = (handler.request_deserializer, handler.response_serializer)
    single: Any = handler.unary_unary or handler.stream_unary
    if single is not None:

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(rpc, labels, context)
            try:
                result = await single(request, context)
                call.finished()
                return result
            except BaseException as err:
                call.failed(err)
                raise
            finally:
                call.close()

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(unary, *serializers)
    streamed: Any = handler.unary_stream or handler.stream_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(rpc, labels, context)
        try:
            result = streamed(request, context)
            if hasattr(result, "__aiter__"):  # an async generator behaviour
                try:
                    async for item in result:
                        yield item
                finally:
                    await result.aclose()
            else:  # a coroutine writing with context.write()
                await result
            call.finished()
        except BaseException as err:
            call.failed(err)
            raise
        finally:
            call.close()

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(stream, *serializers)


@dataclass(frozen=True)
class _Counts:
    """Bins, templates and staged templates (of one tenant, or of all)."""

    bins: int = 0
    templates: int = 0
    staged: int = 0

    def __add__(self, other: _Counts) -> _Counts:
        return _Counts(
            self.bins + other.bins, self.templates + other.templates, self.staged + other.staged
        )


class GalleryCollector:
    """Bins and templates per tenant, read from the store when scraped (counts only).

    Read at most every :data:`TENANT_REFRESH_S` seconds (the store is the
    truth: several front-ends may share it, so counting enrollments here
    would miss the others'). Tenants are those with a valid API token (a
    tenant whose every token is revoked cannot call; its bins stay in the
    store). With ``tenant_label`` off the counts are summed over tenants.
    A store that cannot be read leaves the counts out of the scrape and
    counts a read error.
    """

    def __init__(self, store: GalleryStore, *, tenant_label: bool) -> None:
        self.store = store
        self.tenant_label = tenant_label
        self._lock = threading.Lock()  # concurrent scrapes read the store once
        self._read_at = 0.0
        self._counts: dict[str, _Counts] | None = None
        self._errors = 0

    def describe(self) -> Iterator[Metric]:
        yield from self._gauges()
        yield self._error_family()

    def collect(self) -> Iterator[Metric]:
        counts = self._current()
        if counts is not None:
            tenants, bins, templates, staged = gauges = self._gauges()
            tenants.add_metric([], len(counts))
            if self.tenant_label:
                rows = sorted(counts.items())
            else:
                rows = [("", sum(counts.values(), _Counts()))]
            for tenant, c in rows:
                labels = [tenant] if self.tenant_label else []
                bins.add_metric(labels, c.bins)
                templates.add_metric(labels, c.templates)
                staged.add_metric(labels, c.staged)
            yield from gauges
        yield self._error_family()

    def _gauges(self) -> tuple[GaugeMetricFamily, ...]:
        labels = ["tenant"] if self.tenant_label else []
        return (
            GaugeMetricFamily("veilface_tenants", "Tenants with a valid API token"),
            GaugeMetricFamily("veilface_bins", "Active bins", labels=labels),
            GaugeMetricFamily("veilface_templates", "Templates enrolled in bins", labels=labels),
            GaugeMetricFamily(
                "veilface_staged_templates", "Templates staged, awaiting their fold", labels=labels
            ),
        )

    def _error_family(self) -> CounterMetricFamily:
        errors = CounterMetricFamily(
            "veilface_gallery_read_errors",
            "Scrapes whose gallery counts could not be read from the store",
        )
        errors.add_metric([], self._errors)
        return errors

    def _current(self) -> dict[str, _Counts] | None:
        with self._lock:
            now = time.monotonic()
            if self._counts is not None and now - self._read_at < TENANT_REFRESH_S:
                return self._counts
            try:
                self._counts = self._read()
                self._read_at = now
            except Exception as err:  # noqa: BLE001 - a store that is down must not break the scrape
                self._errors += 1
                self._counts = None
                log.warning("metrics: could not read the gallery counts (%s)", type(err).__name__)
            return self._counts

    def _read(self) -> dict[str, _Counts]:
        out: dict[str, _Counts] = {}
        for tenant in sorted({t.tenant_id for t in self.store.active_tokens()}):
            total = _Counts()
            for _, stats in self.store.list_keys(tenant):
                total = total + _Counts(stats.bins, stats.subjects, stats.staged)
            out[tenant] = total
        return out


class ScoringCollector:
    """The scoring backend's queues, work in flight and shard loads (:class:`ScoringStats`)."""

    def __init__(self, stats: ScoringStats) -> None:
        self.stats = stats

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        queued, running, bins, loads = families = self._families()
        queued.add_metric([], self.stats.jobs_queued())
        running.add_metric([], self.stats.jobs_running())
        bins.add_metric([], self.stats.bins_in_flight)
        loads.add_metric([], self.stats.shard_loads)
        return iter(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                             CounterMetricFamily]:
        return (
            GaugeMetricFamily(
                "veilface_scoring_jobs_queued", "Jobs waiting in the scoring workers' fair queues"
            ),
            GaugeMetricFamily(
                "veilface_scoring_jobs_running", "Jobs the scoring workers are running now"
            ),
            GaugeMetricFamily(
                "veilface_scoring_bins_in_flight", "Bins being scored now, over all requests"
            ),
            CounterMetricFamily(
                "veilface_shard_loads",
                "Bins a scoring worker loaded from the store into memory (first use on that "
                "worker, or again after it dropped them or was replaced)",
            ),
        )


class ServerMetrics:
    """One server's registry, its RPC interceptor and its HTTP endpoint."""

    def __init__(
        self, registry: CollectorRegistry, rpc: RpcMetrics, httpd: WSGIServer,
        thread: threading.Thread, host: str,
    ) -> None:
        self.registry = registry
        self.rpc = rpc
        self.interceptor = RpcMetricsInterceptor(rpc)
        self.host = host
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        """The port the endpoint listens on (the one picked, for ``metrics_port=0``)."""
        return int(self._httpd.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @classmethod
    def start(
        cls,
        store: GalleryStore,
        stats: ScoringStats,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tenant_label: bool = True,
    ) -> ServerMetrics:
        """Build the registry and serve it on ``host:port`` (0: a free port) from now on."""
        registry = CollectorRegistry()
        rpc = RpcMetrics(registry)
        registry.register(GalleryCollector(store, tenant_label=tenant_label))
        registry.register(ScoringCollector(stats))
        ProcessCollector(registry=registry)  # this process's CPU, memory and file descriptors
        if not is_loopback_host(host):
            log.warning(
                "the metrics endpoint on %s has no authentication or TLS: keep it on a "
                "network only Prometheus reaches",
                host,
            )
        httpd, thread = start_http_server(port, addr=host, registry=registry)
        metrics = cls(registry, rpc, httpd, thread, host)
        log.info("metrics on %s", metrics.url)
        return metrics

    def stop(self) -> None:
        """Stop serving and close the socket.

        A scrape still running may then find the store closed: it leaves the
        gallery counts out (:class:`GalleryCollector`), nothing more.
        """
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
