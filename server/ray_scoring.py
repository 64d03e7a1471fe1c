"""Scoring shards as actors of a Ray cluster (``veilface serve --scoring ray``).

Each shard is a Ray actor running the same :mod:`veilface.server.worker`
code as a local worker process: it opens its own reader of the store
(PostgreSQL, which every node reaches; or a SQLite file every node sees)
and loads the bins it owns from there. The front-end sends a shard only
what a local worker gets: probe ciphertexts, bin ids and versions, slot
lists; the shard returns masked score ciphertexts. No bin travels through
the front-end.

Sharing. Actors are named ``shard-<i>-of-<n>`` in a namespace derived from
the store (``veilface-<hash of the URL without password>``, or
``--ray-namespace``) and detached from the front-end that created them: a
second front-end on the same store and cluster finds them by name and uses
them, with their shard count (the bins are loaded once for all front-ends,
and a front-end's cache drops reach every one); a front-end of another
store, or given another ``--ray-shards``, gets its own and coexists. The actors
stay up when the front-ends stop (they are a cache of the store; ``ray
stop`` on the cluster, or a new namespace, drops them).

Faults. Actors reserve a hundredth of a CPU (:data:`SHARD_CPUS`: enough
for Ray to honour their placement, which it ignores for zero-resource
actors; little enough that a shard lost with its node can always be placed
again on a surviving one, whose own shards hold its whole CPUs), and are
restarted by Ray without limit (``max_restarts=-1``): when a node dies, the
head's GCS notices (its health checks, about 15 s by default) and restarts
the node's actors elsewhere; a restarted actor's cache is empty, so its
next call reloads the bins it needs from the store, at the versions the
call names. A call a shard lost is retried (every worker function is
idempotent) until the shard is back, for at most ``recovery_s``, then
raises Unavailable. If Ray gave an actor up (killed), the first front-end
that notices creates it again under the same name. A version carried by
every score unit makes a shard reload a bin some front-end changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from veilface.errors import FailedPrecondition, InvalidArgument, Unavailable, VeilfaceError
from veilface.server import worker
from veilface.server.fair_queue import FairLane
from veilface.server.metrics import ScoringStats
from veilface.server.scoring import ScoringBackend
from veilface.server.store.factory import redact

if TYPE_CHECKING:
    from veilface.server.config import ServerSettings

T = TypeVar("T")
log = logging.getLogger(__name__)

#: The CPU a shard reserves (see the module docstring): placement, not a limit.
SHARD_CPUS = 0.01
#: Seconds to wait for a TCP connection to the head before calling the cluster unreachable.
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RayOptions:
    """Where the shards live and how long a lost one is waited for (``ServerSettings.ray_*``)."""

    address: str
    shards: int = 0  # 0: one per CPU of the cluster's live nodes
    namespace: str = ""  # "": derived from the store
    recovery_s: float = 60.0
    call_timeout_s: float = 300.0
    detached: bool = True  # False: the actors end with this front-end (not shared)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RayOptions:
        if not settings.ray_address:
            raise InvalidArgument("--scoring ray needs --ray-address HOST:PORT (the head's GCS)")
        return cls(
            settings.ray_address,
            settings.ray_shards,
            settings.ray_namespace,
            settings.ray_recovery_s,
            settings.ray_call_timeout_s,
            settings.ray_detached,
        )


def namespace_for(db: str) -> str:
    """The Ray namespace of a store's shards: front-ends of one store share it."""
    return "veilface-" + hashlib.sha256(redact(db).encode()).hexdigest()[:12]


def shard_name(i: int, n: int) -> str:
    return f"shard-{i}-of-{n}"


_SHARD_NAME = re.compile(r"shard-\d+-of-(\d+)")


