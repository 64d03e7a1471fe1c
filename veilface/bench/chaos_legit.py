"""The legitimate kiosk of ``bench chaos``, in a process of its own.

A kiosk is another device: it shares neither the attacker's interpreter nor
its GIL. Run as a thread of the benchmark process, the kiosk's encryption
and decryption waited for the GIL behind the attacker's threads, and its
latency measured the harness more than the server. Here it is a child
process (``spawn``) that loads the tenant state from a sealed file, runs
its queries and reports latencies over a pipe. The quiet baseline and the
figures under attack are both measured by this same process.

A query is *wrong* when its top-1 is neither the plaintext top-1 nor a
subject within ``tie`` of it, or its score is off the plaintext cosine by
more than 0.01.
"""

from __future__ import annotations

import multiprocessing
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from veilface.bench.chaos_target import ChaosServer
from veilface.bench.chaos_world import World

#: How long the parent waits for the child's answer to one command.
_REPLY_TIMEOUT_S = 600.0


@dataclass
class _Spec:
    state_path: str
    passphrase: str
    target: str
    token: str
    subjects: list[str]
    probes: np.ndarray
    cos: np.ndarray  # [probe, gallery] plaintext cosines
    seed: int
    pause_s: float
    tie: float


@dataclass
class _Run:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wrong: int = 0


def _child(spec: _Spec, conn: Connection) -> None:
    """The kiosk: answer ``("measure", n)`` and ``("run",)`` ... ``("stop",)`` commands."""
    from veilface.client.sdk import VeilClient
    from veilface.client.tenant_state import TenantState
    from veilface.errors import VeilfaceError

    state = TenantState.load(Path(spec.state_path), passphrase=spec.passphrase)
    client = VeilClient(spec.target, state, token=spec.token, encrypt_workers=0)
    rng = np.random.default_rng([spec.seed, 3])

    def query(run: _Run) -> None:
        i = int(rng.integers(len(spec.probes)))
        try:
            r = client.identify(spec.probes[i])
        except VeilfaceError as exc:
            run.errors[type(exc).__name__ + ":" + str(getattr(exc, "status", ""))] += 1
            return
        best = float(spec.cos[i].max())
        j = spec.subjects.index(r.subject_id) if r.subject_id in spec.subjects else -1
        if j < 0 or float(spec.cos[i, j]) < best - spec.tie or abs(r.score - best) > 1e-2:
            run.wrong += 1
        run.latencies_ms.append(float(r.stats.total_ms))

    try:
        conn.send(("ready",))
        while True:
            cmd = conn.recv()
            if cmd[0] == "measure":
                run = _Run()
                for _ in range(int(cmd[1])):
                    query(run)
                    time.sleep(spec.pause_s)
                conn.send(("done", run))
            elif cmd[0] == "run":
                run = _Run()
                while not conn.poll(spec.pause_s):
                    query(run)
                conn.recv()  # the stop
                conn.send(("done", run))
            else:
                break
    finally:
        client.close()


class LegitTraffic:
    """Tenant A's kiosk, one identification after another, in a child process.

    :meth:`measure` runs ``n`` queries and returns their latencies (the quiet
    baseline); :meth:`start` / :meth:`stop` run queries for as long as the
    attack lasts, then :attr:`latencies_ms`, :attr:`errors` and
    :attr:`wrong` hold what they gave.
    """

    def __init__(
        self, srv: ChaosServer, world: World, *, seed: int, pause_s: float = 0.05, tie: float = 2e-3
    ) -> None:
        ks = world.key("a.k1")
        self._tmp = tempfile.TemporaryDirectory(prefix="veilface-chaos-kiosk-")
        path = Path(self._tmp.name) / "kiosk.vfk"
        passphrase = secrets.token_urlsafe(16)
        ks.state.save(path, passphrase=passphrase)
        g = ks.gallery / np.linalg.norm(ks.gallery, axis=1, keepdims=True)
        p = ks.probes / np.linalg.norm(ks.probes, axis=1, keepdims=True)
        spec = _Spec(
            str(path), passphrase, srv.target, world.legit_token, list(ks.subjects),
            np.asarray(ks.probes), p @ g.T, seed, pause_s, tie,
        )
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(spec, child_end), name="chaos-kiosk", daemon=True)
        self._proc.start()
        child_end.close()
        self._expect("ready")
        self.latencies_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self.wrong = 0

    def _expect(self, what: str) -> Any:
        if not self._conn.poll(_REPLY_TIMEOUT_S):
            raise RuntimeError(f"the chaos kiosk process gave no {what!r} in {_REPLY_TIMEOUT_S:.0f} s")
        msg = self._conn.recv()
        if msg[0] != what:
            raise RuntimeError(f"the chaos kiosk process answered {msg[0]!r}, not {what!r}")
        return msg[1] if len(msg) > 1 else None

    def measure(self, n: int) -> list[float]:
        self._conn.send(("measure", n))
        run: _Run = self._expect("done")
        return run.latencies_ms

    def start(self) -> None:
        self._conn.send(("run",))

    def stop(self) -> None:
        self._conn.send(("stop",))
        run: _Run = self._expect("done")
        self.latencies_ms, self.errors, self.wrong = run.latencies_ms, run.errors, run.wrong
        self.close()

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("exit",))
            except OSError:
                pass
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()
        self._tmp.cleanup()
