"""The SDK's choice of nlist, nprobe and k, in plaintext: replay against the real plan, recall, fallback."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from veilface.bench.synthetic import SyntheticFaces
from veilface.client.route_tuning import (
    BinCosts,
    Probes,
    TuneOptions,
    replay,
    tune_routing,
)
from veilface.client.routing import Router
from veilface.client.search import PreselectedBin, plan_rerank
from veilface.client.search_defaults import SearchDefaults
from veilface.crypto.layout import DiagonalLayout
from veilface.errors import InvalidArgument

KEY = bytes(range(32))
# Bins of 512 templates (256 slots, two per slot): a 6,000-template gallery
# fills a dozen, as 100,000 fill 25 bins of 4,096.
LAYOUT = DiagonalLayout(128, 256, 0, 2)


def _gallery(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(templates as routed [n, d], their center [d], a second capture of each [n, d]), mixed."""
    emb, _ = SyntheticFaces().sample(n, 2, seed=seed)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((128, 128)))
    gal, second = emb[0::2].astype(np.float64) @ q.T, emb[1::2].astype(np.float64) @ q.T
    return gal, gal.mean(axis=0), second


def _train(x: np.ndarray):  # type: ignore[no-untyped-def]
    return lambda nl: Router.train(x.astype(np.float32), nlist=nl, label_key=KEY, key_id="k1")


@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _gallery(6000)


def test_replay_agrees_with_the_real_rerank_plan(gallery) -> None:  # type: ignore[no-untyped-def]
    """The simulator's hit is plan_rerank's: true template's bin re-ranked, on each probe and (nprobe, k)."""
    x, mu, _ = gallery
    router = _train(x)(12)
    assigned = router.assign(x.astype(np.float32))
    rng = np.random.default_rng(0)
    probes = Probes.draw(x, mu, rng.choice(len(x), 60, replace=False), TuneOptions(), rng, 128)
    m, cap = LAYOUT.m, LAYOUT.capacity
    rep = replay(router, assigned, x - mu, probes, capacity=cap, windows=[m], nprobe_max=4)[m]
    masks = ((np.arange(128)[None, :] - np.arange(128)[:, None]) % 128) < m
    for nprobe, quota in [(1, 1), (2, 1), (3, 2), (4, 1)]:
        hit, *_ = rep.evaluate(nprobe, quota, BinCosts.of(LAYOUT, m))
        for i, src in enumerate(probes.source):
            lists = router.probe_lists(probes.route[i], nprobe)
            bins, where = [], None
            for lst in lists:
                members = np.flatnonzero(assigned == lst)  # enrollment order
                for b in range(0, len(members), cap):
                    rows = members[b : b + cap]
                    slots = np.arange(len(rows))
                    scores = np.zeros(cap)
                    scores[slots] = ((x[rows] - mu) * masks[slots % 128]) @ probes.centered[i]
                    bid = len(bins)
                    bins.append(PreselectedBin(bid, 1, str(lst), slots, scores))
                    if src in rows:
                        where = bid
            plan = plan_rerank(bins, k=nprobe * quota, real_lists=nprobe)
            assert bool(hit[i]) == (where is not None and where in plan.slots), (nprobe, quota, i)


