"""Choose nlist, nprobe and k from the tenant's own templates (plaintext, no network).

The tenant holds its templates in clear at enrollment, so it can replay a
routed query exactly in plaintext: the lists a probe names, the bins each
list fills (bulk import packs a list's templates into bins of
``capacity`` in order), each bin's best preselection score over its slots'
windows (:mod:`veilface.crypto.layout`: the window of virtual slot ``v``
starts at coordinate ``v % d_pad``) and the re-ranking plan
(:func:`veilface.client.search.plan_rerank`: per list, its ``ceil(k /
nprobe)`` best bins, or every searched bin past ``rerank_all_above``).
One-stage queries (``k = 0``) are counted, and then enrolled, with the
lists' last bins shared by neighbouring lists
(:mod:`veilface.client.tail_packing`): a query searches its lists' full
bins and each of their tail groups' bins once.
Re-ranking is exact, so a probe's target template is found iff it is
re-ranked.

**Pseudo-probes.** Each sampled template ``x`` gives one probe at cosine
``c`` from it, ``c`` drawn from the face model's genuine-pair cosine (dlib on
LFW: 0.952 +- 0.020, :mod:`veilface.bench.synthetic`; ``1 - c`` log-normal, so
that bad captures are as common as in real galleries: a normal draw put 1% of
probes below 0.905 where the synthetic pairs put 1% below 0.895, and at a
million templates that tail is where the misses are). A second capture varies
around the population, not around the origin: the probe keeps the gallery
mean ``mu`` (the part every face shares) and turns the template's own
deviation ``x - mu`` by the angle that gives cosine ``c``, in a random
direction orthogonal to it and to ``mu``. Checked on real dlib embeddings of
LFW (``veilface bench pseudo-probes``: 4,287 templates, the second photo of
1,264 people as the probe, the template's real cosine to it as ``c``): the probes' mean cosine to other
people is 0.833 (real second photos 0.833); the share of probes whose list
is among the nearest 4 / 8 / 12 of 32 lists is 0.949 / 0.987 / 0.995 (real
0.918 / 0.987 / 0.995). The earlier draw, ``c x + sqrt(1 - c^2) u`` around the
origin, shrank the shared part with the rest: 0.794 to other people, and
0.988 / 0.998 / 1.000: the tuner probed 8 lists where real probes need 12.
(Noise shaped like the gallery's covariance, tried as well, is far too
pessimistic.) A second capture of each subject would be better still,
but enrollment has one. The templates are split in two: the choice is made
on probes of one half and the figures stored with it
(:class:`~veilface.client.search_defaults.SearchDefaults`) are measured on
probes of the other, so they are not the figures the choice was fitted to.

**What must be found.** A routed query should answer as the exhaustive
search would, so each pseudo-probe's target is its exhaustive top-1 over the
whole gallery (by cosine, the score the search returns), not the template it
was drawn from. The two differ for bad captures whose nearest template is
another person's (12% of real LFW second photos), and that template may sit
in a list the probe's nearest lists miss. The tenant holds every template in
clear, so this costs one plaintext exhaustive search per pseudo-probe when
routing is trained (FAISS; seconds at a million).

**Cost** of a query, per bin and stage, from the roofline measured in
docs/architecture.md: 48 µs a product, 228 µs a key switch, 1.3 ms per
response ciphertext (mask, re-randomization, serialization, the tenant's
decryption). The cheapest configuration whose tuning recall reaches the
target wins; strict (every bin, exact) wins unless routing saves at least a
quarter of the work (:data:`ROUTING_PAYS_BELOW`). These are SEAL's costs; a
server with the compiled product kernel (crypto/packed.py) pays about a
quarter of that per product. The default one-stage query (``k = 0``) scores
whole bins, so its cost is the number of bins searched times one constant
and the choice does not depend on these figures (nor does the comparison
with strict, also whole bins); only the two-stage window advice does, and
it was not re-tuned for the cheaper products.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from veilface.client.routing import MIN_POINTS_PER_CENTROID, Router
from veilface.client.search_defaults import SearchDefaults
from veilface.client.tail_packing import NO_GROUP, group_tails, searched_bins
from veilface.crypto.layout import DiagonalLayout
from veilface.errors import InvalidArgument

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

PRODUCT_US = 48.0
KEY_SWITCH_US = 228.0
RESPONSE_US = 1300.0
#: Most lists a tuned query probes.
NPROBE_MAX = 64
RERANK_ALL_ABOVE = 0.75
#: nlist candidates, as multiples of gallery / capacity (one full bin per list).
NLIST_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
QUOTA_MAX = 8
#: Route only when it costs at most this share of strict: routing leaks which
#: lists a query touches, and a few percent of work does not buy that.
ROUTING_PAYS_BELOW = 0.75
#: Advise another preselection window only when it would cost at most this share.
ADVISE_BELOW = 0.9


@dataclass(frozen=True)
class TuneOptions:
    """How :func:`tune_routing` measures.

    Attributes
    ----------
    target_recall
        Share of probes whose target (the exhaustive top-1) must be re-ranked.
    genuine_mean, genuine_std
        Cosine of a genuine pair for the face model (default dlib's).
    tune_probes, heldout_probes
        Pseudo-probes the choice is made on, and those it is reported on
        (each at most half the gallery).
    seed
        Seed of the sample and the noise (the k-means seed is the caller's).
    """

    target_recall: float = 0.995
    genuine_mean: float = 0.952
    genuine_std: float = 0.020
    tune_probes: int = 4000
    heldout_probes: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.target_recall <= 1.0:
            raise InvalidArgument(f"target_recall must be in (0, 1], got {self.target_recall!r}")
        if not 0.0 < self.genuine_mean < 1.0 or self.genuine_std < 0.0:
            raise InvalidArgument("the genuine cosine must have a mean in (0, 1) and a std >= 0")
        if self.tune_probes < 1 or self.heldout_probes < 1:
            raise InvalidArgument("tune_probes and heldout_probes must be >= 1")


@dataclass(frozen=True)
class Tuning:
    """What :func:`tune_routing` chose: the router to keep (None: strict) and the defaults."""

    router: Router | None
    defaults: SearchDefaults


@dataclass(frozen=True)
class BinCosts:
    """Modelled µs of one bin's preselection and re-ranking stages for a window of ``m``,
    and of the one-stage whole-template score of an exhaustive query (``k = 0``)."""

    presel_us: float
    rest_us: float
    full_us: float = 0.0

    @classmethod
    def of(cls, layout: DiagonalLayout, m: int) -> BinCosts:
        g1, d_pad = layout.g1, layout.d_pad
        pg = m // g1
        presel_ks = 2 * (pg - 1) + 1  # giant 0 has no key switch; the sum is relinearized once
        rest_ks = 2 * (layout.g2 - pg)
        return cls(
            m * PRODUCT_US + presel_ks * KEY_SWITCH_US + RESPONSE_US,
            (d_pad - m) * PRODUCT_US + rest_ks * KEY_SWITCH_US + RESPONSE_US,
            d_pad * PRODUCT_US + (2 * (layout.g2 - 1) + 1) * KEY_SWITCH_US + RESPONSE_US,
        )


@dataclass(frozen=True)
class Probes:
    """Pseudo-probes: routing vectors [n, d], centered padded vectors [n, d_pad], true rows [n]."""

    route: npt.NDArray[np.float32]
    centered: FloatArray
    source: IntArray

    @classmethod
    def draw(
        cls,
        xr: FloatArray,
        mu: FloatArray,
        rows: IntArray,
        opts: TuneOptions,
        rng: np.random.Generator,
        d_pad: int,
        *,
        cosine: FloatArray | None = None,
    ) -> Probes:
        """One pseudo-probe per row of ``rows``; its ``source`` is the row it was drawn from
        (:meth:`targeting` replaces it with the exhaustive top-1). ``cosine`` [n, 1]
        fixes each probe's cosine to its template (default: drawn from ``opts``)."""
        x = xr[rows]
        if cosine is None:
            # 1 - c log-normal with the model's mean and std: a heavier tail of bad
            # captures than a normal draw (the misses at 0.995 are all in that tail)
            gap = 1.0 - opts.genuine_mean
            sigma = math.sqrt(math.log1p((opts.genuine_std / gap) ** 2))
            z = rng.standard_normal((len(rows), 1))
            c = np.clip(1.0 - gap * np.exp(sigma * z - sigma**2 / 2), 0.3, 0.999)
        else:
            c = np.clip(np.asarray(cosine, dtype=np.float64).reshape(len(rows), 1), -1.0, 1.0)
        # A second capture varies around the population, not around the origin: it keeps
        # the part every face shares (the gallery mean ``mu``) and moves the template's
        # own deviation ``x - mu`` (cosine ``rho`` to it, the rest orthogonal to it and to
        # mu), so that its cosine to the template is ``c``.
        xc = x - mu
        r2 = np.maximum(np.sum(xc * xc, axis=1, keepdims=True), 1e-12)
        rho = np.clip(1.0 - (1.0 - c) / r2, -1.0, 1.0)
        e1 = xc / np.sqrt(r2)
        e2 = np.broadcast_to(mu, x.shape) - np.sum(mu * e1, axis=1, keepdims=True) * e1
        e2 /= np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
        u = rng.standard_normal(x.shape)
        u -= np.sum(u * e1, axis=1, keepdims=True) * e1
        u -= np.sum(u * e2, axis=1, keepdims=True) * e2
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        p = mu + rho * xc + np.sqrt(1.0 - rho**2) * np.sqrt(r2) * u
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        return cls(p.astype(np.float32), _pad(p - mu, d_pad), rows)

    def targeting(self, top1: IntArray) -> Probes:
        """The same probes, each to be found at its exhaustive top-1 row ``top1``."""
        return replace(self, source=np.asarray(top1, dtype=np.int64))


def exhaustive_top1(x: npt.ArrayLike, probes: npt.ArrayLike) -> IntArray:
    """Each probe's best template by cosine, the score a search returns (the client adds
    ``mu . p`` back to the centered score, so the ranking is the plain cosine's).

    ``x`` [n, d] unit templates, ``probes`` [m, d] unit probes (both mixed: the
    secret rotation keeps cosines); FAISS's blocked exhaustive search, float32,
    as the plaintext baseline of ``bench identify``.
    """
    import faiss

    xs = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(xs.shape[1])
    index.add(xs)
    _, top = index.search(np.ascontiguousarray(probes, dtype=np.float32), 1)
    return top[:, 0].astype(np.int64)


@dataclass(frozen=True)
class ListReplay:
    """One router's lists replayed for a set of probes (what every (nprobe, k) needs).

    ``probed`` int64 [n, P]: the probes' P nearest lists; ``nbins`` int64
    [nlist]: bins per list; ``true_rank`` int64 [n]: where the true
    template's list is among ``probed`` (P: not there); ``bin_rank`` int64
    [n]: how many bins of that list beat the true template's bin on
    preselection (its best slot score).
    """

    probed: IntArray
    nbins: IntArray
    true_rank: IntArray
    bin_rank: IntArray
    tail_groups: IntArray | None = None
    group_bins: IntArray | None = None

    def evaluate(self, nprobe: int, quota: int, costs: BinCosts) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Per probe: hit (0/1), routing hit, bins searched; and cost (µs).

        ``quota = 0``: an exhaustive query over the probed lists (``k = 0``),
        scored whole in one stage: every probed template is a candidate.
        With :attr:`tail_groups` (shared tail bins) the lists' tails are
        counted once per group; the quotas of a re-ranking (``quota > 0``)
        are per list's own bins, so they are always counted without.
        """
        nb = self.nbins[self.probed[:, :nprobe]]
        searched = nb.sum(axis=1)
        routed = self.true_rank < nprobe
        if quota <= 0:
            if self.tail_groups is not None and self.group_bins is not None:
                searched = searched_bins(
                    self.probed[:, :nprobe], self.nbins - self.has_tail, self.tail_groups, self.group_bins
                )
            return (
                routed.astype(np.float64), routed.astype(np.float64),
                searched.astype(np.float64), (searched * costs.full_us).astype(np.float64),
            )
        shaped = np.minimum(nb, quota).sum(axis=1)
        exhaustive = shaped >= RERANK_ALL_ABOVE * searched
        reranked = np.where(exhaustive, searched, shaped)
        hit = routed & (exhaustive | (self.bin_rank < quota))
        cost = searched * costs.presel_us + reranked * costs.rest_us
        return hit.astype(np.float64), routed.astype(np.float64), searched.astype(np.float64), cost.astype(np.float64)


    @property
    def has_tail(self) -> IntArray:
        """1 for a list whose last bin is a tail (in its group when grouped), else 0."""
        if self.tail_groups is None:
            return np.zeros_like(self.nbins)
        out: IntArray = (self.tail_groups != NO_GROUP).astype(np.int64)
        return out

    def packed(self, capacity: int, sizes: IntArray, centroids: npt.ArrayLike) -> ListReplay:
        """The same replay with the lists' tails in shared bins (:func:`group_tails`)."""
        groups = group_tails(sizes, capacity, centroids)
        tails = sizes % capacity
        totals = np.bincount(groups[groups != NO_GROUP], weights=tails[groups != NO_GROUP],
                             minlength=int(groups.max()) + 1)
        return replace(self, tail_groups=groups, group_bins=(-(-totals.astype(np.int64) // capacity)))


def _pad(x: FloatArray, d_pad: int) -> FloatArray:
    if x.shape[1] == d_pad:
        return np.asarray(x, dtype=np.float64)
    out = np.zeros((x.shape[0], d_pad))
    out[:, : x.shape[1]] = x
    return out


def _window_masks(d_pad: int, m: int) -> npt.NDArray[np.bool_]:
    """[d_pad, d_pad]: row ``i`` marks the coordinates of the window starting at ``i``."""
    c = np.arange(d_pad)
    return ((c[None, :] - c[:, None]) % d_pad) < m


def replay(
    router: Router,
    assigned: IntArray,
    xc: FloatArray,
    probes: Probes,
    *,
    capacity: int,
    windows: Sequence[int],
    nprobe_max: int,
) -> dict[int, ListReplay]:
    """Replay ``router``'s lists for ``probes``, once per preselection window in ``windows``.

    ``assigned`` int64 [n]: each template's list; ``xc`` float64 [n, d_pad]:
    templates as stored (mixed, centered, padded), in enrollment order.
    """
    nlist, d_pad = router.nlist, xc.shape[1]
    sizes = np.bincount(assigned, minlength=nlist)
    nbins = -(-sizes // capacity)
    # Position of each template in its list (enrollment order), hence its bin and slot.
    order = np.argsort(assigned, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos = np.empty(len(assigned), dtype=np.int64)
    pos[order] = np.arange(len(assigned)) - starts[assigned[order]]
    bin_of, slot_of = pos // capacity, pos % capacity
    p = min(nprobe_max, nlist)
    probed = router.probe_lists(probes.route, p).reshape(len(probes.source), p)
    true_list = assigned[probes.source]
    hit = probed == true_list[:, None]
    true_rank = np.where(hit.any(axis=1), hit.argmax(axis=1), p).astype(np.int64)
    out: dict[int, ListReplay] = {}
    for m in windows:
        masks = _window_masks(d_pad, m)
        bin_rank = np.zeros(len(probes.source), dtype=np.int64)
        for lst in np.unique(true_list[true_rank < p]):
            who = np.flatnonzero((true_list == lst) & (true_rank < p))
            if nbins[lst] <= 1:
                continue  # one bin: it is the true template's
            members = order[starts[lst] : starts[lst] + sizes[lst]]
            xw = xc[members] * masks[slot_of[members] % d_pad]
            scores = xw @ probes.centered[who].T  # [members, probes]
            # members are in enrollment order, so each bin is a contiguous block
            best = np.maximum.reduceat(scores, np.arange(0, len(members), capacity), axis=0)
            true_bin = bin_of[probes.source[who]]
            mine = best[true_bin, np.arange(len(who))]
            bin_rank[who] = (best > mine[None, :]).sum(axis=0)
        out[m] = ListReplay(probed, nbins.astype(np.int64), true_rank, bin_rank).packed(
            capacity, sizes, router.centroids
        )
    return out


@dataclass(frozen=True)
class _Candidate:
    nlist: int
    window: int
    nprobe: int
    quota: int
    recall: float
    cost_us: float


def _sweep(nlist: int, window: int, rep: ListReplay, costs: BinCosts) -> list[_Candidate]:
    """Every (nprobe, quota) of one router and window, with its recall and mean cost
    (quota 0: the probed lists scored whole in one stage, ``k = 0``)."""
    out = []
    quota_max = int(min(QUOTA_MAX, max(1, rep.nbins.max())))
    for nprobe in range(1, rep.probed.shape[1] + 1):
        for quota in range(quota_max + 1):
            hit, _, _, cost = rep.evaluate(nprobe, quota, costs)
            out.append(_Candidate(nlist, window, nprobe, quota, float(hit.mean()), float(cost.mean())))
    return out


def _cheapest(cands: Sequence[_Candidate], target: float) -> _Candidate:
    ok = [c for c in cands if c.recall >= target]
    if ok:
        return min(ok, key=lambda c: (c.cost_us, c.nprobe, c.nlist))
    best = max(c.recall for c in cands)
    return min((c for c in cands if c.recall >= best), key=lambda c: (c.cost_us, c.nprobe))


def nlist_candidates(n: int, capacity: int) -> list[int]:
    """Lists to try: about one full bin each (and a little fewer or more), at least 39 points each."""
    most = n // MIN_POINTS_PER_CENTROID
    base = n / capacity
    out = sorted({max(2, round(base * f)) for f in NLIST_FACTORS})
    return [c for c in out if c <= most] or ([min(2, most)] if most >= 2 else [])


def strict_defaults(reason: str, *, n: int, m: int, target: float) -> SearchDefaults:
    """Defaults saying that routed queries run strict, and why (logged as a warning)."""
    log.warning("routed queries of this key will run strict: %s", reason)
    return SearchDefaults(mode="strict", reason=reason, presel_dims=m, target_recall=target, gallery=n)


def tune_routing(
    xr: npt.ArrayLike,
    mu: npt.ArrayLike,
    *,
    layout: DiagonalLayout,
    train: Callable[[int], Router],
    options: TuneOptions | None = None,
    nlists: Sequence[int] | None = None,
    allow_strict: bool = True,
) -> Tuning:
    """Choose the router and the routed search parameters (module docstring).

    Parameters
    ----------
    xr
        float [n, d]: the templates as routed (mixed, unit rows), in
        enrollment order.
    mu
        float [d]: the key's centering vector, mixed.
    layout
        The key's bin layout (capacity, windows).
    train
        Trains a router of the given number of lists on ``xr``.
    nlists
        Lists to try (default :func:`nlist_candidates`).
    allow_strict
        Choose strict (no router) when routing is no cheaper (False: the
        caller asked for routing; the cheapest routed choice is returned).
    """
    opts = options or TuneOptions()
    x = np.asarray(xr, dtype=np.float64)
    n = len(x)
    cap, d_pad, m = layout.capacity, layout.d_pad, layout.m
    centers = nlists if nlists is not None else nlist_candidates(n, cap)
    if not centers or n < MIN_POINTS_PER_CENTROID * max(2, min(centers)):
        return Tuning(None, strict_defaults(
            f"{n} templates cannot train two lists (faiss wants {MIN_POINTS_PER_CENTROID} per list)",
            n=n, m=m, target=opts.target_recall))
    # strict's default is exhaustive, in one stage (k = 0)
    strict_us = math.ceil(n / cap) * BinCosts.of(layout, m).full_us
    rng = np.random.default_rng(opts.seed)
    perm = rng.permutation(n)
    half = n // 2
    tune_rows = perm[: min(half, opts.tune_probes)]
    held_rows = perm[half : half + min(n - half, opts.heldout_probes)]
    mu_ = np.asarray(mu, dtype=np.float64)
    tune_p = Probes.draw(x, mu_, tune_rows, opts, rng, d_pad)
    held_p = Probes.draw(x, mu_, held_rows, opts, rng, d_pad)
    xc = _pad(x - mu_, d_pad)
    top1 = exhaustive_top1(x, np.concatenate([tune_p.route, held_p.route]))
    tune_p, held_p = tune_p.targeting(top1[: len(tune_rows)]), held_p.targeting(top1[len(tune_rows) :])
    log.info(
        "pseudo-probes whose exhaustive top-1 is another template: %.2f%%",
        100.0 * float(np.mean(np.concatenate([tune_p.source != tune_rows, held_p.source != held_rows]))),
    )
    windows = list(range(layout.g1, d_pad, layout.g1)) or [m]
    if m not in windows:
        windows.append(m)
    routers: dict[int, tuple[Router, IntArray]] = {}
    per_window: dict[int, list[_Candidate]] = {w: [] for w in windows}
    for nl in centers:
        router = train(nl)
        assigned = router.assign(x.astype(np.float32))
        routers[nl] = (router, assigned)
        reps = replay(router, assigned, xc, tune_p, capacity=cap, windows=windows, nprobe_max=NPROBE_MAX)
        for w in windows:
            per_window[w] += _sweep(nl, w, reps[w], BinCosts.of(layout, w))
    best = _cheapest(per_window[m], opts.target_recall)
    # A window is a key property (a new key): advise another only for a real saving.
    own = best.cost_us
    advised = min(windows, key=lambda w: _cheapest(per_window[w], opts.target_recall).cost_us)
    if _cheapest(per_window[advised], opts.target_recall).cost_us > ADVISE_BELOW * own:
        advised = m
    log.info(
        "routing tuned on %d pseudo-probes: nlist=%d nprobe=%d quota=%d recall=%.4f cost=%.1f ms "
        "(strict %.1f ms)", len(tune_rows), best.nlist, best.nprobe, best.quota, best.recall,
        best.cost_us / 1e3, strict_us / 1e3,
    )
    if allow_strict and best.cost_us > ROUTING_PAYS_BELOW * strict_us:
        return Tuning(None, strict_defaults(
            f"a routed query at recall {opts.target_recall} would cost {best.cost_us / 1e3:.1f} ms of "
            f"arithmetic against {strict_us / 1e3:.1f} ms for strict ({n} templates, "
            f"{math.ceil(n / cap)} bins): routing does not pay at this size",
            n=n, m=m, target=opts.target_recall))
    router, assigned = routers[best.nlist]
    if best.quota <= 0:  # one-stage queries: the lists' tails share bins (tail_packing)
        sizes = np.bincount(assigned, minlength=router.nlist)
        router = replace(router, tail_groups=tuple(int(g) for g in group_tails(sizes, cap, router.centroids)))
    rep = replay(router, assigned, xc, held_p, capacity=cap, windows=[m], nprobe_max=best.nprobe)[m]
    hit, routed, searched, cost = rep.evaluate(best.nprobe, best.quota, BinCosts.of(layout, m))
    nb = rep.nbins[rep.probed[:, : best.nprobe]]
    shaped = np.minimum(nb, best.quota).sum(axis=1)
    reranked = (
        searched if best.quota <= 0
        else np.where(shaped >= RERANK_ALL_ABOVE * searched, searched, shaped)
    )
    defaults = SearchDefaults(
        mode="routed",
        nlist=best.nlist,
        nprobe=best.nprobe,
        k=best.nprobe * best.quota,
        presel_dims=m,
        advised_presel_dims=advised,
        target_recall=opts.target_recall,
        recall=float(hit.mean()),
        routing_recall=float(routed.mean()),
        tuning_recall=best.recall,
        probes=len(held_rows),
        bins_searched=float(searched.mean()),
        bins_reranked=float(reranked.mean()),
        cost_ms=float(cost.mean()) / 1e3,
        gallery=n,
        auto=allow_strict,
        tail_groups=0 if router.tail_groups is None else max(router.tail_groups) + 1,
    )
    if defaults.recall < opts.target_recall:
        log.info(
            "held-out recall %.4f is below the target %.4f (tuning recall %.4f)",
            defaults.recall, opts.target_recall, best.recall,
        )
    return Tuning(router, defaults)


__all__ = [
    "BinCosts", "ListReplay", "Probes", "TuneOptions", "Tuning", "exhaustive_top1", "nlist_candidates",
    "replay", "tune_routing",
]
