"""1:N identification, stage by stage (what ``VeilClient.identify`` runs).

1. **Route** (:meth:`Searcher.route`): strict mode searches every bin; routed
   mode names the labels of the probe's ``nprobe`` nearest lists plus
   ``decoys`` decoy labels drawn as fake queries
   (:meth:`veilface.client.routing.Router.decoy_lists`), sorted.
2. **Preselect** (:meth:`Searcher.preselect`): the server scores the first
   coordinates over the searched bins; the tenant decrypts. An exhaustive
   query (``k <= 0``) asks for whole-template scores here instead and stops
   after stage 4: one round trip, and per bin one score ciphertext, mask,
   re-randomization and decryption instead of two.
3. **Plan** (:func:`plan_rerank`, no network): which slots of which bins to
   score in full. In routed mode every named label, real or decoy, gets the
   same shape (below), so the re-ranking does not show which labels are real.
4. **Sync slot maps** (:class:`veilface.client.slot_maps.SlotMaps`): the
   tenant's copy of the slot -> handle map of every searched bin whose
   version it does not hold (all searched bins, never only the candidates).
5. **Re-rank** (:meth:`Searcher.rerank`): the server scores the rest of the
   template over the planned bins; only the requested slots carry a score
   (the server masks the others). Full score = stage 2 + stage 5 + offset.
6. **Decide** (:func:`decide`): best score per subject, top-1 against the
   tenant's threshold. The winner's handle comes from the local slot map:
   no request names it.

The routed plan. With ``r`` real lists and ``k`` candidates, each named label
``l`` (real or decoy) has a quota of ``q = ceil(k / r)`` slots and
re-ranks ``B_l = min(q, bins of l)`` bins: its ``B_l`` bins with the best
preselection score, every occupied slot of each (the server scores whole
bins anyway; naming only a top few slots per bin lost matches ranked just
below them). Both counts are functions of what the server knows anyway (the
label's bins and their occupancy), so they are the same for a decoy as for
a real label. When ``sum(B_l)`` reaches ``rerank_all_above`` of the searched
bins (also public), every occupied slot of every searched bin is re-ranked
instead (exact over the searched lists). Cost against re-ranking only the
real lists' top ``k``: the occupied slots of ``sum(B_l)`` bins, i.e. each decoy label is re-ranked like a real one
(with ``decoys = nprobe`` the re-ranking work roughly doubles), and a real
list contributes at most ``q`` candidates (one nearest list can no longer
take all ``k``).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from veilface.client import convert
from veilface.client.slot_maps import SlotMaps
from veilface.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from veilface.client.handles import HandleCodec
    from veilface.client.routing import Router
    from veilface.client.transport import Transport
    from veilface.crypto.tenant_crypto import TenantCrypto

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class SearchMode(str, Enum):
    """Which bins a query searches: ``strict`` every bin, ``routed`` the named lists."""

    STRICT = "strict"
    ROUTED = "routed"

    @classmethod
    def parse(cls, mode: str | SearchMode) -> SearchMode:
        """``mode`` as a :class:`SearchMode`; InvalidArgument for anything else."""
        try:
            return cls(mode)
        except ValueError:
            raise InvalidArgument("mode must be 'strict' or 'routed'") from None


# -- results ----------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    subject_id: str
    handle: str
    score: float


@dataclass
class QueryStats:
    """Where the time and bytes of one query went (for benchmarks)."""

    encrypt_ms: float = 0.0
    preselect_ms: float = 0.0
    rerank_ms: float = 0.0
    decrypt_ms: float = 0.0
    sync_ms: float = 0.0
    total_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    bins_preselected: int = 0
    bins_reranked: int = 0
    bins_synced: int = 0
    searched_templates: int = 0


@dataclass
class Identification:
    """Result of a 1:N search. ``match``: ``score`` at or above ``threshold``.

    ``threshold`` is the one the decision used and ``threshold_source`` why
    (client/thresholds.py): ``explicit`` (the call named it), ``calibrated``
    (the face model's threshold for a target FPIR at ``gallery_size``
    templates) or ``tenant`` (the tenant's own threshold, a floor).

    ``mode``: the mode the search ran in; ``fallback``: why a routed query
    ran strict instead (routing trained on too few templates, or not worth
    it at this gallery size; empty otherwise).
    """

    subject_id: str | None
    score: float
    match: bool
    candidates: list[Candidate] = field(default_factory=list)
    stats: QueryStats = field(default_factory=QueryStats)
    mode: SearchMode = SearchMode.STRICT
    fallback: str = ""
    threshold: float = float("nan")
    threshold_source: str = ""
    gallery_size: int = 0


@dataclass(frozen=True)
class Verification:
    subject_id: str
    score: float
    match: bool


# -- stage records ------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOptions:
    """How one query searches (``VeilClient.identify``'s keywords, checked once)."""

    mode: SearchMode = SearchMode.STRICT
    k: int = 32  # <= 0: exhaustive
    nprobe: int = 8
    decoys: int = 0  # routed mode only (ignored in strict mode)
    top_n: int = 5
    rerank_all_above: float = 0.75

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", SearchMode.parse(self.mode))
        for name in ("k", "nprobe", "decoys", "top_n"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise InvalidArgument(f"{name} must be an integer, got {value!r}")
        if self.decoys < 0:
            raise InvalidArgument("decoys must be >= 0")


@dataclass(frozen=True)
class Route:
    """Labels a query names (sorted; empty in strict mode) and how many lists are real."""

    labels: tuple[str, ...] = ()
    real_lists: int = 0


@dataclass(frozen=True)
class PreselectedBin:
    """A searched bin with its decrypted preselection scores (float64 [capacity])."""

    bin_id: int
    version: int
    label: str
    occupied: IntArray
    scores: FloatArray


@dataclass(frozen=True)
class Preselection:
    """What stage 2 left: the searched bins, scored staged templates, the probe's query id."""

    bins: tuple[PreselectedBin, ...]
    staged: tuple[Candidate, ...]
    query_id: str
    searched_templates: int
    exhaustive: bool = False  # the bins' scores are full scores: no re-ranking follows


@dataclass(frozen=True)
class RerankPlan:
    """Slots to score in full, by bin (ascending slots); ``exhaustive``: every occupied slot."""

    slots: Mapping[int, tuple[int, ...]]
    exhaustive: bool = False


@dataclass(frozen=True)
class ScoredSlots:
    """Full scores of re-ranked slots, as parallel arrays (int64, int64, float64 [n]).

    Arrays rather than one object per slot: an exhaustive re-ranking of
    100,000 templates made 100,000 Python objects and sorted them, some
    0.1 s of client time per query.
    """

    bin_ids: IntArray
    slots: IntArray
    scores: FloatArray

    @classmethod
    def empty(cls) -> ScoredSlots:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, np.zeros(0))

    def __len__(self) -> int:
        return int(self.scores.size)


# -- stage 3: the re-ranking plan (pure) ---------------------------------------------


def plan_rerank(
    bins: Sequence[PreselectedBin],
    *,
    k: int,
    real_lists: int,
    rerank_all_above: float = 0.75,
) -> RerankPlan:
    """Which slots to re-rank (module docstring: the routed plan).

    ``real_lists = 0`` (strict mode): the global top ``k`` slots, by their
    bins, with no shaping (there is no label to hide; the candidate slots
    are visible either way). ``k <= 0``: every occupied slot (exhaustive).
    """
    live = [b for b in bins if b.occupied.size]
    if not live:
        return RerankPlan({})
    if real_lists <= 0:
        return _plan_strict(live, k, rerank_all_above)
    quota = math.ceil(k / real_lists) if k > 0 else 0
    by_label: dict[str, list[PreselectedBin]] = {}
    for b in live:
        by_label.setdefault(b.label, []).append(b)
    shape = sum(min(quota, len(group)) for group in by_label.values())
    if k <= 0 or shape >= rerank_all_above * len(live):
        return _exhaustive(live)
    slots: dict[int, tuple[int, ...]] = {}
    for label in sorted(by_label):
        slots.update(_label_pick(by_label[label], quota))
    return RerankPlan(dict(sorted(slots.items())))


def _exhaustive(bins: Sequence[PreselectedBin]) -> RerankPlan:
    return RerankPlan(
        {b.bin_id: tuple(b.occupied.tolist()) for b in sorted(bins, key=lambda b: b.bin_id)},
        exhaustive=True,
    )


def _plan_strict(bins: Sequence[PreselectedBin], k: int, rerank_all_above: float) -> RerankPlan:
    if k <= 0:
        return _exhaustive(bins)
    ids = np.concatenate([np.full(b.occupied.size, i) for i, b in enumerate(bins)])
    slot = np.concatenate([b.occupied for b in bins])
    score = np.concatenate([b.scores[b.occupied] for b in bins])
    top = np.argsort(-score, kind="stable")[:k]
    picked: dict[int, list[int]] = {}
    for i in top:
        picked.setdefault(bins[int(ids[i])].bin_id, []).append(int(slot[i]))
    if len(picked) >= rerank_all_above * len(bins):
        # The candidates already span most bins: scoring the rest too costs
        # little more and makes the search exact over them.
        return _exhaustive(bins)
    # Every occupied slot of a candidate's bin: the server scores the whole
    # bin anyway, and a match just outside the top k often shares a bin with
    # one inside it (naming only the top-k slots lost such matches).
    occupied = {b.bin_id: b.occupied for b in bins}
    return RerankPlan(
        {b: tuple(occupied[b].tolist()) for b in sorted(picked)}
    )


def _label_pick(group: Sequence[PreselectedBin], quota: int) -> dict[int, tuple[int, ...]]:
    """One label's share: its ``min(quota, len(group))`` best bins, every occupied slot of each."""
    best = [float(np.max(b.scores[b.occupied])) for b in group]
    order = sorted(range(len(group)), key=lambda i: (-best[i], group[i].bin_id))
    chosen = [group[i] for i in order[: min(quota, len(group))]]
    return {b.bin_id: tuple(b.occupied.tolist()) for b in chosen}


# -- stage 6: the decision (pure) ----------------------------------------------------


def decide(
    candidates: Sequence[Candidate], *, threshold: float, top_n: int, stats: QueryStats
) -> Identification:
    """Best score per subject (a template being folded may be seen twice), top-1, threshold."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        if c.handle not in best or c.score > best[c.handle].score:
            best[c.handle] = c
    ranked = sorted(best.values(), key=lambda c: -c.score)[:top_n]
    if not ranked:
        return Identification(None, float("-inf"), False, [], stats)
    first = ranked[0]
    return Identification(first.subject_id, first.score, first.score >= threshold, ranked, stats)


def _best_first(scores: FloatArray, wanted: int) -> Iterator[int]:
    """Indices by score, best first, ties by index (a stable sort), sorting only what is read.

    A strict search scores every slot (100,000 at 100,000 templates): sorting
    them all took 10 ms of a 200 ms query to read a handful. The best
    ``4 * wanted + 64`` are sorted first; the rest only if the caller reads
    past them (slots emptied since the query have no handle).
    """
    n = int(scores.size)
    head = min(n, 4 * max(wanted, 1) + 64)
    if head >= n:
        yield from (int(i) for i in np.argsort(-scores, kind="stable"))
        return
    top = np.argpartition(-scores, head - 1)[:head]
    # the head's boundary may split a tie: take every slot tied with its worst score
    cut = scores[top].min()
    top = np.flatnonzero(scores >= cut)
    order = top[np.lexsort((top, -scores[top]))]
    yield from (int(i) for i in order)
    rest = np.setdiff1d(np.arange(n), top, assume_unique=True)
    yield from (int(i) for i in rest[np.argsort(-scores[rest], kind="stable")])


# -- the network stages -------------------------------------------------------------


class Searcher:
    """Runs the stages of one tenant key's identifications over a transport.

    Holds nothing per query; ``slot_maps`` persists across queries.
    """

    def __init__(
        self,
        transport: Transport,
        crypto: TenantCrypto,
        handles: HandleCodec,
        slot_maps: SlotMaps,
        *,
        tenant_id: str,
        key_id: str,
    ) -> None:
        self.transport = transport
        self.crypto = crypto
        self.handles = handles
        self.slot_maps = slot_maps
        self.tenant_id = tenant_id
        self.key_id = key_id
        self.capacity = crypto.layout.capacity

    # stage 1
    def route(
        self,
        router: Router | None,
        x_route: FloatArray,
        opts: SearchOptions,
        rng: np.random.Generator | None = None,
    ) -> Route:
        """The labels to send: none in strict mode; real and decoy lists, sorted, in routed.

        Decoys come from the OS CSPRNG unless ``rng`` is given (tests only:
        a server that could predict the decoys could tell them apart).
        """
        if opts.mode is SearchMode.STRICT:
            return Route()
        if router is None:
            raise FailedPrecondition("routed mode needs trained routing (train_routing)")
        lists = router.probe_lists(x_route.astype(np.float32), min(opts.nprobe, router.nlist))
        real = sorted({int(i) for i in np.asarray(lists).reshape(-1)})
        labels = router.query_labels(real, decoys=opts.decoys, rng=rng)
        return Route(tuple(labels), len(real))

    # stage 2
    def preselect(
        self,
        probe: Sequence[bytes],
        offset: float,
        mode: SearchMode,
        route: Route,
        stats: QueryStats,
        *,
        exhaustive: bool = False,
    ) -> Preselection:
        """Window scores of the searched bins; with ``exhaustive``, full scores (one stage).

        A server that does not know ``exhaustive`` answers with window scores
        and leaves the reply's flag unset; the caller then re-ranks as usual.
        """
        req = convert.preselect_request(
            self.tenant_id, self.key_id, mode, route.labels, probe, exhaustive=exhaustive
        )
        t = time.perf_counter()
        resp = self.transport.call(self.transport.identification.Preselect, req)
        stats.preselect_ms = (time.perf_counter() - t) * 1e3
        reply = convert.scores_from_proto(resp, self.capacity)
        stats.bytes_up += req.ByteSize()
        stats.bytes_down += reply.wire_bytes
        stats.bins_preselected = len(reply.bins)
        stats.searched_templates = reply.searched_templates
        t = time.perf_counter()
        bins = tuple(
            PreselectedBin(b.bin_id, b.version, b.label, b.occupied, self._decrypt(b.parts))
            for b in reply.bins
        )
        # Staged templates come back fully scored (the same score in every slot).
        staged = tuple(
            Candidate(
                self.handles.decode(s.handle),
                s.handle,
                float(np.mean(self.crypto.decrypt_staged_scores(s.scores)) + offset),
            )
            for s in reply.staged
        )
        stats.decrypt_ms += (time.perf_counter() - t) * 1e3
        return Preselection(
            bins, staged, reply.query_id, reply.searched_templates, exhaustive and reply.exhaustive
        )

    # stage 4
    def sync_slot_maps(self, pre: Preselection, stats: QueryStats) -> None:
        """Bring the slot maps of every searched bin up to date (never only the candidates)."""
        t = time.perf_counter()

        def fetch(known: list[tuple[int, int]]) -> list[convert.SlotMapUpdate]:
            req = convert.fetch_slot_maps_request(self.tenant_id, self.key_id, known)
            resp = self.transport.call(self.transport.identification.FetchSlotMaps, req)
            stats.bytes_up += req.ByteSize()
            stats.bytes_down += resp.ByteSize()
            updates: list[convert.SlotMapUpdate] = convert.slot_maps_from_proto(resp)
            return updates

        report = self.slot_maps.sync([(b.bin_id, b.version) for b in pre.bins], fetch)
        stats.bins_synced = report.received
        stats.sync_ms = (time.perf_counter() - t) * 1e3

    # stage 5
    def rerank(
        self,
        pre: Preselection,
        plan: RerankPlan,
        probe: Sequence[bytes],
        offset: float,
        stats: QueryStats,
    ) -> ScoredSlots:
        """Full scores of the planned slots (only those: the server masks the others)."""
        if not plan.slots:
            return ScoredSlots.empty()
        # Bins in a random order (bin ids follow enrollment history, and so
        # list sizes: a sorted order would show the oldest list first).
        order = list(plan.slots)
        secrets.SystemRandom().shuffle(order)
        shuffled = {b: plan.slots[b] for b in order}
        req = convert.score_candidates_request(
            self.tenant_id, self.key_id, shuffled, query_id=pre.query_id
        )
        t = time.perf_counter()
        try:
            resp = self.transport.call(self.transport.identification.ScoreCandidates, req)
        except NotFound:  # the server forgot the probe (restart, expiry): send it again
            req = convert.score_candidates_request(
                self.tenant_id, self.key_id, shuffled, probe=probe
            )
            resp = self.transport.call(self.transport.identification.ScoreCandidates, req)
        stats.rerank_ms = (time.perf_counter() - t) * 1e3
        reply = convert.scores_from_proto(resp, self.capacity)
        stats.bytes_up += req.ByteSize()
        stats.bytes_down += reply.wire_bytes
        stats.bins_reranked = len(reply.bins)
        t = time.perf_counter()
        presel = {b.bin_id: b.scores for b in pre.bins}
        ids, slots, scores = [], [], []
        for b in reply.bins:
            wanted = plan.slots.get(b.bin_id)
            if wanted is None or b.bin_id not in presel:
                continue  # not asked for: ignore it
            idx = np.asarray(wanted, dtype=np.int64)
            scores.append(presel[b.bin_id][idx] + self._decrypt(b.parts)[idx] + offset)
            slots.append(idx)
            ids.append(np.full(idx.size, b.bin_id, dtype=np.int64))
        stats.decrypt_ms += (time.perf_counter() - t) * 1e3
        if not scores:
            return ScoredSlots.empty()
        return ScoredSlots(np.concatenate(ids), np.concatenate(slots), np.concatenate(scores))

    @staticmethod
    def full_scores(pre: Preselection, offset: float) -> ScoredSlots:
        """The occupied slots of an exhaustive preselection, with their full scores."""
        live = [b for b in pre.bins if b.occupied.size]
        if not live:
            return ScoredSlots.empty()
        return ScoredSlots(
            np.concatenate([np.full(b.occupied.size, b.bin_id, dtype=np.int64) for b in live]),
            np.concatenate([b.occupied.astype(np.int64) for b in live]),
            np.concatenate([b.scores[b.occupied] + offset for b in live]),
        )

    def candidates(self, scored: ScoredSlots, top_n: int) -> list[Candidate]:
        """The best ``top_n`` re-ranked slots whose handle the local slot maps know."""
        out: list[Candidate] = []
        for i in _best_first(scored.scores, top_n):
            handle = self.slot_maps.handle(int(scored.bin_ids[i]), int(scored.slots[i]))
            if not handle:
                continue  # emptied since the query, or its bin is gone
            out.append(Candidate(self.handles.decode(handle), handle, float(scored.scores[i])))
            if len(out) >= top_n:
                break
        return out

    def identify(
        self,
        probe: Sequence[bytes],
        offset: float,
        x_route: FloatArray,
        opts: SearchOptions,
        *,
        router: Router | None,
        threshold: float,
        stats: QueryStats,
        rng: np.random.Generator | None = None,
    ) -> Identification:
        """Stages 1-6 for an encrypted probe (``VeilClient.identify`` prepared it)."""
        route = self.route(router, x_route, opts, rng)
        # k <= 0 asks for every occupied slot: score whole templates in one stage
        pre = self.preselect(probe, offset, opts.mode, route, stats, exhaustive=opts.k <= 0)
        if pre.exhaustive:
            found: list[Candidate] = list(pre.staged)
            if pre.bins:
                self.sync_slot_maps(pre, stats)
                stats.bins_reranked = len(pre.bins)
                found = self.candidates(self.full_scores(pre, offset), opts.top_n) + found
            result = decide(found, threshold=threshold, top_n=opts.top_n, stats=stats)
            result.mode = opts.mode
            return result
        plan = plan_rerank(
            pre.bins, k=opts.k, real_lists=route.real_lists, rerank_all_above=opts.rerank_all_above
        )
        found = list(pre.staged)
        if plan.slots:
            self.sync_slot_maps(pre, stats)
            found = self.candidates(self.rerank(pre, plan, probe, offset, stats), opts.top_n) + found
        result = decide(found, threshold=threshold, top_n=opts.top_n, stats=stats)
        result.mode = opts.mode
        return result

    def _decrypt(self, parts: Sequence[bytes]) -> FloatArray:
        """A bin's scores: one ciphertext, or parts scored by several workers."""
        total = np.sum([self.crypto.decrypt_scores(p) for p in parts], axis=0)
        return np.asarray(total, dtype=np.float64)


__all__ = [
    "Candidate",
    "Identification",
    "PreselectedBin",
    "Preselection",
    "QueryStats",
    "RerankPlan",
    "Route",
    "ScoredSlots",
    "SearchMode",
    "SearchOptions",
    "Searcher",
    "Verification",
    "decide",
    "plan_rerank",
]