def test_tuned_choice_reaches_the_target_on_held_out_and_real_probes(gallery) -> None:  # type: ignore[no-untyped-def]
    x, mu, second = gallery
    result = tune_routing(x, mu, layout=LAYOUT, train=_train(x))
    d = result.defaults
    assert d.routed and result.router is not None and result.router.nlist == d.nlist
    assert d.auto and d.gallery == len(x) and d.presel_dims == LAYOUT.m
    assert d.recall >= 0.99 and d.tuning_recall >= d.target_recall == 0.995
    assert (d.k == 0 or d.k >= d.nprobe) and d.nprobe >= 1 and d.probes > 0  # k 0: one stage
    strict_bins = math.ceil(len(x) / LAYOUT.capacity)
    assert d.bins_searched < strict_bins / 2  # routing pays: well under every bin
    # Fewer, fuller lists: about a bin of templates per list, not a quarter.
    assert len(x) / d.nlist >= 0.5 * LAYOUT.capacity
    # The real second capture of each subject finds its template as often.
    assigned = result.router.assign(x.astype(np.float32))
    real = Probes(second.astype(np.float32), second - mu, np.arange(len(x)))
    rep = replay(result.router, assigned, x - mu, real, capacity=LAYOUT.capacity,
                 windows=[LAYOUT.m], nprobe_max=d.nprobe)[LAYOUT.m]
    hit, *_ = rep.evaluate(d.nprobe, d.k // d.nprobe, BinCosts.of(LAYOUT, LAYOUT.m))
    assert hit.mean() >= 0.99


def test_a_higher_target_costs_more_and_an_explicit_nlist_is_kept(gallery) -> None:  # type: ignore[no-untyped-def]
    x, mu, _ = gallery
    low = tune_routing(x, mu, layout=LAYOUT, train=_train(x), options=TuneOptions(target_recall=0.9)).defaults
    high = tune_routing(x, mu, layout=LAYOUT, train=_train(x), options=TuneOptions(target_recall=0.999)).defaults
    # a higher target costs more, or so much that strict wins (no modelled routed cost then)
    assert low.cost_ms <= (high.cost_ms if high.routed else math.inf) and low.tuning_recall >= 0.9
    fixed = tune_routing(x, mu, layout=LAYOUT, train=_train(x), nlists=[40], allow_strict=False).defaults
    assert fixed.routed and fixed.nlist == 40 and not fixed.auto


def test_too_few_or_too_small_to_pay_gives_strict_with_a_reason(caplog) -> None:  # type: ignore[no-untyped-def]
    x, mu, _ = _gallery(60)
    with caplog.at_level("WARNING"):
        few = tune_routing(x, mu, layout=LAYOUT, train=_train(x))
    assert few.router is None and not few.defaults.routed and "39" in few.defaults.reason
    assert "run strict" in caplog.text
    # 800 templates fill two bins: probing lists cannot search less than strict.
    x, mu, _ = _gallery(800)
    small = tune_routing(x, mu, layout=LAYOUT, train=_train(x))
    assert small.router is None and "does not pay" in small.defaults.reason


def test_search_defaults_round_trip_and_checks() -> None:
    d = SearchDefaults(nlist=24, nprobe=3, k=9, presel_dims=32, target_recall=0.995, recall=0.998, gallery=10)
    assert SearchDefaults.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    blank = SearchDefaults.from_dict(SearchDefaults(nlist=2).to_dict())
    assert math.isnan(blank.recall)
    with pytest.raises(InvalidArgument):
        SearchDefaults(mode="strict")  # says why
    with pytest.raises(InvalidArgument):
        SearchDefaults(mode="routed", nlist=0)
    with pytest.raises(InvalidArgument):
        SearchDefaults(nlist=2, nprobe=-1)


def test_pseudo_probes_keep_the_shared_part_and_target_the_exhaustive_top1(gallery) -> None:  # type: ignore[no-untyped-def]
    """A pseudo-probe sits at its drawn cosine from the template, as near to other people as a
    real second capture (not pushed away from everyone), and its target is the exhaustive top-1."""
    from veilface.client.route_tuning import exhaustive_top1

    x, mu, second = gallery
    rows = np.arange(2000)
    c = np.sum(second[rows] * x[rows], axis=1, keepdims=True)
    p = Probes.draw(x, mu, rows, TuneOptions(), np.random.default_rng(1), 128, cosine=c)
    route = p.route.astype(np.float64)
    assert np.allclose(np.linalg.norm(route, axis=1), 1.0, atol=1e-5)
    assert np.abs(np.sum(route * x[rows], axis=1) - c[:, 0]).mean() < 0.01
    others = x[2000:4000]
    real = float((second[rows] @ others.T).mean())
    assert abs(float((route @ others.T).mean()) - real) < 0.01  # an origin-centred draw is ~0.04 lower
    top1 = exhaustive_top1(x, route)
    assert np.array_equal(top1, np.argmax(route @ x.T, axis=1))
    assert np.array_equal(p.targeting(top1).source, top1)
