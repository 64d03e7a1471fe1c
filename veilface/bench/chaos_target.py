"""The server under test of ``veilface bench chaos``: start, crash, restart, RSS, raw calls.

:class:`ChaosServer` wraps a :class:`~veilface.server.launcher.LocalServer`
(a real ``veilface serve`` child with its worker processes, in its own
process group) on one SQLite file. It notices when the server died, starts
it again on the same store and counts the crash; every restart takes a new
port, so callers ask for :meth:`ChaosServer.channel` again after one
(``generation`` tells them). The server's stderr goes to a log file, so the
tracebacks of internal errors can be summarized rather than flood the
terminal.

:func:`call_unary` and :func:`call_stream` send raw bytes to a method path
(no stub, no serializer): the fuzzer speaks to any RPC of the descriptors,
including ones added after this module was written, and can send bytes that
are not a valid message at all.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from veilface.server.launcher import LocalServer

log = logging.getLogger(__name__)

# Large enough for the memory bombs (just under the server's default limit).
CLIENT_MAX_MESSAGE = 256 * 1024 * 1024
_FD_LOCK = threading.Lock()


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB (0 if gone)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is normally installed
        return _rss_proc(pid)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def _rss_proc(pid: int) -> float:
    """VmRSS of ``pid`` and its descendants from /proc (without psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total_kb, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


class ChaosServer:
    """A local server that can be killed and restarted on the same store."""

    def __init__(self, db_path: Path, *, workers: int, log_path: Path) -> None:
        self.db_path = db_path
        self.workers = workers
        self.log_path = log_path
        self.crashes = 0
        self.generation = 0
        self._srv: LocalServer | None = None
        self._lock = threading.RLock()
        self._channels: list[grpc.Channel] = []
        self._next_channel = 0

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            srv = LocalServer(self.db_path, workers=self.workers)
            self._start_logged(srv)
            self._srv = srv
            self.generation += 1
            self._close_channels()
            log.info("server generation %d on %s", self.generation, srv.target)

    def _start_logged(self, srv: LocalServer) -> None:
        """Start ``srv`` with its stderr appended to :attr:`log_path`.

        The launcher lets the child inherit our stderr; it is pointed at the
        log file while the child is spawned (fd 2 is process-wide, hence the
        lock; our own stderr output of that moment lands in the log too).
        """
        with _FD_LOCK, open(self.log_path, "ab") as fh:
            saved = os.dup(2)
            try:
                os.dup2(fh.fileno(), 2)
                srv.start()
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    def kill(self) -> None:
        """SIGKILL the server's process group (server and workers)."""
        with self._lock:
            if self._srv is not None:
                self._srv.kill()

    def stop(self) -> None:
        with self._lock:
            self._close_channels()
            if self._srv is not None:
                self._srv.stop()
                self._srv = None

    def alive(self) -> bool:
        srv = self._srv
        return srv is not None and srv.proc is not None and srv.proc.poll() is None

    def ensure_alive(self, seen_generation: int | None = None) -> bool:
        """Restart the server if it died (counted as a crash); True if it was restarted.

        ``seen_generation``: the generation the caller was talking to; if the
        server was already restarted since, nothing is done.
        """
        with self._lock:
            if seen_generation is not None and seen_generation != self.generation:
                return False
            if self.alive():
                return False
            self.crashes += 1
            log.warning("the server died (crash %d); restarting on the same store", self.crashes)
            self.kill()
            self.start()
            return True

    def restart(self) -> None:
        """Start again after a deliberate :meth:`kill` (not a crash)."""
        with self._lock:
            self.kill()
            self.start()

    # -- views -----------------------------------------------------------------

    @property
    def target(self) -> str:
        if self._srv is None:
            raise RuntimeError("the server is not started")
        return str(self._srv.target)

    @property
    def admin_token(self) -> str:
        if self._srv is None:
            raise RuntimeError("the server is not started")
        return str(self._srv.admin_token)

    @property
    def pid(self) -> int:
        srv = self._srv
        return srv.proc.pid if srv is not None and srv.proc is not None else 0

    def rss_mb(self) -> float:
        return rss_mb(self.pid) if self.alive() else 0.0

    def channel(self) -> tuple[grpc.Channel, int]:
        """One of a few channels to the current server, round robin, and its generation.

        Several channels keep one large message from holding up the small
        calls behind it on the same HTTP/2 connection.
        """
        with self._lock:
            if not self._channels:
                opts = [
                    ("grpc.max_receive_message_length", CLIENT_MAX_MESSAGE),
                    ("grpc.max_send_message_length", CLIENT_MAX_MESSAGE),
                ]
                self._channels = [grpc.insecure_channel(self.target, options=opts) for _ in range(4)]
            self._next_channel = (self._next_channel + 1) % len(self._channels)
            return self._channels[self._next_channel], self.generation

    def _close_channels(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels = []


# -- raw calls ---------------------------------------------------------------------


@dataclass(frozen=True)
class RawResult:
    """Outcome of one raw call: the status name ("OK", "INVALID_ARGUMENT"...) and timing."""

    status: str
    details: str
    elapsed_s: float
    response: bytes = b""


def _metadata(auth: str | None) -> tuple[tuple[str, str], ...]:
    return () if auth is None else (("authorization", auth),)


def call_unary(
    channel: grpc.Channel, method: str, request: bytes, *, auth: str | None, timeout_s: float
) -> RawResult:
    """Send serialized request bytes to ``/package.Service/Method``.

    ``auth``: the whole ``authorization`` header value (``"Bearer <token>"``),
    or None for no header.
    """
    stub = channel.unary_unary(method)
    t = time.perf_counter()
    try:
        resp = stub(request, metadata=_metadata(auth), timeout=timeout_s)
    except grpc.RpcError as err:
        return _failed(err, t)
    return RawResult("OK", "", time.perf_counter() - t, resp)


def call_stream(
    channel: grpc.Channel,
    method: str,
    messages: Iterator[bytes],
    *,
    auth: str | None,
    timeout_s: float,
    cancel_when: Callable[[], bool] | None = None,
) -> RawResult:
    """A client-streaming call; ``cancel_when`` (polled) cancels it from this side."""
    stub = channel.stream_unary(method)
    t = time.perf_counter()
    try:
        if cancel_when is None:
            resp = stub(messages, metadata=_metadata(auth), timeout=timeout_s)
        else:
            fut = stub.future(messages, metadata=_metadata(auth), timeout=timeout_s)
            while not fut.done():
                if cancel_when():
                    fut.cancel()
                    break
                time.sleep(0.005)
            resp = fut.result()
    except grpc.FutureCancelledError:
        return RawResult("CANCELLED", "cancelled by the client", time.perf_counter() - t)
    except grpc.RpcError as err:
        return _failed(err, t)
    return RawResult("OK", "", time.perf_counter() - t, resp)


def _failed(err: grpc.RpcError, t: float) -> RawResult:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return RawResult(code.name, str(details or "")[:200], time.perf_counter() - t)


# -- the server's log ----------------------------------------------------------------

_FAILED = re.compile(r"request \w+ failed in (\S+)")


def summarize_log(path: Path, *, limit: int = 20) -> list[dict[str, object]]:
    """Distinct internal errors of the server log: where, the exception's last line, how often.

    The servicers log ``request <id> failed in <Servicer.Method>`` followed
    by the traceback; the last line of the traceback names the exception.
    """
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    found: Counter[tuple[str, str]] = Counter()
    where = ""
    for i, line in enumerate(lines):
        m = _FAILED.search(line)
        if m:
            where = m.group(1)
            exc = ""
            for nxt in lines[i + 1 : i + 200]:
                if nxt and not nxt.startswith((" ", "\t", "Traceback", "During handling", "The above")):
                    exc = nxt.strip()[:160]
                    break
            found[(where, exc)] += 1
    return [
        {"where": w, "exception": e, "count": n} for (w, e), n in found.most_common(limit)
    ]
