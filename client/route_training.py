"""Training the routing of a key and resolving a query's search parameters (``VeilClient``'s half).

:func:`train_routing` is what ``VeilClient.train_routing`` (and a re-pack)
runs: with no ``nlist`` the SDK measures its choice on the tenant's own
templates (:func:`veilface.client.route_tuning.tune_routing`); with one it
keeps that many lists and still measures ``nprobe`` and ``k`` for them.
Either way the parameters go into the tenant state
(:attr:`TenantState.search <veilface.client.tenant_state.TenantState.search>`),
and :func:`search_options` gives them to ``identify`` unless the caller
passes its own.

**Too few templates.** faiss wants at least 39 training points per
centroid; below that the lists are noise and a routed query misses true
matches at random. And below a couple of full bins routing cannot search
less than strict does. In both cases the state says so
(``SearchDefaults.mode == "strict"`` with a ``reason``, logged as a
warning) and routed queries run strict, with ``Identification.mode`` and
``Identification.fallback`` saying so. ``allow_small=True`` keeps routing
on a small training set anyway (protocol tests and demos, where recall
does not matter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from veilface.client.route_tuning import TuneOptions, strict_defaults, tune_routing
from veilface.client.routing import MIN_POINTS_PER_CENTROID, Router
from veilface.client.search import SearchMode
from veilface.client.search_defaults import LEGACY_K, LEGACY_NPROBE, STRICT_K, SearchDefaults
from veilface.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from veilface.client.sdk import VeilClient
    from veilface.client.tenant_state import TenantState

log = logging.getLogger(__name__)


def train_routing(
    client: VeilClient,
    embeddings: npt.ArrayLike,
    *,
    nlist: int | None = None,
    target_recall: float = 0.995,
    seed: int = 0,
    force: bool = False,
    allow_small: bool = False,
    tuning: TuneOptions | None = None,
) -> SearchDefaults:
    """See :meth:`VeilClient.train_routing`."""
    state = client.state
    if not force:
        held = {k.key_id: k for k in client.describe().keys}.get(state.key_id)
        if held is not None and held.subjects > 0:
            raise FailedPrecondition(
                f"key {state.key_id!r} already holds {held.subjects} subjects enrolled under the "
                "current lists; retrain with repack(), which re-packs them"
            )
    if nlist is not None and (not isinstance(nlist, int) or isinstance(nlist, bool) or nlist < 1):
        raise InvalidArgument(f"nlist must be an integer >= 1 (or None: the SDK chooses), got {nlist!r}")
    xn = client.normalize(embeddings)
    x = xn @ client._mix.T
    # The center the key has, or the one calibration will fix from these templates.
    center = state.center if state.center is not None else xn.mean(axis=0)
    mu = client._mix @ np.asarray(center, dtype=np.float64)
    opts = tuning or TuneOptions(target_recall=target_recall)
    if tuning is not None and target_recall != opts.target_recall:
        opts = TuneOptions(**{**opts.__dict__, "target_recall": target_recall})
    version = (state.router.version + 1) if state.router else 1
    n = len(x)

    def train(lists: int) -> Router:
        return Router.train(
            x.astype(np.float32),
            nlist=lists,
            label_key=state.label_key,
            key_id=state.key_id,
            version=version,
            seed=seed,
        )

    m = client.layout.m
    if nlist is not None and n < MIN_POINTS_PER_CENTROID * nlist:
        if nlist > n:
            raise InvalidArgument(
                f"nlist must be between 1 and the number of training templates ({n}), got {nlist}"
            )
        state.router = train(nlist)
        if allow_small:
            state.search = SearchDefaults(nlist=nlist, presel_dims=m, gallery=n, auto=False)
        else:
            state.search = strict_defaults(
                f"routing was trained on {n} templates for {nlist} lists; faiss wants at least "
                f"{MIN_POINTS_PER_CENTROID} per list ({MIN_POINTS_PER_CENTROID * nlist}), so the "
                "lists are unreliable: train fewer lists, or train on more templates (repack)",
                n=n, m=m, target=opts.target_recall,
            )
            state.search = replace(state.search, nlist=nlist, auto=False)
        return state.search
    # Asked for these lists: keep them even where strict would be as cheap.
    result = tune_routing(
        x, mu, layout=client.layout, train=train, options=opts,
        nlists=None if nlist is None else [nlist], allow_strict=nlist is None,
    )
    state.router, state.search = result.router, result.defaults
    return result.defaults


def repack_lists(state: TenantState, nlist: int | None, rotating: bool) -> int | None:
    """Lists a re-pack retrains with: ``nlist``, the caller's earlier choice, or None (the SDK chooses).

    0: no routing (a rotation of a key that never routed).
    """
    if nlist is not None:
        return nlist
    if state.search is not None and state.search.auto:
        return None
    if state.router is not None:
        return state.router.nlist  # chosen by the caller (or before the SDK chose): kept
    return 0 if rotating and state.search is None else None


@dataclass(frozen=True)
class ResolvedSearch:
    """A query's mode and parameters once the state's defaults filled what the caller left out."""

    mode: SearchMode
    k: int
    nprobe: int
    fallback: str = ""  # why a routed query runs strict ("" when it does not)


def search_options(
    state: TenantState, mode: str | SearchMode, k: int | None, nprobe: int | None
) -> ResolvedSearch:
    """The mode and parameters of one query (explicit arguments win over the state's defaults)."""
    requested = SearchMode.parse(mode)
    d = state.search
    if requested is SearchMode.STRICT:
        return ResolvedSearch(requested, STRICT_K if k is None else k, LEGACY_NPROBE if nprobe is None else nprobe)
    reason = ""
    if d is not None and not d.routed:
        reason = d.reason
    elif d is None and state.router is not None and _undertrained(state.router):
        reason = (
            f"the router was trained on {sum(state.router.list_sizes or ())} templates for "
            f"{state.router.nlist} lists (faiss wants {MIN_POINTS_PER_CENTROID} per list)"
        )
    elif state.router is None:
        raise FailedPrecondition("routed mode needs trained routing (train_routing)")
    if reason:
        return ResolvedSearch(SearchMode.STRICT, STRICT_K if k is None else k, 0, reason)
    return ResolvedSearch(
        requested,
        (d.k if d is not None else LEGACY_K) if k is None else k,
        (d.nprobe if d is not None else LEGACY_NPROBE) if nprobe is None else nprobe,
    )


def _undertrained(router: Router) -> bool:
    return router.list_sizes is not None and sum(router.list_sizes) < MIN_POINTS_PER_CENTROID * router.nlist


__all__ = ["ResolvedSearch", "repack_lists", "search_options", "train_routing"]
