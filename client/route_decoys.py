"""Decoy lists for routed queries (what :meth:`Router.query_labels` adds).

Routing leaks which lists a query names; decoys blur that (module docstring
of :mod:`veilface.client.routing`: what they hide and what they do not).
Draws use the operating system's CSPRNG unless a generator is given (tests):
a server that could predict the decoys could tell them apart.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from veilface.errors import InvalidArgument

if TYPE_CHECKING:
    from veilface.client.routing import Router

__all__ = ["decoy_lists", "uniform_decoys"]


def uniform_decoys(
    router: Router, exclude: Iterable[int], count: int, rng: np.random.Generator | None = None
) -> list[int]:
    """``count`` other lists of ``router`` chosen uniformly at random.

    Parameters
    ----------
    exclude
        List ids never chosen (the real lists of the query).
    count
        Number of decoys, at most ``nlist - len(set(exclude))``.
    rng
        Random generator, for reproducible tests. The default draws from
        the operating system's CSPRNG (:mod:`secrets`), which is what
        production should use: a server that could predict the decoys
        could tell them apart.

    Returns
    -------
    list of int
        ``count`` distinct list ids, none excluded.

    Notes
    -----
    See :mod:`veilface.client.routing` for what decoys hide and what they do not.
    Send real and decoy labels in an order that does not tell them apart
    (:meth:`Router.query_labels` sorts them).
    """
    excluded = {router._check_id(i) for i in exclude}
    candidates = [i for i in range(router.nlist) if i not in excluded]
    if not isinstance(count, int) or not 0 <= count <= len(candidates):
        raise InvalidArgument(
            f"cannot pick {count!r} decoys: only {len(candidates)} lists are not excluded"
        )
    if rng is None:
        chosen = secrets.SystemRandom().sample(candidates, count)
    else:
        chosen = [int(i) for i in rng.choice(candidates, size=count, replace=False)]
    return chosen


def decoy_lists(
    router: Router,
    exclude: Iterable[int],
    count: int,
    *,
    group: int,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """``count`` decoy lists drawn as whole fake queries of ``group`` lists each.

    A real query names the ``nprobe`` lists nearest its probe. Uniform
    decoys differ from that twice over: the server sees each label's
    size, and a probe's nearest list is a large list more often; and over
    many queries real labels keep coming with their neighbours while
    uniform decoys come with anything. So each fake query here is a fake
    probe: the centroid of a list drawn in proportion to
    :attr:`Router.list_sizes` (uniformly when unknown) among the lists not
    taken, plus isotropic Gaussian noise of the templates' spread around
    their centroids (:attr:`Router.list_spread`, measured at training; none
    when unknown); its nearest ``group`` lists not taken join the
    decoys (fewer for the last fake query). Lists in ``exclude`` (the
    real ones) are never taken. Draws use the OS CSPRNG unless ``rng``
    is given (tests: a server that could predict the decoys could tell
    them apart).

    This matches a real query's distribution only as far as the
    training gallery and an isotropic spread describe the probes; the
    residual bias is measured in ``tests/client/test_search.py``.

    Returns
    -------
    list of int
        ``count`` distinct list ids, none in ``exclude``.
    """
    excluded = {router._check_id(i) for i in exclude}
    free = [i for i in range(router.nlist) if i not in excluded]
    if not isinstance(count, int) or not 0 <= count <= len(free):
        raise InvalidArgument(
            f"cannot pick {count!r} decoys: only {len(free)} lists are not excluded"
        )
    if not isinstance(group, int) or group < 1:
        raise InvalidArgument(f"a decoy group holds at least one list, got {group!r}")
    sizes = np.asarray(router.list_sizes or [1] * router.nlist, dtype=np.float64)
    spread = router.list_spread or 0.0
    sysrand = secrets.SystemRandom()
    chosen: list[int] = []
    while len(chosen) < count:
        taken = excluded | set(chosen)
        seeds = [i for i in range(router.nlist) if i not in taken]
        weights = sizes[seeds]
        if weights.sum() <= 0:
            weights = np.ones(len(seeds))
        if rng is None:
            seed = sysrand.choices(seeds, weights=weights.tolist())[0]
            noise = np.array([sysrand.gauss(0.0, 1.0) for _ in range(router.dim)])
        else:
            seed = int(rng.choice(seeds, p=weights / weights.sum()))
            noise = rng.standard_normal(router.dim)
        fake = router.centroids[seed] + spread * noise
        near = router.probe_lists(fake / np.linalg.norm(fake), router.nlist)
        members = [int(j) for j in near if int(j) not in taken]
        chosen.extend(members[: min(group, count - len(chosen))])
    return chosen
