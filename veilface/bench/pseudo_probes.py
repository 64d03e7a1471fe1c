"""How well the routing tuner's pseudo-probes stand in for real second captures.

The tuner (:mod:`veilface.client.route_tuning`) has one capture per subject,
so it draws a pseudo-probe from each sampled template. On an embeddings
file with two or more photos of some people, this compares, for the same
lists, the real second photos with pseudo-probes drawn from the same
templates at the same cosine:

* the mean cosine to other people's templates and the share of probes whose
  exhaustive top-1 is another person;
* routing recall by nprobe: the share of probes whose exhaustive top-1 sits
  in one of their ``nprobe`` nearest lists (the target the tuner counts).

``origin`` is the draw the tuner used before (``c x + sqrt(1 - c^2) u``,
around the origin), kept here as the reference it was replaced against.
Plaintext only; seconds on LFW.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from veilface.errors import InvalidArgument

FloatArray = npt.NDArray[np.float64]
NPROBES = (1, 2, 4, 8, 12, 16)


@dataclass(frozen=True)
class ProbeSetStats:
    """One kind of probe against the gallery."""

    impostor_cosine: float
    top1_other_person: float
    recall_by_nprobe: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PseudoProbeReport:
    gallery: int
    probes: int
    nlist: int
    sets: dict[str, ProbeSetStats]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pairs(emb: FloatArray, labels: list[str]) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """Gallery (first photo of everyone), second photos, and each second photo's gallery row."""
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab not in first:
            first[lab] = i
        elif lab not in second:
            second[lab] = i
    names = list(first)
    row = {name: r for r, name in enumerate(names)}
    paired = [name for name in names if name in second]
    if len(paired) < 100:
        raise InvalidArgument(f"needs at least 100 people with two photos, found {len(paired)}")
    gallery = emb[[first[n] for n in names]]
    return gallery, emb[[second[n] for n in paired]], np.asarray([row[n] for n in paired], dtype=np.int64)


def _origin_draw(x: FloatArray, c: FloatArray, rng: np.random.Generator) -> FloatArray:
    u = rng.standard_normal(x.shape)
    u -= np.sum(u * x, axis=1, keepdims=True) * x
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    out: FloatArray = c * x + np.sqrt(1.0 - c**2) * u
    return out


def _stats(probes: FloatArray, gallery: FloatArray, own: npt.NDArray[np.int64], router: Any,
           assigned: npt.NDArray[np.int64]) -> ProbeSetStats:
    from veilface.client.route_tuning import exhaustive_top1

    # mean cosine to everyone else from the gallery's sum: no probes x gallery matrix in memory
    own_cos = np.sum(probes * gallery[own], axis=1)
    impostor = (probes @ gallery.sum(axis=0) - own_cos) / max(1, len(gallery) - 1)
    top1 = exhaustive_top1(gallery, probes)
    depth = min(max(NPROBES), router.nlist)
    probed = router.probe_lists(probes.astype(np.float32), depth).reshape(len(probes), depth)
    hit = probed == assigned[top1][:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), depth)
    return ProbeSetStats(
        impostor_cosine=float(np.mean(impostor)),
        top1_other_person=float(np.mean(top1 != own)),
        recall_by_nprobe={k: float(np.mean(rank < k)) for k in NPROBES if k <= depth},
    )


def run_pseudo_probe_check(
    embeddings: npt.ArrayLike, labels: Sequence[str], *, nlist: int = 32, seed: int = 0
) -> PseudoProbeReport:
    """Real second photos against the tuner's pseudo-probes (and the old draw):
    ``embeddings`` [n, d] with a person's ``labels`` [n] (``veilface embed``'s npz)."""
    from veilface.client.route_tuning import Probes, TuneOptions
    from veilface.client.routing import Router

    emb = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if emb.ndim != 2 or len(labels) != len(emb) or not np.all(np.isfinite(emb)) or np.any(norms == 0):
        raise InvalidArgument("embeddings must be finite, non-zero [n, d] rows with one label each")
    emb = emb / norms
    labels = [str(x) for x in labels]
    gallery, second, own = _pairs(emb, labels)
    mu = gallery.mean(axis=0)
    router = Router.train(gallery.astype(np.float32), nlist=nlist, label_key=bytes(32), key_id="check", seed=seed)
    assigned = router.assign(gallery.astype(np.float32))
    rng = np.random.default_rng(seed)
    c = np.sum(second * gallery[own], axis=1, keepdims=True)
    # the tuner's draw, at each real pair's own cosine (so only the direction differs)
    tuner = Probes.draw(gallery, mu, own, TuneOptions(seed=seed), rng, gallery.shape[1], cosine=c)
    sets = {
        "real second photos": _stats(second, gallery, own, router, assigned),
        "pseudo-probes (tuner)": _stats(tuner.route.astype(np.float64), gallery, own, router, assigned),
        "origin draw (before)": _stats(_origin_draw(gallery[own], c, rng), gallery, own, router, assigned),
    }
    return PseudoProbeReport(len(gallery), len(second), router.nlist, sets)


def format_report(r: PseudoProbeReport) -> str:
    head = f"{'probes':24s} {'cos to others':>13s} {'top-1 other':>11s}  " + "  ".join(
        f"nprobe {k:>2d}" for k in next(iter(r.sets.values())).recall_by_nprobe
    )
    lines = [f"gallery {r.gallery}, probes {r.probes}, {r.nlist} lists", head]
    for name, s in r.sets.items():
        lines.append(
            f"{name:24s} {s.impostor_cosine:13.4f} {s.top1_other_person:11.4f}  "
            + "  ".join(f"{v:9.4f}" for v in s.recall_by_nprobe.values())
        )
    return "\n".join(lines)


__all__ = ["ProbeSetStats", "PseudoProbeReport", "format_report", "run_pseudo_probe_check"]
