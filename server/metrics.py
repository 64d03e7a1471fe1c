"""What the service counts for its Prometheus endpoint, and how the endpoint starts.

Nothing here imports ``prometheus_client`` (the ``server`` extra): the
scoring side updates the plain counters of a :class:`ScoringStats` (the
local pool in ``server/scoring.py``; a Ray backend holds one too), and the
exporter (:mod:`veilface.server.metrics_export`) reads them, and the store's
counts, when Prometheus scrapes. :func:`start_metrics` imports the exporter
only when ``metrics_port`` turns the endpoint on.

What may appear in a metric (docs/architecture.md, "Metrics"): method
names, gRPC status names, counts, durations, and the tenant id (an opaque
id, not a secret; ``metrics_tenant_label`` drops it). Never a key, token,
handle, template, score, probe, bin label or address.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from veilface.errors import FailedPrecondition, InvalidArgument
from veilface.server import worker

if TYPE_CHECKING:
    import grpc

    from veilface.server.config import ServerSettings
    from veilface.server.store.base import GalleryStore


class Lane(Protocol):
    """One worker's queue of jobs (:class:`veilface.server.fair_queue.FairLane`)."""

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet handed to the worker."""
        ...

    @property
    def busy(self) -> bool:
        """Whether the worker is running a job."""
        ...


# The worker functions that make a worker process hold bins in memory (it
# keeps every bin it loaded until told to forget it), and the parameter that
# names them; and those that drop bins. Read by name, so a reordering of
# parameters cannot shift them (tests/server/test_metrics.py checks the names).
_HOLDS: dict[Callable[..., Any], str] = {
    worker.score: "units",
    worker.preload: "bin_ids",
    worker.preload_foreign: "bin_ids",
    worker.precompute_centers: "bin_ids",
    worker.current: "bin_id",
}
_DROPS: dict[Callable[..., Any], str] = {worker.forget: "bin_ids"}


def _bin_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [u.bin_id if isinstance(u, worker.ScoreUnit) else int(u) for u in value]


class ScoringStats:
    """Counters of one scoring backend, read by the metrics endpoint on scrape.

    Updated on the server's event loop (the pool's jobs, the bins being
    scored) and read from the endpoint's thread: each is a plain int, so a
    read sees a whole value. :meth:`shard_loaded` may be called from any
    thread (a Ray backend's callbacks).
    """

    def __init__(self, lanes: Sequence[Lane] = ()) -> None:
        self.lanes = lanes
        #: Bins being scored now, over every request.
        self.bins_in_flight = 0
        self._shard_loads = 0
        self._lock = threading.Lock()
        # Per worker index: the bins the pool has asked it to hold (the local
        # pool's workers keep each until told to forget it).
        self._held: dict[int, set[int]] = {}

    @property
    def shard_loads(self) -> int:
        """Bins a scoring worker loaded from the store into its memory, since start."""
        return self._shard_loads

    def shard_loaded(self, count: int = 1) -> None:
        """Count ``count`` bins (re)loaded by a worker: the call a Ray backend makes.

        The local pool counts through :meth:`track`; a backend whose workers
        (actors) report their loads themselves, or that reloads a dead
        actor's shards, calls this instead.
        """
        if count < 0:
            raise ValueError("count must be at least 0")
        with self._lock:
            self._shard_loads += count

    def worker_restarted(self, worker_idx: int) -> None:
        """Worker ``worker_idx`` came back empty (a restarted Ray actor): it holds no bin now.

        The bins it is asked for next count as loads again (:meth:`track`).
        """
        self._held.pop(worker_idx, None)

    def jobs_queued(self) -> int:
        """Jobs waiting in the workers' fair queues."""
        return sum(lane.waiting for lane in self.lanes)

    def jobs_running(self) -> int:
        """Jobs a worker is running now (at most one per worker)."""
        return sum(1 for lane in self.lanes if lane.busy)

    @contextmanager
    def scoring(self, bins: int) -> Iterator[None]:
        """Count ``bins`` as being scored for the duration of the block."""
        self.bins_in_flight += bins
        try:
            yield
        finally:
            self.bins_in_flight -= bins

    def track(self, worker_idx: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Note a job sent to worker ``worker_idx``: count the bins it makes that worker load.

        A bin counts once per worker that holds it, when the first job that
        needs it there is sent, and again after the worker was told to
        forget it (a deleted subject's bin is re-packed in place, then
        reloaded). Only what this pool asks counts: a worker bringing a bin
        another front-end changed up to date from the store (by its deltas,
        or in full after a compaction there) is not seen here.
        """
        held = self._held.setdefault(worker_idx, set())
        drop_name = _DROPS.get(fn)
        if drop_name is not None:
            held.difference_update(_bin_ids(_argument(fn, args, drop_name)))
            return
        held_name = _HOLDS.get(fn)
        if held_name is None:
            return
        new = set(_bin_ids(_argument(fn, args, held_name))) - held
        if new:
            held.update(new)
            self.shard_loaded(len(new))


_signatures: dict[Callable[..., Any], inspect.Signature] = {}


def _argument(fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> Any:
    """The argument of a call ``fn(*args)`` bound to the parameter ``name``."""
    sig = _signatures.get(fn)
    if sig is None:
        sig = _signatures[fn] = inspect.signature(fn)
    return sig.bind(*args).arguments[name]


class MetricsEndpoint(Protocol):
    """A server's running metrics endpoint (:class:`veilface.server.metrics_export.ServerMetrics`)."""

    @property
    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """Counts and times every call; first in the server's interceptor list."""
        ...

    @property
    def port(self) -> int: ...

    @property
    def url(self) -> str: ...

    def stop(self) -> None:
        """Stop serving (with the gRPC server)."""
        ...


def start_metrics(
    settings: ServerSettings, store: GalleryStore, stats: ScoringStats
) -> MetricsEndpoint | None:
    """The metrics endpoint of ``settings`` (serving once this returns), or None when off.

    ``metrics_port``: -1 off, 0 a free port (logged; :attr:`MetricsEndpoint.port`),
    else that port, on ``metrics_host``. Each server has its own registry,
    so several servers in one process do not share their counts.
    """
    port = settings.metrics_port
    if port < 0:
        return None
    if port > 65535:
        raise InvalidArgument(
            f"metrics_port {port}: use -1 (off), 0 (a free port) or a port up to 65535 "
            "(VEILFACE_METRICS_PORT, --metrics-port)"
        )
    try:
        from veilface.server.metrics_export import ServerMetrics
    except ModuleNotFoundError as err:
        if err.name != "prometheus_client":
            raise
        raise FailedPrecondition(
            "--metrics-port needs prometheus-client: pip install 'veilface[server]'"
        ) from err
    return ServerMetrics.start(
        store,
        stats,
        host=settings.metrics_host,
        port=port,
        tenant_label=settings.metrics_tenant_label,
    )


__all__ = ["Lane", "MetricsEndpoint", "ScoringStats", "start_metrics"]
