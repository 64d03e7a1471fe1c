"""Hostile RPCs of ``veilface bench chaos``: what a call is, how it is judged, how they run.

A generator builds a :class:`Case` (one or more :class:`Call` sent at once)
from its own seeded random stream and the :class:`~veilface.bench.chaos_world.World`.
Every call says whether a correct server must refuse it:

- :attr:`Expect.FAIL`: the request is invalid whatever the server's state
  (malformed bytes, a ciphertext that cannot load, a count that is not the
  key's, an id of another tenant or key, a missing, wrong, foreign or
  revoked token, a stream cut before its end). Answered OK, it is an
  *unexpected success*;
- :attr:`Expect.ANY`: a server cannot tell it from a legitimate request
  (a bit-flipped ciphertext that still loads, another key's ciphertext
  under the same parameters, random field values on the attacker's own
  tenant); any status but INTERNAL/UNKNOWN is fine.

INTERNAL or UNKNOWN from the server is an *internal error*; a call that
outlives its deadline is a *hang*. A cut stream's own status is made by
the client (CANCELLED, or UNKNOWN "exception iterating requests"), so it
is recorded as ``CLIENT_CUT``; what is judged is whether anything of it
became visible, checked after the fuzz (``pending_absent``, then
:meth:`FuzzStats.mark_visible`).

The generators live in :mod:`veilface.bench.chaos_generic` (every method,
from the service descriptors) and :mod:`veilface.bench.chaos_cases` /
:mod:`veilface.bench.chaos_cases_search` (per RPC).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import descriptor as _desc
from google.protobuf import message_factory
from google.protobuf.message import Message

from veilface.bench.chaos_target import ChaosServer, RawResult, call_stream, call_unary
from veilface.bench.chaos_world import World
from veilface.proto.v1 import veilface_pb2 as pb

log = logging.getLogger(__name__)

Rng = np.random.Generator
INTERNAL_STATUSES = frozenset({"INTERNAL", "UNKNOWN"})


class Expect(enum.Enum):
    FAIL = "must_fail"
    ANY = "may_succeed"


@dataclass
class Call:
    """One hostile RPC, as raw bytes to a method path.

    ``payload``: the request (unary) or the messages (client streaming).
    ``auth``: the whole ``authorization`` header value (None: no header).
    ``cut``: for streams, ``"raise"`` (the request iterator raises after the
    messages) or ``"cancel"`` (the client cancels after them).
    ``absent``: (tenant id, handle) pairs that must not be visible after the
    call (cut streams, killed clients), checked once the fuzz is over.
    """

    method: str
    payload: bytes | list[bytes]
    auth: str | None
    expect: Expect
    timeout_s: float = 60.0
    cut: str = ""
    absent: tuple[tuple[str, str], ...] = ()
    note: str = ""  # which variant of its generator (for the examples of a verdict)


@dataclass
class Case:
    generator: str
    calls: list[Call]


def bearer(token: str | None) -> str | None:
    return None if token is None else f"Bearer {token}"


def declare_bins(first: Message, n: int) -> Message:
    """Set a bulk stream's declared length on its first chunk (servers that have the field)."""
    if "total_bins" in first.DESCRIPTOR.fields_by_name:
        first.total_bins = n
    return first


# -- the RPCs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    path: str
    streaming: bool
    input: _desc.Descriptor


def all_rpcs() -> list[Rpc]:
    """Every method of every service of the veilface.v1 package, from the descriptors."""
    out = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            out.append(
                Rpc(service.name, m.name, f"/{service.full_name}/{m.name}", m.client_streaming, m.input_type)
            )
    return sorted(out, key=lambda r: r.path)


