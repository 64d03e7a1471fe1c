"""Shared tail bins: grouping, the bulk plan, the bins a query searches, labels and persistence."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.client.test_route_tuning import LAYOUT, _gallery, _train
from veilface.client.enrollment import bulk_plan
from veilface.client.route_tuning import TuneOptions, tune_routing
from veilface.client.routing import Router
from veilface.client.tail_packing import NO_GROUP, group_tails, plan_bins, searched_bins
from veilface.crypto.layout import DiagonalLayout
from veilface.errors import InvalidArgument

KEY = bytes(range(32))


def _centroids(n: int, seed: int = 0) -> np.ndarray:
    c = np.random.default_rng(seed).standard_normal((n, 8))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def test_groups_never_overflow_and_lists_without_a_tail_have_none() -> None:
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 3000, 60)
    sizes[:5] = [1000, 2000, 0, 3000, 1000]  # multiples of the capacity: no tail
    groups = group_tails(sizes, 1000, _centroids(60))
    tails = sizes % 1000
    assert (groups[tails == 0] == NO_GROUP).all() and (groups[tails > 0] >= 0).all()
    totals = np.bincount(groups[groups >= 0], weights=tails[groups >= 0])
    assert totals.max() <= 1000 and (totals > 0).all()  # no empty group, none over a bin
    assert len(totals) <= 1.3 * np.ceil(tails.sum() / 1000) + 1  # filled nearly full
    with pytest.raises(ValueError):
        group_tails([1, 2], 0, _centroids(2))


def test_grouping_prefers_neighbours() -> None:
    # four tails of 300 in bins of 600: two pairs of near-identical centroids pair up
    c = np.array([[1, 0], [0, 1], [0.99, 0.14], [0.14, 0.99]], dtype=np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    g = group_tails([300, 300, 300, 300], 600, c)
    assert g[0] == g[2] and g[1] == g[3] and g[0] != g[1]


def test_plan_keeps_every_row_once_full_bins_per_list_and_tails_per_group() -> None:
    rng = np.random.default_rng(2)
    lists = rng.integers(0, 6, 2500)
    sizes = np.bincount(lists, minlength=6)
    groups = group_tails(sizes, 400, _centroids(6))
    plan = plan_bins(lists, groups, 400)
    rows = np.concatenate([b.rows for b in plan])
    assert sorted(rows.tolist()) == list(range(2500))
    for b in plan:
        assert 0 < len(b.rows) <= 400 and (np.diff(b.rows) > 0).all()  # import order within a bin
        if b.tail:
            assert set(groups[lists[b.rows]].tolist()) == {b.owner}
        else:
            assert len(b.rows) == 400 and set(lists[b.rows].tolist()) == {b.owner}
    unpacked = plan_bins(lists, None, 400)
    assert len(unpacked) == int((-(-sizes // 400)).sum()) and len(plan) < len(unpacked)
    assert all(not b.tail for b in unpacked)


def test_searched_bins_counts_each_group_once() -> None:
    full = np.array([1, 2, 0, 1])
    groups = np.array([0, 0, 1, NO_GROUP])
    group_bins = np.array([1, 2])
    probed = np.array([[0, 1], [0, 2], [3, 2], [1, 0]])
    assert searched_bins(probed, full, groups, group_bins).tolist() == [4, 4, 3, 4]


def test_router_labels_tails_persists_them_and_routes_single_enrollments_to_them() -> None:
    x = np.random.default_rng(3).standard_normal((400, 16)).astype(np.float32)
    router = Router.train(x, nlist=4, label_key=KEY, key_id="k1")
    sizes = np.bincount(router.assign(x), minlength=4)
    grouped = replace(router, tail_groups=tuple(int(g) for g in group_tails(sizes, 64, router.centroids)))
    tail_labels = {grouped.tail_label(g) for g in set(grouped.tail_groups or ()) if g >= 0}
    assert not tail_labels & set(grouped.labels(range(4)))  # never a list's label
    labels = grouped.query_labels([0])
    assert grouped.label(0) in labels and grouped.tail_label(grouped.tail_groups[0]) in labels
    assert grouped.enrollment_labels([0]) == [grouped.tail_label(grouped.tail_groups[0])]
    assert router.enrollment_labels([0]) == [router.label(0)]  # no groups: the list's own
    again = Router.from_dict(grouped.to_dict())
    assert again.tail_groups == grouped.tail_groups and again.query_labels([0]) == labels
    with pytest.raises(InvalidArgument):
        grouped.tail_label(99)
    with pytest.raises(InvalidArgument):
        replace(router, tail_groups=(0, 1))  # one per list
    with pytest.raises(InvalidArgument):
        Router(router.centroids, 1, KEY, None, tail_groups=(0, 0, 0, 0))  # legacy labels: none
    bad = grouped.to_dict()
    bad["tail_groups"] = ["a"] * 4
    with pytest.raises(InvalidArgument):
        Router.from_dict(bad)


def test_bulk_plan_labels_bins_by_list_and_group() -> None:
    x = np.random.default_rng(4).standard_normal((700, 16)).astype(np.float32)
    router = Router.train(x, nlist=3, label_key=KEY, key_id="k1")
    lists = router.assign(x)
    sizes = np.bincount(lists, minlength=3)
    grouped = replace(router, tail_groups=tuple(int(g) for g in group_tails(sizes, 128, router.centroids)))
    plan = bulk_plan(grouped, lists, 700, 128)
    allowed = set(grouped.labels(range(3))) | {grouped.tail_label(g) for g in grouped.tail_groups if g >= 0}
    assert {lab for lab, _ in plan} <= allowed
    assert sorted(np.concatenate([r for _, r in plan]).tolist()) == list(range(700))
    assert [len(r) for _, r in bulk_plan(None, None, 300, 128)] == [128, 128, 44]


def test_one_stage_tuning_groups_the_tails_and_counts_them() -> None:
    x, mu, _ = _gallery(6000)
    tuned = tune_routing(x, mu, layout=LAYOUT, train=_train(x), options=TuneOptions(seed=1))
    d = tuned.defaults
    assert d.routed and tuned.router is not None
    if d.k == 0:  # one stage: the tails share bins, and the count says how many groups
        assert tuned.router.tail_groups is not None and d.tail_groups == max(tuned.router.tail_groups) + 1
        sizes = np.bincount(tuned.router.assign(x.astype(np.float32)), minlength=tuned.router.nlist)
        plan = plan_bins(tuned.router.assign(x.astype(np.float32)), tuned.router.tail_groups, LAYOUT.capacity)
        assert len(plan) < int((-(-sizes // LAYOUT.capacity)).sum())
    else:
        assert tuned.router.tail_groups is None and d.tail_groups == 0


def test_layout_capacity_is_what_the_plan_uses() -> None:
    assert DiagonalLayout(128, 256, 0, 2).capacity == LAYOUT.capacity == 512
