"""Evaluation metrics for federated VI-ReID and incremental PAD.

Plain numpy, no torch: the functions take score or distance arrays and
return floats in ``[0, 1]`` (fractions, not percentages).

Re-identification (:func:`evaluate_retrieval`)
    CMC Rank-k, mean average precision (mAP) and mean inverse negative
    penalty (mINP, Ye et al. 2021, "Deep Learning for Person
    Re-identification: A Survey and Outlook", TPAMI).

Presentation attack detection
    Score convention: a higher score means *more likely bona fide (live)*;
    labels are ``1`` for bona fide and ``0`` for an attack; a presentation is
    accepted as bona fide when ``score >= threshold``. APCER and BPCER follow
    ISO/IEC 30107-3: APCER is computed per presentation-attack-instrument
    (PAI) species and the reported APCER is the worst species.

Continual learning
    :func:`average_forgetting` on a task-by-task performance matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

__all__ = [
    "PADErrorRates",
    "RetrievalMetrics",
    "acer",
    "auc",
    "average_forgetting",
    "eer_threshold",
    "evaluate_retrieval",
    "hter",
    "pad_error_rates",
]

ArrayLike = npt.ArrayLike


# --------------------------------------------------------------------------
# Re-identification
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalMetrics:
    """Retrieval results averaged over the valid queries.

    Attributes
    ----------
    rank1, rank5, rank10 : float
        CMC at ranks 1, 5 and 10, in ``[0, 1]``.
    map : float
        Mean average precision, in ``[0, 1]``.
    minp : float
        Mean inverse negative penalty, in ``[0, 1]``.
    cmc : numpy.ndarray
        ``(max_rank,)`` float64, the full CMC curve.
    num_valid_queries : int
        Queries with at least one true match left in the gallery after
        exclusion; the others are skipped (and counted in ``num_queries``).
    num_queries : int
        All queries given.
    """

    rank1: float
    rank5: float
    rank10: float
    map: float
    minp: float
    cmc: npt.NDArray[np.float64] = field(repr=False)
    num_valid_queries: int
    num_queries: int

    def as_dict(self) -> dict[str, float]:
        """The scalar metrics as a JSON-ready dict (``rank1``, ``rank5``, ``rank10``, ``map``, ``minp``)."""
        return {
            "rank1": self.rank1,
            "rank5": self.rank5,
            "rank10": self.rank10,
            "map": self.map,
            "minp": self.minp,
        }


def _as_1d_int(name: str, values: ArrayLike, length: int) -> npt.NDArray[np.int64]:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise InvalidArgument(f"{name} must have shape ({length},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def evaluate_retrieval(
    distmat: ArrayLike,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery_camids: ArrayLike,
    *,
    protocol: Literal["standard", "sysu"] = "standard",
    max_rank: int = 20,
) -> RetrievalMetrics:
    """CMC Rank-1/5/10, mAP and mINP from a query-by-gallery distance matrix.

    For each query the gallery is ranked by ascending distance (stable sort,
    so ties keep gallery order). Gallery samples are then excluded:

    - ``protocol="standard"`` (Market-1501 / RegDB / LLCM practice): the
      samples with the same person id *and* the same camera as the query.
    - ``protocol="sysu"`` (the SYSU-MM01 evaluation code used by AGW, L2RW
      and most VI-ReID work): the standard exclusion, plus every gallery
      sample from camera 2 when the query comes from camera 3 (cameras 2 and
      3 film the same indoor room).

    A query with no true match left is skipped. CMC at rank k is the fraction
    of valid queries whose first true match is within the top k; AP is the
    mean of precision@i over the positions i of the true matches; INP is
    ``num_matches / rank_of_the_last_match`` (1-based).

    Parameters
    ----------
    distmat : array_like
        ``(num_query, num_gallery)`` float distances, smaller = more similar.
        Must be finite.
    query_pids, gallery_pids : array_like
        ``(num_query,)`` and ``(num_gallery,)`` integer person ids.
    query_camids, gallery_camids : array_like
        ``(num_query,)`` and ``(num_gallery,)`` integer camera ids.
    protocol : {"standard", "sysu"}, keyword-only
        Which gallery samples to exclude, see above.
    max_rank : int, keyword-only
        Length of the returned CMC curve; Rank-k beyond the gallery size is
        the last CMC value.

    Returns
    -------
    RetrievalMetrics

    Raises
    ------
    InvalidArgument
        On shape or dtype mismatches, non-finite distances, an unknown
        protocol, or when no query has a true match in the gallery.
    """
    dist = np.asarray(distmat, dtype=np.float64)
    if dist.ndim != 2:
        raise InvalidArgument(
            f"distmat must be 2-D (num_query, num_gallery), got shape {dist.shape}"
        )
    num_q, num_g = dist.shape
    if num_q == 0 or num_g == 0:
        raise InvalidArgument(f"distmat must be non-empty, got shape {dist.shape}")
    if not np.all(np.isfinite(dist)):
        raise InvalidArgument("distmat contains NaN or infinite distances")
    if protocol not in ("standard", "sysu"):
        raise InvalidArgument(f"protocol must be 'standard' or 'sysu', got {protocol!r}")
    if max_rank < 1:
        raise InvalidArgument(f"max_rank must be >= 1, got {max_rank}")
    q_pids = _as_1d_int("query_pids", query_pids, num_q)
    g_pids = _as_1d_int("gallery_pids", gallery_pids, num_g)
    q_cams = _as_1d_int("query_camids", query_camids, num_q)
    g_cams = _as_1d_int("gallery_camids", gallery_camids, num_g)

    order = np.argsort(dist, axis=1, kind="stable")
    cmc_len = max(max_rank, 10)
    all_cmc: list[npt.NDArray[np.float64]] = []
    all_ap: list[float] = []
    all_inp: list[float] = []
    for qi in range(num_q):
        ranked = order[qi]
        remove = (g_pids[ranked] == q_pids[qi]) & (g_cams[ranked] == q_cams[qi])
        if protocol == "sysu" and q_cams[qi] == 3:
            remove |= g_cams[ranked] == 2
        matches = (g_pids[ranked] == q_pids[qi])[~remove]
        if not matches.any():
            continue
        hits = np.cumsum(matches)
        cmc = np.ones(cmc_len, dtype=np.float64)
        first = int(np.argmax(matches))
        cmc[:first] = 0.0
        all_cmc.append(cmc)
        positions = np.flatnonzero(matches)
        num_rel = positions.size
        all_ap.append(float(np.mean(hits[positions] / (positions + 1.0))))
        all_inp.append(num_rel / (positions[-1] + 1.0))

    if not all_cmc:
        raise InvalidArgument(
            "no query has a true match in the gallery: check the query/gallery split"
        )
    skipped = num_q - len(all_cmc)
    if skipped:
        logger.info(
            "retrieval: %d of %d queries have no match in the gallery and are skipped",
            skipped,
            num_q,
        )
    # each per-query curve is 1 from its first match on, so Rank-k beyond the
    # gallery size is already saturated
    curve = np.mean(np.stack(all_cmc), axis=0)
    return RetrievalMetrics(
        rank1=float(curve[0]),
        rank5=float(curve[4]),
        rank10=float(curve[9]),
        map=float(np.mean(all_ap)),
        minp=float(np.mean(all_inp)),
        cmc=curve[:max_rank].copy(),
        num_valid_queries=len(all_cmc),
        num_queries=num_q,
    )


# --------------------------------------------------------------------------
# Presentation attack detection
# --------------------------------------------------------------------------


def _scores_labels(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels)
    if s.ndim != 1 or lab.shape != s.shape:
        raise InvalidArgument(
            f"scores and labels must be 1-D of equal length, got {s.shape} and {lab.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise InvalidArgument("scores contain NaN or infinite values")
    if lab.size and not np.all((lab == 0) | (lab == 1)):
        raise InvalidArgument("labels must be 1 (bona fide) or 0 (attack)")
    live = lab.astype(bool)
    if not live.any() or live.all():
        raise InvalidArgument(
            "scores must include both bona fide (label 1) and attack (label 0) presentations"
        )
    return s, live


def _far_frr(
    s: npt.NDArray[np.float64], live: npt.NDArray[np.bool_], threshold: float
) -> tuple[float, float]:
    accepted = s >= threshold
    far = float(np.mean(accepted[~live]))  # attacks accepted as bona fide
    frr = float(np.mean(~accepted[live]))  # bona fide rejected
    return far, frr


def hter(scores: ArrayLike, labels: ArrayLike, threshold: float) -> float:
    """Half total error rate at a fixed threshold.

    ``HTER = (FAR + FRR) / 2`` where FAR is the fraction of attacks with
    ``score >= threshold`` and FRR the fraction of bona fide presentations
    with ``score < threshold``. All attacks are pooled (no per-species worst
    case; see :func:`pad_error_rates` for that). The threshold is normally
    fixed on another set, e.g. with :func:`eer_threshold` on development data.

    Parameters
    ----------
    scores : array_like
        ``(n,)`` float, higher = more likely bona fide.
    labels : array_like
        ``(n,)`` int or bool, 1 = bona fide, 0 = attack; both must occur.
    threshold : float
        Accept as bona fide when ``score >= threshold``.

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    s, live = _scores_labels(scores, labels)
    far, frr = _far_frr(s, live, float(threshold))
    return (far + frr) / 2.0


