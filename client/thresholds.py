"""The 1:N decision threshold: set for a target false-positive identification rate at the gallery's size.

One cosine threshold for every gallery is wrong for 1:N search: a probe of
someone not enrolled is compared with all N templates, and the best of N
impostor scores grows with N. For a face model whose impostor scores (the
cosine of two L2-normalized embeddings of different people, the score the
SDK decides on: mixing is orthogonal and the centering offset is added
back, so it is exact) have the false-match rate FMR(t) at threshold t, a
non-mated search returns a false positive with probability

    FPIR(N, t) = 1 - (1 - FMR(t))^N

if the N scores are independent. They are not quite (a probe that looks
like many people scores high against all of them), but with scores
independent given the probe the true FPIR is E_p[1 - (1 - FMR_p(t))^N],
which the formula bounds from above (the function is concave in FMR): the
threshold it gives meets the target or does better, at some cost in missed
mates. So ``threshold(N) = FMR^-1(1 - (1 - target)^(1/N))``.

FMR(t) comes from a calibration of the model (:class:`ImpostorCalibration`):
the empirical upper tail of the impostor scores of the fit identities as
a table, and past its resolution a generalized Pareto tail fitted to the
exceedances (the cosine is bounded, so the shape is negative). The
calibration of dlib's 128-d model, on LFW, ships as
``client/calibration/dlib-lfw.json``; ``scripts/calibrate_fpir.py``
regenerates it and reports the FPIR and FNIR it reaches on held-out
identities (docs/client.md, "Decision threshold").

:class:`ThresholdPolicy` applies it: ``VeilClient.identify`` decides at
``max(tenant threshold, threshold(N))`` for the key's current gallery size
N, unless the call names a threshold, which wins. The tenant's own
threshold (``TenantState.threshold``, the 1:1 threshold of ``verify``) is a
floor: a 1:N decision is never looser than a 1:1 one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veilface.errors import InvalidArgument

if TYPE_CHECKING:
    from veilface.client.search import Identification

log = logging.getLogger(__name__)

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
#: Face models with a shipped calibration, by template dimension (what a tenant state records).
MODEL_BY_DIM = {128: "dlib"}
DEFAULT_TARGET_FPIR = 0.01


@dataclass(frozen=True)
class GPDTail:
    """P(score > u + y) = p_u (1 + xi y / sigma)^(-1/xi) for y >= 0 (a generalized Pareto tail)."""

    u: float
    p_u: float
    xi: float
    sigma: float

    def fmr(self, t: float) -> float:
        y = max(0.0, t - self.u)
        if abs(self.xi) < 1e-9:
            return self.p_u * math.exp(-y / self.sigma)
        base = 1.0 + self.xi * y / self.sigma
        return self.p_u * math.pow(base, -1.0 / self.xi) if base > 0 else 0.0

    def inverse(self, fmr: float) -> float:
        """The threshold of false-match rate ``fmr`` (< p_u)."""
        r = fmr / self.p_u
        if abs(self.xi) < 1e-9:
            return self.u - self.sigma * math.log(r)
        return self.u + self.sigma / self.xi * (math.pow(r, -self.xi) - 1.0)


@dataclass(frozen=True)
class ImpostorCalibration:
    """FMR(t) of one face model's impostor cosine scores.

    ``table``: (threshold, FMR) pairs of the empirical distribution,
    thresholds increasing, FMR decreasing, down to the smallest FMR the fit
    data resolve; ``tail``: the fitted tail used below it.
    """

    model: str
    dim: int
    source: str
    table: tuple[tuple[float, float], ...]
    tail: GPDTail

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImpostorCalibration:
        table = tuple((float(t), float(f)) for t, f in d["table"])
        if len(table) < 2 or any(
            b[0] <= a[0] or b[1] >= a[1] or b[1] <= 0 for a, b in pairwise(table)
        ):
            raise InvalidArgument("a calibration table must have increasing thresholds and decreasing FMRs > 0")
        tail = GPDTail(**{k: float(v) for k, v in d["tail"].items()})
        return cls(str(d["model"]), int(d["dim"]), str(d.get("source", "")), table, tail)

    def threshold_for_fmr(self, fmr: float) -> float:
        """The smallest threshold whose false-match rate is at most ``fmr``."""
        if not 0.0 < fmr < 1.0:
            raise InvalidArgument(f"a false-match rate is in (0, 1), got {fmr!r}")
        if fmr >= self.table[0][1]:
            return self.table[0][0]
        if fmr < self.table[-1][1]:
            return max(self.tail.inverse(fmr), self.table[-1][0])
        for (t0, f0), (t1, f1) in pairwise(self.table):
            if f1 <= fmr <= f0:  # linear in log FMR between the two points
                w = (math.log(f0) - math.log(fmr)) / (math.log(f0) - math.log(f1))
                return t0 + w * (t1 - t0)
        return self.table[-1][0]  # pragma: no cover - the loop covers the table's range

    def fmr(self, t: float) -> float:
        """The false-match rate at threshold ``t`` (the inverse of :meth:`threshold_for_fmr`)."""
        if t <= self.table[0][0]:
            return self.table[0][1]
        if t >= self.table[-1][0]:
            return min(self.tail.fmr(t), self.table[-1][1])
        for (t0, f0), (t1, f1) in pairwise(self.table):
            if t0 <= t <= t1:
                w = (t - t0) / (t1 - t0)
                return math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0)))
        return self.table[-1][1]  # pragma: no cover

    def threshold(self, gallery_size: int, target_fpir: float = DEFAULT_TARGET_FPIR) -> float:
        """The threshold at which a non-mated search of ``gallery_size`` templates has FPIR <= target.

        FMR = 1 - (1 - target)^(1/N), computed without cancellation.
        """
        if not 0.0 < target_fpir < 1.0:
            raise InvalidArgument(f"target_fpir is in (0, 1), got {target_fpir!r}")
        n = max(1, int(gallery_size))
        fmr = -math.expm1(math.log1p(-target_fpir) / n)
        return self.threshold_for_fmr(fmr)

    def fpir(self, gallery_size: int, t: float) -> float:
        """FPIR(N, t) = 1 - (1 - FMR(t))^N, the model's (conservative) estimate."""
        return -math.expm1(max(1, int(gallery_size)) * math.log1p(-self.fmr(t)))


