"""Kill cycles of ``veilface bench chaos``: SIGKILL the server during enrollment, restart, audit.

Each cycle, on a dedicated tenant (``chaos-k``) of the same store:

1. a thread enrolls templates one by one (alternately into the staging area
   and straight into a bin), another streams bulk imports of several bins
   with pauses between chunks, and a child process starts a bulk stream and
   is SIGKILLed after its first chunk;
2. at a random moment (drawn from the seed) the server's whole process
   group gets SIGKILL; the server is started again on the same SQLite file;
3. the audit: a census of every handle the key holds (active bins' slot
   maps plus the staging area) and, for each enrollment acknowledged in the
   cycle, an identification and a verification of the enrolled template.

What is counted: an *acknowledged* enrollment is a single ``enroll`` call
that returned or a bulk stream that returned OK. *Lost*: acknowledged but
absent from the census, or not identified as itself (score > 0.99), or not
verified. *Duplicates*: a handle held twice. *Partial bulk visible*: a
stream that was not acknowledged with some but not all of its subjects
visible, or a killed client's stream (never ended) with any subject
visible. An unacknowledged stream that is entirely visible is allowed (the
server committed it and died before the answer left) and counted apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veilface.bench.chaos_bombs import run_killed_client
from veilface.bench.chaos_fuzz import declare_bins
from veilface.bench.chaos_target import ChaosServer
from veilface.bench.synthetic import SyntheticFaces
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.client.transport import Transport
from veilface.errors import VeilfaceError
from veilface.proto.v1 import veilface_pb2 as pb

log = logging.getLogger(__name__)

TENANT_K = "chaos-k"
BULK_METHOD = "/veilface.v1.Enrollment/BulkEnroll"


@dataclass
class Stream:
    subjects: list[str]
    killed_client: bool = False
    acked: bool = False


@dataclass
class KillReport:
    kills: int = 0
    acknowledged: int = 0
    lost: int = 0
    duplicates: int = 0
    partial_bulk_visible: int = 0
    unacked_streams_committed: int = 0
    unacked_singles_present: int = 0
    killed_clients: int = 0
    streams_acked: int = 0
    lost_subjects: list[str] = field(default_factory=list)
    refused_while_up: Counter[str] = field(default_factory=Counter)
    cycles: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["lost_subjects"] = self.lost_subjects[:20]
        d["refused_while_up"] = dict(self.refused_while_up)
        return d


class _Pool:
    """Templates handed out in order; subject ids are their indices."""

    def __init__(self, n: int, seed: int) -> None:
        emb, _ = SyntheticFaces().sample(n, 1, seed=seed)
        self.emb = emb
        self._next = 0
        self._lock = threading.Lock()

    def take(self, k: int) -> list[int]:
        with self._lock:
            if self._next + k > len(self.emb):
                raise RuntimeError("template pool exhausted; raise the pool size")
            out = list(range(self._next, self._next + k))
            self._next += k
            return out


def _sid(i: int) -> str:
    return f"k-{i:06d}"


class KillPhase:
    """Runs the cycles and keeps the ledger of what was sent and acknowledged."""

    def __init__(self, srv: ChaosServer, *, seed: int, chunk: int = 6, chunks: int = 2) -> None:
        self.srv = srv
        self.rng = np.random.default_rng([seed, 7])
        self.pool = _Pool(60_000, seed + 17)
        self.chunk, self.chunks = chunk, chunks
        self.state = TenantState.new(TENANT_K, dim=SyntheticFaces().dim)
        self.codec = self.state.handles()
        self.token = ""
        self.acked: dict[str, int] = {}  # subject -> template index
        self.report = KillReport()
        self._lock = threading.Lock()

    # -- set-up -------------------------------------------------------------

    def setup(self, initial: int = 64) -> None:
        admin = Transport(self.srv.target, token=self.srv.admin_token)
        try:
            resp = admin.call(admin.tenants.CreateTenant, pb.CreateTenantRequest(tenant_id=TENANT_K))
            self.token = str(resp.api_token)
        finally:
            admin.close()
        with self._client() as c:
            c.register_key()
            idx = self.pool.take(initial)
            c.enroll_many([_sid(i) for i in idx], self.pool.emb[idx])
            for i in idx:
                self.acked[_sid(i)] = i

    def _client(self) -> VeilClient:
        return VeilClient(self.srv.target, self.state, token=self.token, encrypt_workers=0, timeout_s=60)

    # -- one cycle ------------------------------------------------------------

    def cycle(self, n: int) -> None:
        kill_at = float(self.rng.uniform(0.5, 3.0))
        stop = threading.Event()
        singles: list[tuple[str, bool]] = []  # (subject, acked)
        streams: list[Stream] = []
        child = self._killed_stream()
        client = self._client()
        rng_bulk = np.random.default_rng(self.rng.integers(2**32))
        rng_child = np.random.default_rng(self.rng.integers(2**32))
        child_done = threading.Event()
        threads = [
            threading.Thread(target=self._singles, args=(client, stop, singles), daemon=True),
            threading.Thread(target=self._bulks, args=(client, stop, streams, rng_bulk), daemon=True),
            threading.Thread(target=self._killed_child, args=(child, streams, child_done, rng_child), daemon=True),
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(kill_at)
        # The child (a process start, a chunk, its SIGKILL) may take longer than
        # the draw: the server dies a moment after the child at the latest.
        if child_done.wait(60):
            time.sleep(float(self.rng.uniform(0.0, 0.5)))
        stop.set()  # no new enrollment after this; those in flight meet the kill
        self.srv.kill()
        self.report.kills += 1
        for t in threads:
            t.join(120)
        try:
            client.close()
        except Exception:
            log.debug("client close after the kill", exc_info=True)
        self.srv.restart()
        self._audit(n, kill_at, time.monotonic() - t0, singles, streams)

    def _singles(self, c: VeilClient, stop: threading.Event, out: list[tuple[str, bool]]) -> None:
        k = 0
        while not stop.is_set():
            (i,) = self.pool.take(1)
            sid = _sid(i)
            try:
                c.enroll(sid, self.pool.emb[i], staged=k % 2 == 0, fold="later")
            except Exception as exc:  # noqa: BLE001 - mostly the server dying under the call
                out.append((sid, False))
                if not self.srv.alive() or stop.is_set():
                    return
                self._refused("single", exc)
                continue
            with self._lock:
                self.acked[sid] = i
            out.append((sid, True))
            k += 1

    def _refused(self, kind: str, exc: BaseException) -> None:
        """An enrollment refused while the server was up (not the kill): counted, to explain."""
        with self._lock:
            self.report.refused_while_up[f"{kind}:{getattr(exc, 'status', type(exc).__name__)}"] += 1

    def _chunk_msgs(self, c: VeilClient, idx: list[int]) -> pb.BulkEnrollChunk:
        slots = list(range(len(idx)))
        return pb.BulkEnrollChunk(
            tenant_id=TENANT_K, key_id=self.state.key_id, label="",
            handles=[self.codec.encode(_sid(i)) for i in idx], slots=slots,
            ciphertexts=c.crypto.encrypt_contribution(c.prepare(self.pool.emb[idx]), slots),
        )

    def _bulks(self, c: VeilClient, stop: threading.Event, out: list[Stream], rng: np.random.Generator) -> None:
        while not stop.is_set():
            groups = [self.pool.take(self.chunk) for _ in range(self.chunks)]
            stream = Stream([_sid(i) for g in groups for i in g])
            out.append(stream)

            def chunks(groups: list[list[int]] = groups) -> Iterator[pb.BulkEnrollChunk]:
                for k, g in enumerate(groups):
                    if k:
                        time.sleep(float(rng.uniform(0.0, 0.15)))
                        yield self._chunk_msgs(c, g)
                    else:
                        yield declare_bins(self._chunk_msgs(c, g), len(groups))

            try:
                c.transport.call(c.transport.enrollment.BulkEnroll, chunks(), timeout=60)
            except Exception as exc:  # noqa: BLE001 - mostly the server dying under the call
                if not self.srv.alive() or stop.is_set():
                    return
                self._refused("bulk", exc)
                continue
            stream.acked = True
            with self._lock:
                for g in groups:
                    for i in g:
                        self.acked[_sid(i)] = i

    def _killed_stream(self) -> tuple[Stream, list[bytes]]:
        """A three-chunk bulk stream for a client process to start and be killed in."""
        groups = [self.pool.take(4) for _ in range(3)]
        with self._client() as c:
            chunks = [self._chunk_msgs(c, g) for g in groups]
            declare_bins(chunks[0], len(chunks))
            msgs = [m.SerializeToString() for m in chunks]
        return Stream([_sid(i) for g in groups for i in g], killed_client=True), msgs

    def _killed_child(
        self, child: tuple[Stream, list[bytes]], out: list[Stream], done: threading.Event,
        rng: np.random.Generator,
    ) -> None:
        """A bulk-enrolling client process, SIGKILLed after its first chunk."""
        stream, msgs = child
        out.append(stream)  # never ended: none of it may appear, whatever happened
        try:
            got = run_killed_client(self.srv.target, BULK_METHOD, self.token, msgs, rng)
            self.report.killed_clients += int(got.reached_server)
        finally:
            done.set()

    # -- the audit ---------------------------------------------------------------

    def census(self, c: VeilClient) -> Counter[str]:
        """How many times each handle is held: active bins' slot maps and the staging area."""
        return census(c, TENANT_K, self.state.key_id)

    def _audit(
        self, n: int, kill_at: float, elapsed: float, singles: list[tuple[str, bool]], streams: list[Stream]
    ) -> None:
        rep = self.report
        with self._client() as c:
            held = self.census(c)
            by_subject = {s: held.get(self.codec.encode(s), 0) for s in self._subjects(singles, streams)}
            rep.duplicates = max(rep.duplicates, sum(v - 1 for v in held.values() if v > 1))
            lost_now = [s for s in self.acked if held.get(self.codec.encode(s), 0) == 0]
            for s in lost_now:
                log.warning("audit: acknowledged %s is in no bin and not staged", s)
            new_acked = [s for s, ok in singles if ok] + [x for st in streams if st.acked for x in st.subjects]
            lost_now += [s for s in new_acked if not self._found(c, s)]
            for s in lost_now:
                if s not in rep.lost_subjects:
                    rep.lost_subjects.append(s)
            partial = committed = 0
            for st in streams:
                if st.acked:
                    rep.streams_acked += 1
                    continue
                present = sum(1 for s in st.subjects if by_subject.get(s, 0) > 0)
                if (st.killed_client and present) or 0 < present < len(st.subjects):
                    partial += 1
                elif present == len(st.subjects):
                    committed += 1
            rep.partial_bulk_visible += partial
            rep.unacked_streams_committed += committed
            rep.unacked_singles_present += sum(1 for s, ok in singles if not ok and by_subject.get(s, 0))
            try:
                c.fold_staged()  # recovery of what a dead client left staged
            except VeilfaceError as exc:
                log.info("fold of staged templates after restart failed: %s", type(exc).__name__)
        rep.acknowledged = len(self.acked)
        rep.lost = len(rep.lost_subjects)
        rep.cycles.append({
            "cycle": n, "kill_at_s": round(kill_at, 3), "elapsed_s": round(elapsed, 2),
            "singles_acked": sum(1 for _, ok in singles if ok), "singles_cut": sum(1 for _, ok in singles if not ok),
            "streams_acked": sum(1 for st in streams if st.acked),
            "streams_cut": sum(1 for st in streams if not st.acked), "lost": len(lost_now),
            "partial_bulk_visible": partial,
        })

    @staticmethod
    def _subjects(singles: list[tuple[str, bool]], streams: list[Stream]) -> list[str]:
        return [s for s, _ in singles] + [x for st in streams for x in st.subjects]

    def _found(self, c: VeilClient, sid: str) -> bool:
        """The template identifies as itself and verifies (scores of an exact probe are ~1)."""
        x = self.pool.emb[self.acked[sid]]
        try:
            r = c.identify(x)
            v = c.verify(sid, x)
        except VeilfaceError as exc:
            log.warning("audit of %s failed: %s", sid, type(exc).__name__)
            return False
        ok = bool(r.subject_id == sid and r.score > 0.99 and v.match and v.score > 0.99)
        if not ok:
            log.warning(
                "audit of %s: identified as %s (score %.4f), verified %.4f",
                sid, r.subject_id, r.score, v.score,
            )
        return ok

    def final_audit(self, *, sample: int = 100) -> None:
        """At the end: every acknowledged enrollment in the census, and a sample identified and verified.

        Every acknowledged enrollment was already identified and verified
        right after the restart that followed it; this checks that later
        kills took nothing away (``sample`` <= 0: identify all of them).
        """
        with self._client() as c:
            held = self.census(c)
            acked = list(self.acked)
            missing = [s for s in acked if held.get(self.codec.encode(s), 0) == 0]
            for s in missing:
                log.warning("final audit: acknowledged %s is in no bin and not staged", s)
            if 0 < sample < len(acked):
                acked = [acked[i] for i in sorted(self.rng.choice(len(acked), sample, replace=False))]
            missing += [s for s in acked if not self._found(c, s)]
            for sid in missing:
                if sid not in self.report.lost_subjects:
                    self.report.lost_subjects.append(sid)
            self.report.duplicates = max(self.report.duplicates, sum(v - 1 for v in held.values() if v > 1))
        self.report.lost = len(self.report.lost_subjects)
        self.report.acknowledged = len(self.acked)


def census(c: VeilClient, tenant_id: str, key_id: str) -> Counter[str]:
    """Handles held by a key: the slot maps of its active bins, and its staged ones."""
    tr = c.transport
    bins = tr.call(tr.enrollment.ListBins, pb.ListBinsRequest(tenant_id=tenant_id, key_id=key_id)).bins
    ids = [int(b.bin_id) for b in bins]
    held: Counter[str] = Counter()
    for start in range(0, len(ids), 64):
        req = pb.FetchSlotMapsRequest(tenant_id=tenant_id, key_id=key_id)
        for b in ids[start : start + 64]:
            req.known.add(bin_id=b, version=0)
        for m in tr.call(tr.identification.FetchSlotMaps, req).maps:
            held.update(h for h in m.handles if h)
    staged = tr.call(tr.enrollment.FetchStaged, pb.FetchStagedRequest(tenant_id=tenant_id, key_id=key_id))
    held.update(t.handle for t in staged.staged)
    return held