def eer_threshold(scores: ArrayLike, labels: ArrayLike) -> float:
    """The threshold at the equal error rate (FAR = FRR) of these scores.

    Candidates are every distinct score and ``+inf`` (reject all); the one
    minimising ``|FAR - FRR|`` wins, ties going to the smaller
    ``FAR + FRR``, then to the smaller threshold.

    Parameters
    ----------
    scores : array_like
        ``(n,)`` float, higher = more likely bona fide.
    labels : array_like
        ``(n,)``, 1 = bona fide, 0 = attack; both must occur.

    Returns
    -------
    float
        A threshold for ``score >= threshold`` acceptance (may be ``inf``).
    """
    s, live = _scores_labels(scores, labels)
    candidates = np.append(np.unique(s), np.inf)
    best: tuple[float, float, float] | None = None
    for thr in candidates:
        far, frr = _far_frr(s, live, float(thr))
        key = (abs(far - frr), far + frr, float(thr))
        if best is None or key < best:
            best = key
    assert best is not None  # candidates is never empty
    return best[2]


@dataclass(frozen=True)
class PADErrorRates:
    """ISO/IEC 30107-3 error rates at one threshold.

    Attributes
    ----------
    apcer : float
        Worst APCER over the attack species (``max`` of ``apcer_per_species``).
    bpcer : float
        Fraction of bona fide presentations classified as attacks.
    apcer_per_species : dict[str, float]
        APCER of each attack species (PAI species), e.g. ``{"print": .., "replay": ..}``.
    """

    apcer: float
    bpcer: float
    apcer_per_species: dict[str, float]

    @property
    def acer(self) -> float:
        """``(apcer + bpcer) / 2``."""
        return acer(self.apcer, self.bpcer)