class ShardActor:
    """What runs in a Ray actor: a scoring worker (:mod:`veilface.server.worker`)."""

    def __init__(self, db: str, limits: worker.WorkerLimits) -> None:
        worker.init(db)
        worker.configure(limits)

    def run(self, name: str, args: tuple[Any, ...]) -> Any:
        fn = getattr(worker, name, None)
        if not callable(fn) or name.startswith("_"):
            raise InvalidArgument(f"no worker function {name!r}")
        return fn(*args)

    def where(self) -> tuple[str, int]:
        """This actor's node id and process id (tests, logs)."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()


def _check_reachable(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"--ray-address {address!r}: give HOST:PORT of the Ray head (its GCS)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise Unavailable(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start its head "
            "with `ray start --head --port PORT` or fix --ray-address"
        ) from None


class _ShardExecutor(Executor):
    """The :class:`FairLane` executor of one shard: each job is a (retried) call to its actor."""

    def __init__(self, pool: RayPool, idx: int) -> None:
        self.pool = pool
        self.idx = idx

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if kwargs:
            raise TypeError("worker functions take positional arguments only")
        return self.pool._threads.submit(self.pool._call_blocking, self.idx, fn, args)


class RayPool(ScoringBackend):
    """Shards as named, detached actors of the Ray cluster at ``options.address``.

    Connecting (in the constructor) blocks: run it off the event loop.
    """

    def __init__(self, db: str, options: RayOptions, limits: worker.WorkerLimits) -> None:
        super().__init__()
        try:
            import ray
        except ImportError:
            raise FailedPrecondition("--scoring ray needs Ray: pip install 'veilface[ray]'") from None
        self._ray = ray
        self.options = options
        self.namespace = options.namespace or namespace_for(db)
        self._db = db
        self._limits = limits
        _check_reachable(options.address)
        try:
            with warnings.catch_warnings():  # Ray's notice about GPU variables: no GPU here
                warnings.simplefilter("ignore", FutureWarning)
                ray.init(
                    address=options.address,
                    namespace=self.namespace,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
        except Exception as err:  # version mismatch, a port that is not a GCS...
            raise Unavailable(
                f"cannot join the Ray cluster at {options.address} ({type(err).__name__}); a "
                "front-end joins through a Ray node of its own machine: if there is none, run "
                f"`ray start --address {options.address} --num-cpus 0` here"
            ) from err
        try:
            nodes = self._start_shards()
        except BaseException:
            ray.shutdown()
            raise
        log.info(
            "Ray cluster %s: %d live nodes, %d shards in namespace %s",
            options.address, len(nodes), self.n, self.namespace,
        )

    def _start_shards(self) -> list[dict[str, Any]]:
        """Find or create the shards' actors; the live nodes seen."""
        ray = self._ray
        nodes = [nd for nd in ray.nodes() if nd.get("Alive")]
        slots = _cpu_slots(nodes)
        # A front-end joining shards already up uses them, whatever the cluster's size now.
        self.n = self.options.shards or self._existing_shards() or max(1, len(slots))
        self._cls = ray.remote(num_cpus=SHARD_CPUS, max_restarts=-1, max_task_retries=0)(ShardActor)
        self._handles = [self._get_or_create(i, slots[i % len(slots)] if slots else None)
                         for i in range(self.n)]
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(self.n, thread_name_prefix="ray-shard")
        self._lanes = [FairLane(_ShardExecutor(self, i)) for i in range(self.n)]
        self.stats = ScoringStats(self._lanes)
        self._restarted = [False] * self.n  # set by a call's thread when its shard came back
        self.shard_reloads = 0
        return nodes

    def _existing_shards(self) -> int:
        """The shard count of the actors already named in this namespace (0: none)."""
        from ray.util import list_named_actors

        counts = [
            int(m.group(1))
            for name in list_named_actors()
            if (m := _SHARD_NAME.fullmatch(str(name))) is not None
        ]
        return max(counts, default=0)

    def _get_or_create(self, idx: int, node_id: str | None) -> Any:
        """The shard's actor: the one of that name if alive, else a new one (near ``node_id``)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict[str, Any] = {
            "name": shard_name(idx, self.n),
            "namespace": self.namespace,
            "get_if_exists": True,
        }
        if self.options.detached:
            opts["lifetime"] = "detached"
        if node_id is not None:  # soft: anywhere when that node is gone
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
        return self._cls.options(**opts).remote(self._db, self._limits)

    def _refresh(self, idx: int, failed: Any) -> None:
        """After a failure of ``failed``: the actor now registered under the shard's name.

        Ray restarts a lost actor under the same handle; only an actor Ray
        gave up on (killed, or dead for good) has left its name free, and is
        created again (by whichever front-end gets there first).
        """
        ray = self._ray
        with self._lock:
            if self._handles[idx] is not failed:
                return  # another thread already moved on
            try:
                handle = ray.get_actor(shard_name(idx, self.n), namespace=self.namespace)
            except ValueError:
                log.warning("scoring shard %d is gone; creating it again", idx)
                handle = self._get_or_create(idx, None)
            self._handles[idx] = handle

    def _call_blocking(self, idx: int, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """``fn(*args)`` on shard ``idx``, waiting for a lost shard to come back (in a thread)."""
        from ray import exceptions as rx

        lost = _lost_errors()
        name = fn.__name__
        if getattr(worker, name, None) is not fn:
            raise ValueError(f"{name} is not a veilface.server.worker function")
        deadline = time.monotonic() + self.options.recovery_s
        delay, failures = 0.1, 0
        while True:
            handle = self._handles[idx]
            ref = None
            try:
                ref = handle.run.remote(name, args)
                result: T = self._ray.get(ref, timeout=self.options.call_timeout_s)
            except rx.RayTaskError as err:  # the worker's own error: re-raised as it is
                cause = err.cause
                if isinstance(cause, VeilfaceError | ValueError | LookupError):
                    raise cause from None
                raise
            except rx.GetTimeoutError:
                if ref is not None:
                    self._ray.cancel(ref, force=True)
                raise Unavailable(
                    f"scoring shard {idx} did not answer within {self.options.call_timeout_s:g} s"
                ) from None
            except lost as err:
                failures += 1
                if time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"scoring shard {idx} of {self.n} was lost (its Ray actor or node died) "
                        f"and is not back after {self.options.recovery_s:g} s; retry later"
                    ) from None
                log.warning("scoring shard %d lost (%s); retrying", idx, type(err).__name__)
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
                self._refresh(idx, handle)
                continue
            except rx.RayError as err:  # Ray itself failed (not the worker): not our INTERNAL
                raise Unavailable(
                    f"scoring shard {idx}: the Ray cluster failed the call ({type(err).__name__})"
                ) from None
            if failures:
                self.shard_reloads += 1
                self._restarted[idx] = True
                log.warning("scoring shard %d is back after %d failed attempts", idx, failures)
            return result

    async def call(self, idx: int, fn: Callable[..., T], *args: Any) -> T:
        self.stats.track(idx, fn, args)  # counts the bins the job makes the shard load
        result: T = await self._lanes[idx].submit(fn, *args)
        if self._restarted[idx]:  # it came back empty: what it holds now counts again
            self._restarted[idx] = False
            self.stats.worker_restarted(idx)
            self.stats.track(idx, fn, args)
        return result

    def placement(self) -> list[tuple[str, int]]:
        """(node id, pid) of every shard's actor now (tests, ``--verbose`` logs)."""
        refs = [h.where.remote() for h in self._handles]
        return [(str(node), int(pid)) for node, pid in self._ray.get(refs, timeout=60)]

    def shutdown(self) -> None:
        """Disconnect; the detached actors stay for the other front-ends (and the next start)."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._ray.is_initialized():
            self._ray.shutdown()


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors that mean the shard (its actor, worker, node or objects) is gone for now."""
    from ray import exceptions as rx

    return (
        rx.RayActorError,  # ActorDiedError, ActorUnavailableError (restarting)
        rx.ObjectLostError,
        rx.WorkerCrashedError,
        rx.NodeDiedError,
        rx.OutOfMemoryError,  # the actor was killed for memory: Ray restarts it
        rx.RaySystemError,
    )


def _cpu_slots(nodes: Sequence[dict[str, Any]]) -> list[str]:
    """Node ids, each repeated once per CPU, interleaved (node A, node B, node A...)."""
    per_node = [(nd["NodeID"], int(nd.get("Resources", {}).get("CPU", 0))) for nd in nodes]
    slots: list[str] = []
    for round_ in range(max((c for _, c in per_node), default=0)):
        slots.extend(node for node, cpus in per_node if cpus > round_)
    return slots


__all__ = ["RayOptions", "RayPool", "ShardActor", "namespace_for", "shard_name"]