def message_class(d: _desc.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(d)  # type: ignore[no-any-return]


def pick(r: Rng, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[int(r.integers(len(items)))]


# -- corrupting valid material --------------------------------------------------------

FAILING_CORRUPTIONS = ("random", "truncated", "header_only", "empty")
LOADABLE_CORRUPTIONS = ("flipped", "appended")


def corrupt(r: Rng, blob: bytes, kind: str) -> bytes:
    """A valid ciphertext made invalid (``FAILING_CORRUPTIONS``) or merely odd."""
    if kind == "random":
        return r.bytes(max(1, len(blob)))
    if kind == "truncated":
        return blob[: int(r.integers(17, max(18, len(blob) - 1)))]
    if kind == "header_only":
        return blob[:16]
    if kind == "empty":
        return b""
    if kind == "flipped":
        b = bytearray(blob)
        i = int(r.integers(16, len(b)))
        b[i] ^= 1 << int(r.integers(8))
        return bytes(b)
    if kind == "appended":
        return blob + r.bytes(int(r.integers(1, 4096)))
    raise ValueError(kind)


# -- setting up a generator's call ----------------------------------------------------


class Setup:
    """Legitimate calls a generator makes before its hostile one (a fresh reservation...)."""

    def __init__(self, srv: ChaosServer) -> None:
        self.srv = srv

    def unary(self, method: str, request: Message, token: str, response: type[Message]) -> Any:
        """Call ``/veilface.v1.<method>`` ("Enrollment/ReserveSlots"); the parsed response or None."""
        channel, _ = self.srv.channel()
        res = call_unary(
            channel, f"/{pb.DESCRIPTOR.package}.{method}", request.SerializeToString(),
            auth=bearer(token), timeout_s=60.0,
        )
        if res.status != "OK":
            return None
        out = response()
        out.ParseFromString(res.response)
        return out


Gen = Callable[[Rng, World, Rpc, Setup], Case]


# -- running and judging -------------------------------------------------------------


@dataclass
class GenStats:
    rpcs: int = 0
    status: Counter[str] = field(default_factory=Counter)
    internal_errors: int = 0
    unexpected_successes: int = 0
    hangs: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rpcs": self.rpcs,
            "status_counts": dict(sorted(self.status.items())),
            "internal_errors": self.internal_errors,
            "unexpected_successes": self.unexpected_successes,
            "hangs": self.hangs,
            "examples": self.examples,
        }


@dataclass
class FuzzStats:
    """Every hostile RPC's verdict, by generator and by method (thread safe)."""

    rpcs: int = 0
    status: Counter[str] = field(default_factory=Counter)
    generators: dict[str, GenStats] = field(default_factory=dict)
    methods: dict[str, GenStats] = field(default_factory=dict)
    generator_errors: Counter[str] = field(default_factory=Counter)
    crash_suspects: list[list[str]] = field(default_factory=list)
    pending_absent: list[tuple[str, str, tuple[tuple[str, str], ...]]] = field(default_factory=list)
    cut_streams_visible: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, generator: str, call: Call, res: RawResult) -> None:
        status = res.status
        if call.cut and status in ("CANCELLED", "UNKNOWN"):
            status = "CLIENT_CUT"  # the client's own status for the stream it cut
        method = call.method.rsplit("/", 1)[-1]
        with self._lock:
            self.rpcs += 1
            self.status[status] += 1
            for s in (
                self.generators.setdefault(generator, GenStats()),
                self.methods.setdefault(method, GenStats()),
            ):
                s.rpcs += 1
                s.status[status] += 1
                verdict = ""
                if status in INTERNAL_STATUSES:
                    s.internal_errors += 1
                    verdict = "internal"
                elif status == "DEADLINE_EXCEEDED":
                    s.hangs += 1
                    verdict = "hang"
                elif status == "OK" and call.expect is Expect.FAIL:
                    s.unexpected_successes += 1
                    verdict = "unexpected_success"
                seen = {(e["verdict"], e["variant"]) for e in s.examples}
                if verdict and len(s.examples) < 8 and (verdict, call.note) not in seen:
                    s.examples.append({
                        "verdict": verdict, "method": method, "generator": generator,
                        "variant": call.note, "details": res.details,
                    })
            if call.absent:
                self.pending_absent.append((generator, call.method, call.absent))

    def mark_visible(self, generator: str, method: str, what: str) -> None:
        """A cut stream or killed client left something visible: an unexpected success."""
        with self._lock:
            self.cut_streams_visible += 1
            for s in (self.generators[generator], self.methods[method.rsplit("/", 1)[-1]]):
                s.unexpected_successes += 1
                if len(s.examples) < 8:
                    s.examples.append({"verdict": "unexpected_success", "method": method,
                                       "generator": generator, "variant": "visible after the cut",
                                       "details": what})

    def totals(self) -> dict[str, int]:
        g = self.generators.values()
        return {
            "internal_errors": sum(s.internal_errors for s in g),
            "unexpected_successes": sum(s.unexpected_successes for s in g),
            "hangs": sum(s.hangs for s in g),
        }


def execute(srv: ChaosServer, stats: FuzzStats, case: Case) -> None:
    """Send a case's calls (at once when there are several), record each verdict."""
    if len(case.calls) == 1:
        _execute_one(srv, stats, case.generator, case.calls[0])
        return
    threads = [
        threading.Thread(target=_execute_one, args=(srv, stats, case.generator, c), daemon=True)
        for c in case.calls
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _execute_one(srv: ChaosServer, stats: FuzzStats, generator: str, call: Call) -> None:
    channel, generation = srv.channel()
    t = time.perf_counter()
    try:
        if isinstance(call.payload, list):
            res = _stream(channel, call)
        else:
            res = call_unary(channel, call.method, call.payload, auth=call.auth, timeout_s=call.timeout_s)
    except Exception as exc:  # noqa: BLE001 - e.g. a channel closed by a restart under the call
        res = RawResult("CLIENT_ERROR", type(exc).__name__, time.perf_counter() - t)
    stats.record(generator, call, res)
    if res.status in ("UNAVAILABLE", "CANCELLED", "UNKNOWN") and not srv.alive():
        with stats._lock:
            stats.crash_suspects.append([generator, call.method])
        srv.ensure_alive(generation)


def _stream(channel: Any, call: Call) -> RawResult:
    """A streaming call, cut as ``call.cut`` says once every message was handed over."""
    assert isinstance(call.payload, list)
    payload: list[bytes] = call.payload
    sent, done = threading.Event(), threading.Event()
    sent_at = [0.0]

    def messages() -> Iterator[bytes]:
        yield from payload
        sent_at[0] = time.monotonic()
        sent.set()
        if call.cut == "raise":
            raise RuntimeError("the client dies mid-stream")
        if call.cut == "cancel":
            done.wait(call.timeout_s)  # hold the stream open until it is cancelled

    def due() -> bool:  # let the last message reach the server first
        return sent.is_set() and time.monotonic() - sent_at[0] > 0.1

    try:
        return call_stream(
            channel, call.method, messages(), auth=call.auth, timeout_s=call.timeout_s,
            cancel_when=due if call.cut == "cancel" else None,
        )
    finally:
        done.set()