def pad_error_rates(
    scores: ArrayLike,
    labels: ArrayLike,
    threshold: float,
    *,
    attack_species: Sequence[str] | None = None,
) -> PADErrorRates:
    """APCER (worst attack species) and BPCER at a threshold, per ISO/IEC 30107-3.

    Parameters
    ----------
    scores : array_like
        ``(n,)`` float, higher = more likely bona fide.
    labels : array_like
        ``(n,)``, 1 = bona fide, 0 = attack; both must occur.
    threshold : float
        Accept as bona fide when ``score >= threshold``.
    attack_species : sequence of str, optional, keyword-only
        ``(n,)`` species name of each sample (e.g. ``"print"``, ``"replay"``);
        entries for bona fide samples are ignored. Without it all attacks
        form one species ``"attack"``.

    Returns
    -------
    PADErrorRates
    """
    s, live = _scores_labels(scores, labels)
    accepted = s >= float(threshold)
    bpcer = float(np.mean(~accepted[live]))
    if attack_species is None:
        species = np.full(s.shape, "attack", dtype=object)
    else:
        species = np.asarray(list(attack_species), dtype=object)
        if species.shape != s.shape:
            raise InvalidArgument(f"attack_species must have shape {s.shape}, got {species.shape}")
    per: dict[str, float] = {}
    for name in sorted({str(x) for x in species[~live]}):
        mask = (~live) & (species == name)
        per[name] = float(np.mean(accepted[mask]))
    return PADErrorRates(apcer=max(per.values()), bpcer=bpcer, apcer_per_species=per)


