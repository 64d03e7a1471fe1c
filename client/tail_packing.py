"""Shared tail bins: the last, partly filled bin of each list packed with its neighbours'.

Bulk import cuts a list of ``s`` templates into ``s // capacity`` full bins
and one *tail* of ``s % capacity``. Scoring a bin costs the same whatever
its occupancy (every diagonal is multiplied), so a tail of 70 templates in
a bin of its own costs a query as much as 4,096: with lists of about one
bin (what the tuner chooses, ``client/route_tuning.py``), a query of three
lists searched six bins, three of them nearly empty.

Here the tails of neighbouring lists share bins. Each list with a tail is
given a *tail group* when routing is trained (:func:`group_tails`: runs of
neighbouring lists along a nearest-neighbour chain of their centroids, so
that lists probed together tend to share their group);
the group's bins carry a label of their own
(:meth:`veilface.client.routing.Router.tail_label`), and a query names, for
every list it probes, the list's label and its group's. The query above
then searches three full bins and one shared tail bin.

What the server sees besides: a few more labels (one per group) with their
sizes, and, per query, the groups named with the lists. A group names
lists that are near each other, which the lists' co-occurrence in queries
already tells over time. Templates of other lists in a shared tail bin are
scored and ranked too: extra candidates, never a missed one.

Single enrollments into a list with a group go into the group's bins
(:func:`enrollment_label_ids`), which have the room; a list without one
fills its own last bin as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]

#: ``tail_groups`` entry of a list with no tail (its size a multiple of the capacity).
NO_GROUP = -1


def group_tails(sizes: npt.ArrayLike, capacity: int, centroids: npt.ArrayLike) -> IntArray:
    """A tail group per list (``NO_GROUP`` for a list without a tail), int64 [nlist].

    The lists with a tail are walked in a nearest-neighbour chain over their
    centroids (from the largest tail, each step to the nearest list not yet
    visited), and each tail goes into the first of the last
    :data:`LOOKBACK` groups with room for it, a new group when none has:
    groups are runs of neighbouring lists, filled nearly full. No group
    holds more than ``capacity`` templates of the sizes given.
    """
    n = np.asarray(sizes, dtype=np.int64)
    cents = np.asarray(centroids, dtype=np.float64)
    if capacity < 1 or n.ndim != 1 or len(cents) != len(n) or (n < 0).any():
        raise ValueError("one size >= 0 and one centroid per list, and a capacity >= 1")
    tails = n % capacity
    out = np.full(len(n), NO_GROUP, dtype=np.int64)
    room: list[int] = []
    for lst in _chain(np.flatnonzero(tails), tails, cents):
        t = int(tails[lst])
        recent = range(max(0, len(room) - LOOKBACK), len(room))
        g = next((g for g in recent if room[g] >= t), len(room))
        if g == len(room):
            room.append(capacity)
        room[g] -= t
        out[lst] = g
    return out


#: Open groups a tail may still join (the most recent ones along the chain).
LOOKBACK = 3


def _chain(ids: IntArray, tails: IntArray, cents: npt.NDArray[np.float64]) -> list[int]:
    """``ids`` in a nearest-neighbour chain by inner product, from the largest tail."""
    if len(ids) == 0:
        return []
    left = np.ones(len(ids), dtype=bool)
    sims = cents[ids] @ cents[ids].T
    cur = int(np.argmax(tails[ids]))
    order = []
    for _ in range(len(ids)):
        order.append(int(ids[cur]))
        left[cur] = False
        if not left.any():
            break
        cur = int(np.argmax(np.where(left, sims[cur], -np.inf)))
    return order


@dataclass(frozen=True)
class PlannedBin:
    """One bin of a bulk import: whose label it carries and which rows it holds.

    ``tail`` False: ``owner`` is a list id; True: a tail group id.
    """

    owner: int
    tail: bool
    rows: IntArray


def plan_bins(lists: npt.ArrayLike, tail_groups: npt.ArrayLike | None, capacity: int) -> list[PlannedBin]:
    """Bins of a bulk import of templates routed to ``lists`` (int [n], in import order).

    Without tail groups each list's templates fill bins in order, the last
    one partly. With them a list keeps its full bins and its remainder goes
    to its group, whose pooled templates fill the group's bins in order.
    Rows keep their import order within a bin.
    """
    ids = np.asarray(lists, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    out: list[PlannedBin] = []
    pooled: dict[int, list[IntArray]] = {}
    groups = None if tail_groups is None else np.asarray(tail_groups, dtype=np.int64)
    for rows in np.split(order, bounds) if len(order) else []:
        lst = int(ids[rows[0]])
        group = NO_GROUP if groups is None else int(groups[lst])
        full = len(rows) - len(rows) % capacity if group != NO_GROUP else len(rows)
        out.extend(PlannedBin(lst, False, rows[i : i + capacity]) for i in range(0, full, capacity))
        if full < len(rows):
            pooled.setdefault(group, []).append(rows[full:])
    for group, parts in sorted(pooled.items()):
        rows = np.sort(np.concatenate(parts))
        out.extend(PlannedBin(group, True, rows[i : i + capacity]) for i in range(0, len(rows), capacity))
    return out


def searched_bins(
    probed: IntArray, full_bins: IntArray, tail_groups: IntArray, group_bins: IntArray
) -> IntArray:
    """Bins a query of the lists ``probed`` (int [n, P]) searches, with shared tails: int64 [n].

    The probed lists' full bins plus each distinct group's bins once.
    """
    g = np.sort(tail_groups[probed], axis=1)
    first = np.ones_like(g, dtype=bool)
    first[:, 1:] = g[:, 1:] != g[:, :-1]
    counted = first & (g != NO_GROUP)
    tails = np.where(counted, group_bins[np.maximum(g, 0)], 0).sum(axis=1)
    return np.asarray(full_bins[probed].sum(axis=1) + tails, dtype=np.int64)


def enrollment_label_ids(lists: IntArray, tail_groups: IntArray | None) -> list[tuple[int, bool]]:
    """Where single enrollments of templates routed to ``lists`` go: (owner, tail) per template."""
    if tail_groups is None:
        return [(int(lst), False) for lst in lists]
    return [
        (int(lst), False) if tail_groups[lst] == NO_GROUP else (int(tail_groups[lst]), True)
        for lst in lists
    ]


__all__ = ["NO_GROUP", "PlannedBin", "enrollment_label_ids", "group_tails", "plan_bins", "searched_bins"]
