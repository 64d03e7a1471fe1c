"""The test plays the server: from what it sees of routed queries, guess the real labels.

A real server runs in this process (its scoring workers in their own
processes), with the identification service's methods wrapped to keep an
access log: the labels of every Preselect, the bins and slots of every
ScoreCandidates in the order sent, the bins of every slot-map sync (and of
every ResolveHandles, where a server still has it). Many routed queries with
decoys then run through the SDK, and simple adversaries guess from the log
which named labels were real, and who matched. None may beat chance by more
than the stated tolerance. Before the fix the re-ranking named only bins of
the real lists, the best first, and ResolveHandles named the winner: the same
adversaries were right (nearly) every time.

Only the SDK's public calls are used, so the test runs against older code too.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.server.conftest import create_tenant, plaintext_top1
from veilface.bench.synthetic import SyntheticFaces
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.errors import NotFound
from veilface.server.app import RunningServer, start_server
from veilface.server.config import ServerSettings

pytestmark = pytest.mark.slow

NLIST, NPROBE, DECOYS = 16, 2, 2
QUERIES = 150
# (k, rerank_all_above), in turn: one slot per label from one of its two bins;
# three slots per label over all its bins; every slot of every searched bin.
CONFIGS = [(2, 0.75), (6, 1.01), (32, 0.75)]
CHANCE = NPROBE / (NPROBE + DECOYS)
# 150 guesses at p = 0.5: one standard deviation is 0.041; 0.15 is 3.7 of them.
TOLERANCE = 0.15


@dataclass
class AccessLog:
    """What the server saw, per query (``current`` is set by the test before each one)."""

    current: int = -1
    preselect: dict[int, list[str]] = field(default_factory=dict)
    rerank: dict[int, list[tuple[int, list[int]]]] = field(default_factory=dict)
    synced: dict[int, list[int]] = field(default_factory=dict)
    resolved: dict[int, list[tuple[int, list[int]]]] = field(default_factory=dict)


class InProcessServer:
    """``start_server`` on its own event loop thread, so the test can wrap its service."""

    def __init__(self, db: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = ServerSettings.from_env(db_path=db, port=0, workers=2)
        self.running: RunningServer = asyncio.run_coroutine_threadsafe(
            start_server(settings), self.loop
        ).result(120)
        self.target = f"127.0.0.1:{self.running.port}"
        assert self.running.admin_token_path is not None
        self.admin_token = self.running.admin_token_path.read_text().strip()

    def record(self, log: AccessLog) -> None:
        """Wrap the identification methods the servicers call with the access log."""
        ident = self.running.service.identification

        def wrap(name: str, note: Callable[..., None]) -> None:
            method = getattr(ident, name, None)
            if method is None:
                return

            @functools.wraps(method)
            async def logged(*args: Any, **kwargs: Any) -> Any:
                note(*args, **kwargs)
                return await method(*args, **kwargs)

            setattr(ident, name, logged)

        def preselect(tenant_id: str, key_id: str, mode: str, labels: Any, *_: Any, **__: Any) -> None:
            log.preselect[log.current] = list(labels)

        def rerank(tenant_id: str, key_id: str, candidates: Any, *_: Any, **__: Any) -> None:
            log.rerank.setdefault(log.current, []).extend(
                (int(b), [int(s) for s in slots]) for b, slots in candidates
            )

        def sync(tenant_id: str, key_id: str, known: Any) -> None:
            log.synced.setdefault(log.current, []).extend(int(b) for b, _ in known)

        def resolve(tenant_id: str, slots: Any) -> None:
            log.resolved.setdefault(log.current, []).extend(
                (int(b), [int(s) for s in ss]) for b, ss in slots
            )

        wrap("preselect", preselect)
        wrap("score_candidates", rerank)
        wrap("slot_maps", sync)
        wrap("resolve_handles", resolve)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    srv = InProcessServer(tmp_path_factory.mktemp("decoys") / "gallery.db")
    try:
        yield srv
    finally:
        srv.close()


@dataclass(frozen=True)
class Query:
    real: frozenset[str]
    sent: list[str]
    rerank: list[tuple[int, list[int]]]
    synced: list[int]
    resolved: list[tuple[int, list[int]]]
    winner: tuple[int, int] | None  # (bin, slot) of the SDK's top-1, None if staged or none


def _guess(scores: Counter[str], labels: list[str], rng: np.random.Generator) -> str:
    """The label with the highest score, ties (and an empty score) broken at random."""
    top = max((scores[lab] for lab in labels), default=0)
    best = [lab for lab in labels if scores[lab] == top]
    return best[int(rng.integers(len(best)))]


def _adversaries(
    q: Query, label_of: dict[int, str], size_of: dict[str, int]
) -> dict[str, Counter[str]]:
    bins: Counter[str] = Counter()
    slots: Counter[str] = Counter()
    first: Counter[str] = Counter()
    synced: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for b, ss in q.rerank:
        bins[label_of[b]] += 1
        slots[label_of[b]] += len(ss)
    if q.rerank:
        first[label_of[q.rerank[0][0]]] = 1
    for b in q.synced:
        synced[label_of[b]] += 1
    for b, _ in q.resolved:
        synced[label_of[b]] += 1
    for lab in q.sent:
        size[lab] = size_of.get(lab, 0)
    return {
        "most re-ranked bins": bins,
        "most candidate slots": slots,
        "label re-ranked first": first,
        "most bins synced or resolved": synced,
        "largest list": size,
        "first label sent": Counter({q.sent[0]: 1}),
    }


def test_server_cannot_tell_real_labels_or_the_winner(served: InProcessServer) -> None:
    emb, labels = SyntheticFaces().sample(240, 2, seed=21)
    gallery, probes = emb[0::2], emb[1::2]
    names = [str(x) for x in labels[0::2]]
    token = create_tenant(served, "decoy-co")
    state = TenantState.new("decoy-co", dim=gallery.shape[1])
    log = AccessLog()
    rng = np.random.default_rng(5)
    with VeilClient(served.target, state, token=token, encrypt_workers=0) as c:
        c.register_key()
        c.train_routing(gallery, nlist=NLIST, seed=2, allow_small=True)  # 15 per list: a protocol test
        # Two imports: two bins per list, so a label's re-ranking has bins to choose from.
        half = len(names) // 2
        c.enroll_many(names[:half], gallery[:half])
        c.enroll_many(names[half:-4], gallery[half:-4])
        router, mix = c.state.router, c.state.mixing_matrix()
        assert router is not None
        c.identify(probes[0], mode="routed", nprobe=NPROBE, decoys=DECOYS)  # warm up the workers
        served.record(log)

        queries: list[Query] = []
        enrolled = list(range(len(names) - 4))
        hits: Counter[int] = Counter()
        routable: Counter[int] = Counter()
        for i in range(QUERIES):
            if i % 50 == 25:  # a new subject changes a bin: the next queries sync its map
                j = len(names) - 1 - (i // 50)
                c.enroll(names[j], gallery[j], fold="now")
                enrolled.append(j)
            p = probes[int(rng.integers(len(probes) - 4))]
            k, above = CONFIGS[i % len(CONFIGS)]
            log.current = i
            r = c.identify(p, mode="routed", k=k, nprobe=NPROBE, decoys=DECOYS, rerank_all_above=above)
            xr = (mix @ (p / np.linalg.norm(p))).astype(np.float32)
            real_lists = router.probe_lists(xr, NPROBE)
            real = frozenset(router.labels(real_lists))
            want = enrolled[plaintext_top1(gallery[enrolled], p)]
            g = mix @ (gallery[want] / np.linalg.norm(gallery[want]))
            if int(router.assign(g[None, :])[0]) in set(real_lists.tolist()):
                routable[k] += 1
                hits[k] += r.subject_id == names[want]
            winner = None
            if r.subject_id is not None:
                handle = c.state.handles().encode(r.subject_id)
                try:
                    ref = served.running.store.subject("decoy-co", handle)
                    winner = (int(ref.bin_id), int(ref.slot))
                except NotFound:  # still staged: no bin slot to guess
                    winner = None
            queries.append(
                Query(
                    real,
                    log.preselect[i],
                    log.rerank.get(i, []),
                    log.synced.get(i, []),
                    log.resolved.get(i, []),
                    winner,
                )
            )
        key_id = c.state.key_id

    # Identification still works: with the default k (every searched slot
    # re-ranked here) the match is found whenever its list is probed. (The
    # small k of the other configurations only shape the re-ranking; with a
    # preselection window of 16 of 128 coordinates they miss, as before.)
    assert sum(routable.values()) >= 0.8 * QUERIES
    assert hits[32] >= 0.95 * routable[32], (hits, routable)

    bins = served.running.store.key_bins("decoy-co", key_id)
    label_of = {b.bin_id: b.label for b in bins}
    size_of: Counter[str] = Counter()
    for b in bins:
        size_of[b.label] += b.subjects

    # 1. Which named labels are real.
    guesses = np.random.default_rng(7)
    accuracy: dict[str, float] = {}
    for q in queries:
        assert len(q.sent) == NPROBE + DECOYS and q.sent == sorted(q.sent)
        for name, scores in _adversaries(q, label_of, size_of).items():
            right = _guess(scores, q.sent, guesses) in q.real
            accuracy[name] = accuracy.get(name, 0.0) + right / len(queries)
    beaten = {n: round(a, 3) for n, a in accuracy.items() if a > CHANCE + TOLERANCE}
    assert not beaten, f"chance is {CHANCE}: {beaten} (all: {accuracy})"

    # 2. Who matched: the first slot the server was asked about (in a handle
    # lookup, else in the re-ranking) against the SDK's winner. Chance: one
    # over the slots named.
    asked = [q for q in queries if q.winner is not None and q.rerank]
    assert len(asked) >= QUERIES // 2
    found = expected = 0.0
    for q in asked:
        named = q.resolved or q.rerank
        found += float((named[0][0], named[0][1][0]) == q.winner)
        expected += 1.0 / sum(len(ss) for _, ss in q.rerank)
    assert found / len(asked) <= expected / len(asked) + TOLERANCE, (found, expected, len(asked))
    assert not any(q.resolved for q in queries), "a handle lookup names the winner's slot"