def acer(apcer: float, bpcer: float) -> float:
    """Average classification error rate ``(APCER + BPCER) / 2``.

    Parameters
    ----------
    apcer : float
        Worst-species APCER in ``[0, 1]`` (see :func:`pad_error_rates`).
    bpcer : float
        BPCER in ``[0, 1]``.
    """
    for name, value in (("apcer", apcer), ("bpcer", bpcer)):
        if not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"{name} must be in [0, 1], got {value}")
    return (apcer + bpcer) / 2.0


def auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve, by ranks (Mann-Whitney U), ties counted half.

    Parameters
    ----------
    scores : array_like
        ``(n,)`` float, higher = more likely bona fide.
    labels : array_like
        ``(n,)``, 1 = bona fide, 0 = attack; both must occur.

    Returns
    -------
    float
        Probability that a random bona fide sample scores above a random
        attack (``1.0`` = perfect separation, ``0.5`` = chance).
    """
    s, live = _scores_labels(scores, labels)
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average 1-based rank within each group of tied scores
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = int(live.sum())
    n_neg = s.size - n_pos
    u = ranks[live].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------
# Continual learning
# --------------------------------------------------------------------------


def average_forgetting(
    matrix: ArrayLike,
    *,
    higher_is_better: bool = True,
    reference: Literal["best", "after_learning"] = "best",
) -> float:
    """Average forgetting over the tasks learnt before the last one.

    ``matrix[i, j]`` is the performance on task (domain) ``j`` measured right
    after training on task ``i``; only ``j <= i`` is read (the upper
    triangle may hold anything, e.g. NaN). With ``T`` tasks, the forgetting
    of task ``j < T - 1`` is how much worse its final value ``matrix[T-1, j]``
    is than a reference value:

    - ``reference="best"`` (Chaudhry et al. 2018): the best of
      ``matrix[j:T-1, j]``;
    - ``reference="after_learning"``: ``matrix[j, j]``.

    **Sign convention: positive = forgotten (worse now), negative = improved
    (backward transfer).** For a higher-is-better metric such as accuracy or
    AUC, forgetting is ``reference - final``; for a lower-is-better metric
    such as HTER or ACER pass ``higher_is_better=False``, and it is
    ``final - reference`` ("best" then means the smallest earlier value).
    The result is in the metric's units (a fraction for HTER).

    Parameters
    ----------
    matrix : array_like
        ``(T, T)`` float; the lower triangle (diagonal included) must be finite.
    higher_is_better : bool, keyword-only
        Whether larger values of the metric are better.
    reference : {"best", "after_learning"}, keyword-only

    Returns
    -------
    float
        Mean forgetting over tasks ``0 .. T-2``; ``0.0`` when ``T == 1``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise InvalidArgument(f"matrix must be square (T, T) with T >= 1, got shape {m.shape}")
    if reference not in ("best", "after_learning"):
        raise InvalidArgument(f"reference must be 'best' or 'after_learning', got {reference!r}")
    t = m.shape[0]
    if not np.all(np.isfinite(m[np.tril_indices(t)])):
        raise InvalidArgument("matrix has NaN or infinite values on or below the diagonal")
    if t == 1:
        return 0.0
    sign = 1.0 if higher_is_better else -1.0
    g = sign * m  # now higher is better in every case
    values = []
    for j in range(t - 1):
        ref = g[j : t - 1, j].max() if reference == "best" else g[j, j]
        values.append(ref - g[t - 1, j])
    return float(np.mean(values))
