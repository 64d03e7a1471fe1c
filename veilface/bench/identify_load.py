"""``bench identify --concurrency C``: C clients identifying at once, each in its own process.

Each client is a separate process (spawned) with its own :class:`VeilClient`,
so its own gRPC channel, slot maps and CKKS decryptor: a client's
encryption and decryption hold the GIL (TenSEAL), so threads of one process
would measure the bench's GIL rather than the service. The clients load the
tenant's state from a file sealed with a throwaway key file (in a temporary
folder, removed at the end), identify one probe each to warm up (the first
query syncs the bins' slot maps), wait at a barrier, then run their share of
the probes (probe ``i`` goes to client ``i mod C``) back to back.

``qps`` is all the queries over the wall time from the barrier to the last
client's last answer; each query's own latency is kept, so p50/p95 are
under that load. A client encrypts its probes itself (``encrypt_workers=0``:
C clients already keep the cores busy). Each client reports the CPU time
of its queries, which the bench adds to ``us_per_template_core`` (the
processes are gone before the bench reads its own children).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from veilface.client.search import Identification
    from veilface.client.tenant_state import TenantState

#: How long the clients may take to start and warm up (a first query syncs every bin's slot map).
WARMUP_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class LoadResult:
    """Answers in probe order, the wall time of the timed part, the clients' CPU seconds."""

    answers: list[Identification]
    wall_s: float
    client_cpu_s: float


@dataclass(frozen=True)
class _Job:
    """What one client process needs (picklable)."""

    index: int
    target: str
    token: str
    state_path: Path
    key_file: Path
    probes: npt.NDArray[np.float32]
    positions: list[int]
    search: dict[str, Any]


def identify_concurrently(
    target: str,
    token: str,
    state: TenantState,
    probes: npt.NDArray[np.float32],
    concurrency: int,
    search: dict[str, Any],
) -> LoadResult:
    """Identify ``probes`` with ``concurrency`` client processes at once (see the module docstring).

    ``search``: the keywords of :meth:`VeilClient.identify` (mode, k, nprobe).
    Raises RuntimeError if a client fails or does not start in time.
    """
    from veilface.crypto.secret_files import generate_key_file

    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    c = min(concurrency, len(probes)) or 1
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="veilface-load-") as tmp:
        key_file = generate_key_file(Path(tmp) / "state.key")
        state_path = Path(tmp) / "tenant.vfk"
        state.save(state_path, key_file=key_file)
        barrier = ctx.Barrier(c + 1)
        results: mp.Queue[tuple[int, Any]] = ctx.Queue()
        jobs = [
            _Job(i, target, token, state_path, key_file, probes[i::c], list(range(i, len(probes), c)), search)
            for i in range(c)
        ]
        procs = [ctx.Process(target=_client, args=(j, barrier, results), daemon=True) for j in jobs]
        for p in procs:
            p.start()
        try:
            try:
                barrier.wait(WARMUP_TIMEOUT_S)
            except Exception as err:  # a client died or hung while warming up
                raise RuntimeError(f"the load clients did not all start: {_first_error(results)}") from err
            t0 = time.monotonic()
            answers: list[Identification | None] = [None] * len(probes)
            end, cpu = t0, 0.0
            for _ in range(c):
                got = _get(results, procs)
                if got[0] < 0:
                    raise RuntimeError(f"a load client failed: {got[1]}")
                positions, answered, t_end, cpu_s = got[1]
                for pos, ans in zip(positions, answered, strict=True):
                    answers[pos] = ans
                end, cpu = max(end, t_end), cpu + cpu_s
        finally:
            for p in procs:
                p.join(10.0)
                if p.is_alive():
                    p.kill()
    done = [a for a in answers if a is not None]
    if len(done) != len(probes):
        raise RuntimeError("a load client left probes unanswered")
    return LoadResult(done, end - t0, cpu)


def _get(results: mp.Queue[tuple[int, Any]], procs: list[Any]) -> tuple[int, Any]:
    while True:
        try:
            return results.get(timeout=5.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                try:
                    return results.get(timeout=1.0)
                except queue.Empty:
                    return (-1, "every load client exited without an answer")


def _first_error(results: mp.Queue[tuple[int, Any]]) -> str:
    try:
        got = results.get(timeout=1.0)
    except queue.Empty:
        return "no client reported an error (timed out)"
    return str(got[1]) if got[0] < 0 else "a client answered before the start"


def _client(job: _Job, barrier: Any, results: mp.Queue[tuple[int, Any]]) -> None:
    """One client process: load the state, warm up, wait for the start, identify its share."""
    import psutil

    from veilface.client.sdk import VeilClient
    from veilface.client.tenant_state import TenantState

    try:
        state = TenantState.load(job.state_path, key_file=job.key_file)
        with VeilClient(job.target, state, token=job.token, encrypt_workers=0) as client:
            if len(job.probes):
                client.identify(job.probes[0], **job.search)
            barrier.wait(WARMUP_TIMEOUT_S)
            me = psutil.Process()
            cpu0 = sum(me.cpu_times()[:2])
            answered = [client.identify(p, **job.search) for p in job.probes]
            t_end = time.monotonic()
            cpu = sum(me.cpu_times()[:2]) - cpu0
        results.put((job.index, (job.positions, answered, t_end, cpu)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        results.put((-1, f"client {job.index}: {type(err).__name__}: {err}"))
        barrier.abort()  # the parent and the other clients stop waiting


__all__ = ["LoadResult", "identify_concurrently"]
