"""The identification stages without a server: mode, re-ranking plan, slot maps, bitmaps, decoys."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from veilface.bench.synthetic import SyntheticFaces
from veilface.client.convert import SlotMapUpdate, occupancy_bitmap, occupied_slots
from veilface.client.routing import Router
from veilface.client.search import (
    Candidate,
    PreselectedBin,
    QueryStats,
    SearchMode,
    SearchOptions,
    decide,
    plan_rerank,
)
from veilface.client.slot_maps import SLOT_MAPS_PER_CALL, SlotMaps
from veilface.errors import InvalidArgument

CAP = 64


def test_search_mode_is_parsed_once() -> None:
    assert SearchMode.parse("routed") is SearchMode.ROUTED
    assert SearchMode.parse(SearchMode.STRICT) is SearchMode.STRICT
    assert SearchOptions("routed").mode is SearchMode.ROUTED
    with pytest.raises(InvalidArgument, match="strict"):
        SearchMode.parse("fast")
    with pytest.raises(InvalidArgument):
        SearchOptions(SearchMode.ROUTED, k=1.5)
    with pytest.raises(InvalidArgument):
        SearchOptions(SearchMode.ROUTED, decoys=-1)


def test_occupancy_codec_round_trip_and_server_encoder() -> None:
    from veilface.server.convert import occupancy_bitmap as server_bitmap

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 40, CAP):
        slots = sorted(rng.choice(CAP, n, replace=False).tolist())
        for enc in (occupancy_bitmap(slots), server_bitmap(slots)):
            assert occupied_slots(enc, CAP).tolist() == slots
        assert occupancy_bitmap(slots) == server_bitmap(slots)
    # an old server's full-length bitmap reads the same
    full = bytearray(CAP // 8)
    full[0] = 0b101
    assert occupied_slots(bytes(full), CAP).tolist() == [0, 2]
    with pytest.raises(InvalidArgument, match="slot"):
        occupied_slots(occupancy_bitmap([CAP]), CAP)


def _bins(spec: dict[str, list[int]], rng: np.random.Generator, boost: str = "") -> list[PreselectedBin]:
    """Bins per label with the given occupancies, random scores; ``boost``: one label scores high."""
    out, bin_id = [], 100
    for label, occupancies in spec.items():
        for n in occupancies:
            scores = rng.normal(0.0, 0.1, CAP)
            if label == boost:
                scores += 0.5
            occ = np.sort(rng.choice(CAP, n, replace=False)).astype(np.int64)
            out.append(PreselectedBin(bin_id, 1, label, occ, scores))
            bin_id += 7
    return [out[i] for i in rng.permutation(len(out))]


def _shape(plan_slots: dict[int, tuple[int, ...]], bins: Sequence[PreselectedBin]) -> dict[str, tuple[int, int]]:
    label = {b.bin_id: b.label for b in bins}
    shape: dict[str, list[int]] = {}
    for b, s in plan_slots.items():
        shape.setdefault(label[b], [0, 0])
        shape[label[b]][0] += 1
        shape[label[b]][1] += len(s)
    return {lab: (n, m) for lab, (n, m) in shape.items()}


SPEC = {"a": [30], "b": [20, 25, 3], "c": [9, 9, 9, 9, 9, 9], "d": [1, 1]}


def test_routed_plan_gives_every_label_a_shape_fixed_by_public_counts() -> None:
    k, real = 8, 2
    q = math.ceil(k / real)
    want = {lab: min(q, len(occ)) for lab, occ in SPEC.items()}
    rng = np.random.default_rng(1)
    for trial in range(200):
        # whichever label holds the probe's neighbours (scores high), the shape is the same
        bins = _bins(SPEC, rng, boost="abcd"[trial % 4])
        plan = plan_rerank(bins, k=k, real_lists=real, rerank_all_above=1.0)
        assert not plan.exhaustive
        # bins per label: min(q, its bins); slots: every occupied slot of each (public)
        assert {lab: n for lab, (n, _) in _shape(dict(plan.slots), bins).items()} == want
        occupied = {b.bin_id: tuple(b.occupied.tolist()) for b in bins}
        for b, slots in plan.slots.items():
            assert slots == occupied[b]
        # each label's best preselection slot is always re-ranked
        for lab in SPEC:
            group = [b for b in bins if b.label == lab]
            top = max(group, key=lambda b: float(np.max(b.scores[b.occupied])))
            best = int(top.occupied[np.argmax(top.scores[top.occupied])])
            assert best in plan.slots[top.bin_id]


def test_routed_plan_goes_exhaustive_on_public_counts_only() -> None:
    rng = np.random.default_rng(2)
    bins = _bins(SPEC, rng)
    every = {b.bin_id: tuple(b.occupied.tolist()) for b in bins}
    for plan in (
        plan_rerank(bins, k=0, real_lists=2),
        plan_rerank(bins, k=8, real_lists=2, rerank_all_above=0.75),  # 10 of 12 bins
        plan_rerank(bins, k=64, real_lists=2, rerank_all_above=1.0),
    ):
        assert plan.exhaustive and dict(plan.slots) == every
    assert not plan_rerank(bins, k=8, real_lists=2, rerank_all_above=0.9).exhaustive
    assert plan_rerank([], k=8, real_lists=2).slots == {}


def test_strict_plan_takes_the_bins_of_the_global_top_k_whole() -> None:
    rng = np.random.default_rng(3)
    bins = _bins({"": [40] * 8}, rng)
    plan = plan_rerank(bins, k=5, real_lists=0)
    ranked = sorted(
        ((float(b.scores[s]), b.bin_id, int(s)) for b in bins for s in b.occupied), reverse=True
    )
    # the bins of the top 5 slots, each with every occupied slot (a match just
    # below the top 5 in one of those bins is scored in full too)
    occupied = {b.bin_id: tuple(b.occupied.tolist()) for b in bins}
    assert dict(plan.slots) == {b: occupied[b] for b in sorted({b for _, b, _ in ranked[:5]})}
    assert plan_rerank(bins, k=40, real_lists=0).exhaustive  # top 40 span most bins


def test_decide_keeps_the_best_score_per_subject() -> None:
    found = [Candidate("x", "hx", 0.8), Candidate("y", "hy", 0.9), Candidate("x", "hx", 0.95)]
    r = decide(found, threshold=0.92, top_n=5, stats=QueryStats())
    assert (r.subject_id, r.score, r.match) == ("x", 0.95, True)
    assert [c.subject_id for c in r.candidates] == ["x", "y"]
    assert decide([], threshold=0.5, top_n=5, stats=QueryStats()).subject_id is None


def test_slot_maps_sync_by_version_in_bounded_calls() -> None:
    maps = SlotMaps(max_bins=200)
    server: dict[int, tuple[int, tuple[int, ...], tuple[str, ...]]] = {
        b: (3, (0, 5, 2), (f"h{b}-0", f"h{b}-5", f"h{b}-2")) for b in range(130)
    }
    calls: list[list[tuple[int, int]]] = []

    def fetch(known: list[tuple[int, int]]) -> list[SlotMapUpdate]:
        assert len(known) <= SLOT_MAPS_PER_CALL
        calls.append(known)
        return [SlotMapUpdate(b, *server[b]) for b, held in known if held != server[b][0]]

    searched = [(b, 3) for b in range(130)]
    report = maps.sync(searched, fetch)
    assert (report.asked, report.received, report.calls) == (130, 130, 3)
    assert all(v == 0 for call in calls for _, v in call)  # nothing held yet
    assert maps.handle(7, 5) == "h7-5" and maps.handle(7, 2) == "h7-2" and maps.handle(7, 1) is None
    calls.clear()
    assert maps.sync(searched, fetch).calls == 0 and not calls  # up to date: no call at all
    server[9] = (4, (1,), ("new",))
    report = maps.sync([(b, 4 if b == 9 else 3) for b in range(130)], fetch)
    assert calls == [[(9, 3)]] and report.received == 1 and maps.handle(9, 1) == "new"
    assert maps.handle(9, 0) is None
    small = SlotMaps(max_bins=2)
    for b in range(3):
        small.put(SlotMapUpdate(b, 1, (0,), (f"h{b}",)))
    assert small.handle(0, 0) is None and small.handle(2, 0) == "h2" and len(small) == 2
    with pytest.raises(InvalidArgument):
        small.put(SlotMapUpdate(5, 1, (0, 1), ("one",)))


# -- decoys ----------------------------------------------------------------------


def _adversary_accuracy(
    router: Router,
    probes: np.ndarray,
    nprobe: int,
    draw: Callable[[list[int]], list[int]],
) -> dict[str, float]:
    """Accuracy of guessing one real list per query, by list size and by co-occurrence."""
    sizes = np.asarray(router.list_sizes)
    queries = []
    for p in probes:
        real = sorted({int(i) for i in router.probe_lists(p, nprobe)})
        queries.append((set(real), sorted(set(real) | set(draw(real)))))
    pairs: Counter[tuple[int, int]] = Counter()
    for _, sent in queries:
        pairs.update(itertools.combinations(sent, 2))
    rng = np.random.default_rng(0)

    def accuracy(score: Callable[[int, list[int]], float]) -> float:
        right = 0
        for real, sent in queries:
            keys = [(score(lab, sent), rng.random()) for lab in sent]
            right += int(sent[int(np.argmax([k[0] + 1e-9 * k[1] for k in keys]))] in real)
        return right / len(queries)

    def together(lab: int, sent: list[int]) -> float:  # other queries naming the same pairs
        return float(sum(pairs[(min(lab, m), max(lab, m))] - 1 for m in sent if m != lab))

    return {
        "largest": accuracy(lambda lab, _: float(sizes[lab])),
        "smallest": accuracy(lambda lab, _: -float(sizes[lab])),
        "most together": accuracy(together),
        "least together": accuracy(lambda lab, sent: -together(lab, sent)),
    }


def test_decoys_are_drawn_like_real_queries() -> None:
    """Real lists are near each other and large more often; decoys drawn as fake queries are too.

    With uniform decoys (what ``Router.query_labels`` drew before) a server
    that guesses the largest named list is right 3 times in 4, and one that
    counts which labels other queries named together 19 times in 20 (chance:
    1 in 2). Fake queries keep every such adversary within 0.06 of chance.
    """
    emb, _ = SyntheticFaces().sample(1500, 2, seed=3)
    gallery, probes = emb[0::2], emb[1::2]
    router = Router.train(gallery, nlist=32, label_key=bytes(32), key_id="k", seed=1)
    assert router.list_sizes is not None and sum(router.list_sizes) == len(gallery)
    assert router.list_spread is not None and 0.0 < router.list_spread < 1.0
    nprobe = decoys = 2
    rng = np.random.default_rng(4)

    def fake(real: list[int]) -> list[int]:
        chosen: list[int] = router.decoy_lists(real, decoys, group=len(real), rng=rng)
        return chosen

    def uniform(real: list[int]) -> list[int]:
        free = [i for i in range(router.nlist) if i not in real]
        return [int(i) for i in rng.choice(free, decoys, replace=False)]

    chance = nprobe / (nprobe + decoys)
    got = _adversary_accuracy(router, probes, nprobe, fake)
    assert all(abs(a - chance) <= 0.06 for a in got.values()), got
    before = _adversary_accuracy(router, probes, nprobe, uniform)
    assert before["largest"] > chance + 0.15 and before["most together"] > chance + 0.3, before
    # the labels a query sends: real and decoys, sorted, none twice
    sent = router.query_labels([3, 9], decoys=4)
    assert sent == sorted(set(sent)) and len(sent) == 6 and set(router.labels([3, 9])) <= set(sent)


def test_router_keeps_list_statistics_across_save_and_load() -> None:
    emb, _ = SyntheticFaces().sample(400, 1, seed=5)
    router = Router.train(emb, nlist=8, label_key=bytes(32), key_id="k", seed=0)
    back = Router.from_dict(router.to_dict())
    assert back.list_sizes == router.list_sizes and back.list_spread == router.list_spread
    old = router.to_dict()
    del old["list_sizes"], old["list_spread"]
    legacy = Router.from_dict(old)  # saved before the statistics were kept: uniform seeds
    assert legacy.list_sizes is None and legacy.list_spread is None
    assert len(legacy.decoy_lists([0], 3, group=2)) == 3
    with pytest.raises(InvalidArgument):
        Router.from_dict({**router.to_dict(), "list_sizes": [1, 2]})


def test_best_first_is_a_stable_sort_read_lazily() -> None:
    from veilface.client.search import _best_first

    rng = np.random.default_rng(0)
    for n in (1, 7, 100, 5000):
        for rounded in (False, True):  # rounding makes ties, across the partition's cut too
            s = rng.normal(size=n)
            if rounded:
                s = np.round(s, 1)
            want = [int(i) for i in np.argsort(-s, kind="stable")]
            assert list(_best_first(s, 3)) == want  # read to the end: every index once
            assert list(itertools.islice(_best_first(s, 2), 10)) == want[:10]