@cache
def load_calibration(model: str) -> ImpostorCalibration:
    """The shipped calibration of ``model`` (``client/calibration/<model>-lfw.json``)."""
    path = CALIBRATION_DIR / f"{model}-lfw.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(
            f"no threshold calibration ships for face model {model!r}; pass threshold= to identify"
        ) from None
    return ImpostorCalibration.from_dict(data)


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold a decision used and why: ``explicit``, ``tenant`` or ``calibrated``."""

    value: float
    source: str
    gallery_size: int = 0


class ThresholdPolicy:
    """Which threshold ``identify`` decides at (see the module docstring).

    ``gallery_size`` is the key's template count: exact after every strict
    search (the server reports the templates it searched: every bin and
    staged template of the key), otherwise the count the tenant's
    DescribeTenant gave, read again after ``refresh_s``. A routed search
    compares the probe with the templates of its nearest lists only, but
    those hold its best-scoring impostors, so the whole gallery's N is
    what bounds its FPIR.
    """

    def __init__(
        self,
        dim: int,
        *,
        target_fpir: float = DEFAULT_TARGET_FPIR,
        model: str | None = None,
        refresh_s: float = 300.0,
    ) -> None:
        if not 0.0 < target_fpir < 1.0:
            raise InvalidArgument(f"target_fpir is in (0, 1), got {target_fpir!r}")
        self.target_fpir = target_fpir
        self.model = model if model is not None else MODEL_BY_DIM.get(dim, "")
        self.refresh_s = refresh_s
        self._n = -1
        self._n_at = -math.inf
        self.calibration: ImpostorCalibration | None = None
        if self.model:
            self.calibration = load_calibration(self.model)
            if self.calibration.dim != dim:
                raise InvalidArgument(
                    f"the {self.model} calibration is for {self.calibration.dim}-d templates, "
                    f"this key's are {dim}-d"
                )

    def observe(self, gallery_size: int) -> None:
        """Record the key's gallery size (a strict search's count, or DescribeTenant's)."""
        self._n, self._n_at = int(gallery_size), time.monotonic()

    def stale(self) -> bool:
        return self._n < 0 or time.monotonic() - self._n_at > self.refresh_s

    @property
    def gallery_size(self) -> int:
        return self._n

    def choose(self, tenant_threshold: float, explicit: float | None, *, gallery_size: int) -> ThresholdChoice:
        """The decision threshold for a search of a gallery of ``gallery_size`` templates."""
        if explicit is not None:
            return ThresholdChoice(float(explicit), "explicit", gallery_size)
        if self.calibration is None or gallery_size < 1:
            return ThresholdChoice(float(tenant_threshold), "tenant", gallery_size)
        t = self.calibration.threshold(gallery_size, self.target_fpir)
        if t <= tenant_threshold:
            return ThresholdChoice(float(tenant_threshold), "tenant", gallery_size)
        return ThresholdChoice(float(t), "calibrated", gallery_size)

    def decide(
        self,
        result: Identification,
        *,
        tenant_threshold: float,
        explicit: float | None,
        strict: bool,
        gallery_size: Callable[[], int],
    ) -> Identification:
        """Set ``result.match`` at the chosen threshold and record it (``threshold``, ``threshold_source``).

        ``strict``: the search covered every template of the key, so its
        ``stats.searched_templates`` is the gallery size. Otherwise
        ``gallery_size()`` (DescribeTenant) is asked when the known size is stale.
        """
        if strict and result.stats.searched_templates > 0:
            self.observe(result.stats.searched_templates)
        elif explicit is None and self.calibration is not None and self.stale():
            self.observe(gallery_size())
        choice = self.choose(tenant_threshold, explicit, gallery_size=self.gallery_size)
        result.match = result.subject_id is not None and result.score >= choice.value
        result.threshold, result.threshold_source = choice.value, choice.source
        result.gallery_size = max(0, choice.gallery_size)
        return result


__all__ = [
    "DEFAULT_TARGET_FPIR",
    "GPDTail",
    "ImpostorCalibration",
    "ThresholdChoice",
    "ThresholdPolicy",
    "load_calibration",
]
