"""Calibrate a face model's impostor scores for the 1:N threshold, and check it on held-out people.

What ``scripts/calibrate_fpir.py`` runs (see :mod:`veilface.client.thresholds`
for the rule it feeds). The split is by identity: the fit identities give
the impostor distribution (every pair of their images of two different
people); the held-out identities, never seen by the fit, give the figures:

- **FPIR(N)**: non-mated searches. Each held-out image is a probe against
  galleries of ``N`` other held-out identities (one template each, drawn at
  random ``draws`` times); a false positive is a best score at or above
  ``threshold(N)``.
- **FNIR(N)**: mated searches. Each held-out person with two images is
  searched with the second, against a gallery of the first plus ``N - 1``
  other held-out identities; a miss is the mate not first, or first below
  the threshold (rank-1 FNIR).

Where the held-out people are fewer than ``N`` (LFW has 4,307 people, so
half of them cannot make a gallery of 100,000), the figures are the model's:
FPIR by construction, FNIR as the mean over held-out genuine scores ``g`` of
``1[g < t] + 1[g >= t] (1 - (1 - FMR(g))^(N - 1))`` (the mate below the
threshold, or outranked by one of the impostors). The model's figures are
also given where the empirical ones exist, to show how far to trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from veilface.client.thresholds import GPDTail, ImpostorCalibration

FloatArray = npt.NDArray[np.float64]


def unit_rows(emb: npt.ArrayLike) -> FloatArray:
    """L2-normalized rows (the SDK's normalize): float64 [n, d]."""
    x = np.asarray(emb, dtype=np.float64)
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float64)


def split_identities(labels: npt.ArrayLike, *, fit_share: float = 0.5, seed: int = 0) -> tuple[
    npt.NDArray[np.bool_], npt.NDArray[np.bool_]
]:
    """Row masks (fit, held out): each person's rows all go to one side, people drawn at random."""
    lab = np.asarray(labels).astype(str)
    people = np.unique(lab)
    rng = np.random.default_rng(seed)
    fit_people = set(rng.permutation(people)[: round(fit_share * len(people))].tolist())
    fit = np.array([p in fit_people for p in lab])
    return fit, ~fit


def impostor_scores(x: FloatArray, labels: npt.ArrayLike, *, block: int = 1024) -> npt.NDArray[np.float32]:
    """Cosines of every pair of rows of different people (each pair once): float32 [pairs]."""
    lab = np.asarray(labels).astype(str)
    codes = np.unique(lab, return_inverse=True)[1]
    out: list[npt.NDArray[np.float32]] = []
    for start in range(0, len(x), block):
        s = x[start : start + block] @ x.T
        rows = np.arange(start, min(start + block, len(x)))
        keep = (np.arange(len(x))[None, :] > rows[:, None]) & (codes[rows][:, None] != codes[None, :])
        out.append(s[keep].astype(np.float32))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def genuine_scores(x: FloatArray, labels: npt.ArrayLike) -> FloatArray:
    """Cosine of each person's first two rows (people with one row give none)."""
    first, second = _first_two(labels)
    return np.einsum("ij,ij->i", x[first], x[second]) if len(first) else np.zeros(0)


def _first_two(labels: npt.ArrayLike) -> tuple[list[int], list[int]]:
    seen: dict[str, int] = {}
    first: list[int] = []
    second: list[int] = []
    done: set[str] = set()
    for i, lab in enumerate(np.asarray(labels).astype(str).tolist()):
        if lab not in seen:
            seen[lab] = i
        elif lab not in done:
            first.append(seen[lab])
            second.append(i)
            done.add(lab)
    return first, second


def fit_calibration(
    scores: npt.ArrayLike, *, model: str, dim: int, source: str, tail_fmr: float = 1e-3, min_count: int = 25
) -> ImpostorCalibration:
    """The empirical FMR table down to ``min_count`` exceedances, and a GPD tail above ``tail_fmr``.

    The tail is fitted by maximum likelihood (scipy) on the scores above
    the ``1 - tail_fmr`` quantile; the table's points are quantiles at FMRs
    spaced a quarter decade apart.
    """
    from scipy.stats import genpareto

    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n < 10 * min_count / tail_fmr:
        raise ValueError(f"{n} impostor scores are too few for a tail at FMR {tail_fmr}")
    floor = min_count / n
    fmrs = [10 ** (-e / 4) for e in range(2, 80) if 10 ** (-e / 4) >= floor]
    table: list[tuple[float, float]] = []
    for f in fmrs:
        t = float(s[min(n - 1, math.ceil((1 - f) * n))])
        fmr = float(n - np.searchsorted(s, t, side="left")) / n  # P(score >= t)
        if not table or (t > table[-1][0] and fmr < table[-1][1]):
            table.append((t, fmr))
    u = float(s[math.ceil((1 - tail_fmr) * n)])
    y = s[s > u] - u
    xi, _, sigma = genpareto.fit(y, floc=0.0)
    tail = GPDTail(u=u, p_u=float(len(y) / n), xi=float(xi), sigma=float(sigma))
    return ImpostorCalibration(model, dim, source, tuple(table), tail)


@dataclass(frozen=True)
class HeldOut:
    """The held-out side: gallery templates (first image per person), non-mated and mated probes."""

    gallery: FloatArray  # [people, d]
    gallery_people: npt.NDArray[np.str_]
    probes: FloatArray  # every held-out image
    probe_people: npt.NDArray[np.str_]
    mated: FloatArray  # second image of people with two
    mated_index: npt.NDArray[np.int64]  # their row in ``gallery``

    @classmethod
    def make(cls, x: FloatArray, labels: npt.ArrayLike) -> HeldOut:
        lab = np.asarray(labels).astype(str)
        people, first = np.unique(lab, return_index=True)
        _, second = _first_two(lab)
        where = {p: i for i, p in enumerate(people.tolist())}
        return cls(
            x[first], people, x, lab, x[second],
            np.array([where[lab[i]] for i in second], dtype=np.int64),
        )


def evaluate(
    cal: ImpostorCalibration,
    held: HeldOut,
    sizes: tuple[int, ...],
    *,
    target_fpir: float,
    draws: int = 5,
    seed: int = 0,
    extra_thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """FPIR and FNIR at ``threshold(N)`` for each N (empirical where the held-out people suffice)."""
    rng = np.random.default_rng(seed)
    g_scores = held.mated @ held.gallery.T  # [mated, people]
    genuine = g_scores[np.arange(len(held.mated)), held.mated_index]
    p_scores = held.probes @ held.gallery.T  # [probes, people]
    own = np.array([np.searchsorted(held.gallery_people, p) for p in held.probe_people])
    people = len(held.gallery)
    out: dict[str, Any] = {}
    for n in sizes:
        t = cal.threshold(n, target_fpir)
        row: dict[str, Any] = {"threshold": t, "fpir_model": cal.fpir(n, t), "fnir_model": _fnir_model(cal, genuine, n, t)}
        for name, thr in (extra_thresholds or {}).items():
            row[f"fpir_model_at_{name}"] = cal.fpir(n, thr)
        if n < people:
            fp, fn = _empirical(rng, p_scores, own, g_scores, held.mated_index, genuine, n, t, draws)
            row.update(fpir=fp[0], non_mated_searches=fp[1], fnir=fn[0], mated_searches=fn[1])
            for name, thr in (extra_thresholds or {}).items():
                fp2, fn2 = _empirical(rng, p_scores, own, g_scores, held.mated_index, genuine, n, thr, draws)
                row[f"fpir_at_{name}"], row[f"fnir_at_{name}"] = fp2[0], fn2[0]
            row["empirical"] = True
        else:
            row["empirical"] = False  # extrapolated: fewer held-out people than N
        out[str(n)] = row
    return out


def _fnir_model(cal: ImpostorCalibration, genuine: FloatArray, n: int, t: float) -> float:
    miss = [1.0 if g < t else -math.expm1((n - 1) * math.log1p(-cal.fmr(float(g)))) for g in genuine]
    return float(np.mean(miss)) if miss else float("nan")


def _empirical(
    rng: np.random.Generator,
    p_scores: FloatArray,
    own: npt.NDArray[np.int64],
    g_scores: FloatArray,
    mated_index: npt.NDArray[np.int64],
    genuine: FloatArray,
    n: int,
    t: float,
    draws: int,
) -> tuple[tuple[float, int], tuple[float, int]]:
    people = p_scores.shape[1]
    fp = total = 0
    for i in range(len(p_scores)):  # non-mated: galleries of n people other than the probe's
        others = np.delete(np.arange(people), own[i])
        for _ in range(draws):
            pick = rng.choice(others, n, replace=False)
            fp += int(p_scores[i, pick].max() >= t)
            total += 1
    miss = searches = 0
    for j in range(len(g_scores)):  # mated: the mate plus n - 1 others
        others = np.delete(np.arange(people), mated_index[j])
        for _ in range(draws):
            pick = rng.choice(others, n - 1, replace=False)
            best_other = g_scores[j, pick].max() if n > 1 else -np.inf
            miss += int(genuine[j] < t or best_other >= genuine[j])
            searches += 1
    return (fp / max(1, total), total), (miss / max(1, searches), searches)


def empirical_max_threshold(
    x: FloatArray, labels: npt.ArrayLike, n: int, target_fpir: float, *, draws: int = 3, seed: int = 0
) -> float:
    """The ``1 - target`` quantile of the best impostor score over galleries of ``n`` (fit side).

    The threshold "the empirical distribution of the maximum" gives, for
    comparison with the model's (only where the fit people exceed ``n``).
    """
    held = HeldOut.make(x, labels)
    s = held.probes @ held.gallery.T
    own = np.array([np.searchsorted(held.gallery_people, p) for p in held.probe_people])
    rng = np.random.default_rng(seed)
    maxima = []
    for i in range(len(s)):
        others = np.delete(np.arange(s.shape[1]), own[i])
        for _ in range(draws):
            maxima.append(s[i, rng.choice(others, n, replace=False)].max())
    return float(np.quantile(np.asarray(maxima), 1 - target_fpir))


def calibration_to_dict(cal: ImpostorCalibration) -> dict[str, Any]:
    return {
        "model": cal.model,
        "dim": cal.dim,
        "source": cal.source,
        "score": "cosine of the L2-normalized embeddings (the SDK's decision score)",
        "table": [[round(t, 6), float(f"{f:.6g}")] for t, f in cal.table],
        "tail": {"u": cal.tail.u, "p_u": cal.tail.p_u, "xi": cal.tail.xi, "sigma": cal.tail.sigma},
    }


__all__ = [
    "HeldOut",
    "calibration_to_dict",
    "empirical_max_threshold",
    "evaluate",
    "fit_calibration",
    "genuine_scores",
    "impostor_scores",
    "split_identities",
    "unit_rows",
]
