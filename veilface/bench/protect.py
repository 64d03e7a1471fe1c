"""``veilface bench protect``: does adversarial protection stop dlib from matching a person?

For every person of ``DIR`` (``<person>/<image>``) with at least two images
(by default only the people held out from surrogate training, see
:func:`veilface.client.protect.surrogate_training.is_held_out`), the first
image is protected with :func:`veilface.client.protect.cloak` and compared,
with dlib's recognizer (the independent judge, never used by the protector),
against that person's other images:

``psr``
    share of protected images that match none of the person's other images
    at dlib's standard distance 0.6 (an image in which dlib finds no face
    counts as not matched, and is counted in ``n_undetected``).
``psr_jpeg75``
    the same after re-encoding the protected image as JPEG quality 75.
``psr_recognizer``, ``psr_recognizer_jpeg75``
    the same, but judging dlib's *recognizer* alone: when dlib's detector
    misses the protected face, the face is aligned and embedded at the box
    the detector found on the original photo (what a system with a better
    detector would do), so a perturbation that only hides the face from
    dlib's HOG detector does not count as protection here.
``psr_surrogates``
    the same against each surrogate (cosine threshold at 1% false accepts
    over the impostor pairs of this run's reference images), averaged over
    surrogates: how well the attack works on the models it optimised against
    (white box), for contrast.
``baseline``
    the same figures for the *unprotected* first image, in the same run
    (``psr`` of an unprotected image is the share dlib already fails to match).

``ssim``/``psnr`` compare protected and original pixels; ``sec_per_image``
is the wall time of :func:`cloak` (detection included) and
``cpu_sec_per_image`` the CPU time of this process during it (all threads),
which moves less than wall time when other work shares the machine.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

#: dlib's standard same-person distance.
DLIB_THRESHOLD = 0.6


@dataclass
class ProtectBenchConfig:
    """Options of the protection benchmark."""

    images: Path
    max_people: int = 40
    max_others: int = 8
    preset: str = "medium"
    epsilon: float | None = None
    ssim_floor: float | None = None
    steps: int | None = None
    weights: Path | None = None
    heldout_only: bool = True
    threads: int = 2
    seed: int = 0
    progress: bool = True


@dataclass
class _Person:
    name: str
    probe: Path
    probe_rgb: npt.NDArray[np.uint8]
    probe_box: Any
    probe_dlib: npt.NDArray[np.float32]
    others_dlib: npt.NDArray[np.float32]
    others_sur: list[npt.NDArray[np.float32]]  # per surrogate (n_others, 128)
    probe_sur: list[npt.NDArray[np.float32]]  # per surrogate (128,)


@dataclass
class ProtectBenchResult:
    """Figures of one budget (see the module docstring)."""

    psr: float
    psr_jpeg75: float
    psr_recognizer: float
    psr_recognizer_jpeg75: float
    psr_surrogates: float
    ssim: float
    ssim_min: float
    psnr: float
    sec_per_image: float
    cpu_sec_per_image: float
    n_people: int
    n_refused: int
    n_undetected: int
    n_undetected_jpeg75: int
    psr_among_matched: float
    dlib_distance_before: float
    dlib_distance_after: float
    budget: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)


def _min_dist(vec: npt.NDArray[np.float32], others: npt.NDArray[np.float32]) -> float:
    return float(np.linalg.norm(others - vec[None, :], axis=1).min())


def _sur_embed(ensemble: Any, rgb: npt.NDArray[np.uint8], box: Any) -> list[npt.NDArray[np.float32]]:
    import torch
    import torch.nn.functional as F

    from veilface.client.protect.face_crops import crop_square, cut
    from veilface.client.protect.surrogate_training import image_tensor

    x, square = image_tensor(rgb), crop_square(box)
    with torch.no_grad():
        return [F.normalize(m(cut(x, square, m.crop_size)))[0].numpy() for m in ensemble.models]


def _prepare(cfg: ProtectBenchConfig, pipeline: Any, ensemble: Any) -> tuple[list[_Person], int]:
    from veilface.client.face import load_image
    from veilface.client.protect.surrogate_training import is_held_out, list_people
    from veilface.errors import FaceError

    people = list_people(cfg.images, min_images=2)
    names = [n for n in people if is_held_out(n)] if cfg.heldout_only else list(people)
    if not names:
        raise InvalidArgument("no held-out person with 2+ images in the folder; use --all-people")
    names = names[: cfg.max_people]
    iterator: Sequence[str] = names
    if cfg.progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="embedding references (dlib)", unit="person")
    out: list[_Person] = []
    skipped = 0
    for name in iterator:
        files = people[name]
        try:
            probe_rgb = load_image(files[0])
            probe = pipeline.embed(probe_rgb)
        except FaceError:
            skipped += 1
            continue
        vecs, surs = [], []
        for f in files[1 : 1 + cfg.max_others]:
            try:
                rgb = load_image(f)
                emb = pipeline.embed(rgb)
            except FaceError:
                continue
            vecs.append(emb.vector)
            surs.append(_sur_embed(ensemble, rgb, emb.box))
        if not vecs:
            skipped += 1
            continue
        out.append(
            _Person(
                name=name,
                probe=files[0],
                probe_rgb=probe_rgb,
                probe_box=probe.box,
                probe_dlib=probe.vector,
                others_dlib=np.stack(vecs),
                others_sur=[np.stack([s[i] for s in surs]) for i in range(len(ensemble.models))],
                probe_sur=_sur_embed(ensemble, probe_rgb, probe.box),
            )
        )
    return out, skipped


def _calibrate(people: Sequence[_Person], ensemble: Any) -> dict[str, float]:
    """Per surrogate, the cosine threshold at 1% false accepts over this run's impostor pairs.

    Impostor pairs are reference images of two different benchmark people;
    with fewer than 100 such pairs the threshold recorded at training time
    (``manifest.json``) is kept.
    """
    out: dict[str, float] = {}
    owners = np.concatenate([np.full(len(p.others_dlib), i) for i, p in enumerate(people)])
    different = owners[:, None] != owners[None, :]
    upper = np.triu(np.ones_like(different), k=1)
    for i, arch in enumerate(ensemble.archs):
        emb = np.concatenate([p.others_sur[i] for p in people])
        impostor = (emb @ emb.T)[different & upper]
        if impostor.size >= 100:
            out[arch] = float(np.quantile(impostor, 0.99))
        else:
            out[arch] = float(ensemble.thresholds.get(arch, math.nan))
    return out


def _jpeg75(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=75)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)


class _Eval(NamedTuple):
    matched: bool  # dlib (detector + recognizer) matches an other image of the person
    undetected: bool
    distance: float  # nan when undetected
    sur_matched: list[bool]
    matched_jpeg75: bool
    undetected_jpeg75: bool
    #: the recognizer alone: at the original photo's box when the detector misses
    recognizer_matched: bool
    recognizer_matched_jpeg75: bool


def _evaluate_one(
    person: _Person, pixels: npt.NDArray[np.uint8], pipeline: Any, ensemble: Any
) -> _Eval:
    from veilface.errors import FaceError

    def dlib_check(img: npt.NDArray[np.uint8]) -> tuple[bool, bool, float, Any, bool]:
        try:
            emb = pipeline.embed(img)
        except FaceError:
            vec = pipeline.backend.align_and_embed(img, person.probe_box)
            alone = _min_dist(vec, person.others_dlib) < DLIB_THRESHOLD
            return False, True, math.nan, None, alone
        d = _min_dist(emb.vector, person.others_dlib)
        return d < DLIB_THRESHOLD, False, d, emb.box, d < DLIB_THRESHOLD

    matched, undetected, dist, box, alone = dlib_check(pixels)
    sur_matched: list[bool] = []
    if box is not None:
        sur = _sur_embed(ensemble, pixels, box)
        for i, arch in enumerate(ensemble.archs):
            thr = ensemble.thresholds.get(arch, math.nan)
            sims = person.others_sur[i] @ sur[i]
            sur_matched.append(bool(sims.max() >= thr))
    else:
        sur_matched = [False] * len(ensemble.models)
    jpeg = dlib_check(_jpeg75(pixels))
    return _Eval(matched, undetected, dist, sur_matched, jpeg[0], jpeg[1], alone, jpeg[4])


def run_protect_bench(
    cfg: ProtectBenchConfig, *, epsilons: Sequence[float | None] = (None,)
) -> list[ProtectBenchResult]:
    """Run the benchmark for each budget in ``epsilons`` (``None``: the preset's).

    The references (other images of each person) are embedded once and
    shared by every budget.
    """
    import torch

    from veilface.client.face import FacePipeline
    from veilface.client.protect.adversarial import cloak
    from veilface.client.protect.image_quality import psnr, ssim
    from veilface.client.protect.surrogates import load_ensemble
    from veilface.errors import FaceError

    torch.set_num_threads(max(1, cfg.threads))
    pipeline = FacePipeline(on_multiple="largest")
    ensemble = load_ensemble(cfg.weights)
    people, skipped = _prepare(cfg, pipeline, ensemble)
    if not people:
        raise InvalidArgument("no person could be embedded by dlib; check the folder")
    logger.info("%d people ready (%d skipped: dlib refused the probe or every other image)",
                len(people), skipped)

    ensemble.thresholds = _calibrate(people, ensemble)
    # baseline: the unprotected probe, in this same run
    base = [_evaluate_one(p, p.probe_rgb, pipeline, ensemble) for p in people]
    baseline = {
        "match_rate": float(np.mean([b.matched for b in base])),
        "psr_unprotected": float(np.mean([not b.matched for b in base])),
        "psr_unprotected_jpeg75": float(np.mean([not b.matched_jpeg75 for b in base])),
        "psr_unprotected_surrogates": float(
            np.mean([not m for b in base for m in b.sur_matched])
        ),
        "dlib_distance": float(np.nanmean([b.distance for b in base])),
        "skipped_people": float(skipped),
        **{f"surrogate_threshold_{a}": t for a, t in ensemble.thresholds.items()},
    }
    results = []
    for eps in epsilons:
        rows = []
        refused = 0
        iterator: Sequence[_Person] = people
        label = "preset" if eps is None else f"eps {eps:g}"
        if cfg.progress:
            from tqdm import tqdm

            iterator = tqdm(people, desc=f"protecting ({label})", unit="img")
        for person, b in zip(iterator, base, strict=True):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                prot = cloak(
                    person.probe_rgb,
                    preset=cfg.preset,
                    epsilon=eps if eps is not None else cfg.epsilon,
                    ssim_floor=cfg.ssim_floor,
                    steps=cfg.steps,
                    ensemble=ensemble,
                    seed=cfg.seed,
                )
            except FaceError:
                refused += 1
                continue
            sec, cpu = time.perf_counter() - t0, time.process_time() - c0
            pixels = np.array(prot.pixels)
            ev = _evaluate_one(person, pixels, pipeline, ensemble)
            rows.append(
                {
                    "baseline_matched": b.matched,
                    **ev._asdict(),
                    "ssim": ssim(pixels, person.probe_rgb),
                    "psnr": psnr(pixels, person.probe_rgb),
                    "sec": sec,
                    "cpu": cpu,
                }
            )
        if not rows:
            raise InvalidArgument("every probe was refused by the protector")
        matched_base = [r for r in rows if r["baseline_matched"]]
        budget = {"preset": cfg.preset, "epsilon": eps if eps is not None else cfg.epsilon,
                  "ssim_floor": cfg.ssim_floor, "steps": cfg.steps}
        results.append(
            ProtectBenchResult(
                psr=float(np.mean([not r["matched"] for r in rows])),
                psr_jpeg75=float(np.mean([not r["matched_jpeg75"] for r in rows])),
                psr_recognizer=float(np.mean([not r["recognizer_matched"] for r in rows])),
                psr_recognizer_jpeg75=float(
                    np.mean([not r["recognizer_matched_jpeg75"] for r in rows])
                ),
                psr_surrogates=float(np.mean([not m for r in rows for m in r["sur_matched"]])),
                ssim=float(np.mean([r["ssim"] for r in rows])),
                ssim_min=float(np.min([r["ssim"] for r in rows])),
                psnr=float(np.mean([r["psnr"] for r in rows])),
                sec_per_image=float(np.mean([r["sec"] for r in rows])),
                cpu_sec_per_image=float(np.mean([r["cpu"] for r in rows])),
                n_people=len(rows),
                n_refused=refused,
                n_undetected=int(sum(r["undetected"] for r in rows)),
                n_undetected_jpeg75=int(sum(r["undetected_jpeg75"] for r in rows)),
                psr_among_matched=(
                    float(np.mean([not r["matched"] for r in matched_base]))
                    if matched_base else math.nan
                ),
                dlib_distance_before=baseline["dlib_distance"],
                dlib_distance_after=float(np.nanmean([r["distance"] for r in rows])),
                budget=budget,
                baseline=baseline,
            )
        )
    return results


def format_table(results: Sequence[ProtectBenchResult]) -> str:
    """A plain-text table of the results, one row per budget, plus the baseline."""
    head = (
        f"{'budget':>10s} {'psr':>6s} {'psr_jpeg75':>10s} {'rec':>6s} {'rec_j75':>7s} "
        f"{'undet':>5s} {'psr_sur':>8s} {'ssim':>6s} "
        f"{'ssim_min':>8s} {'psnr':>6s} {'s/img':>6s} {'cpu s':>6s} {'n':>4s} {'dist':>6s}"
    )
    lines = [head]
    for r in results:
        eps = r.budget.get("epsilon")
        label = f"eps {eps:g}" if eps is not None else str(r.budget.get("preset"))
        lines.append(
            f"{label:>10s} {r.psr:6.3f} {r.psr_jpeg75:10.3f} {r.psr_recognizer:6.3f} "
            f"{r.psr_recognizer_jpeg75:7.3f} {r.n_undetected:5d} {r.psr_surrogates:8.3f} "
            f"{r.ssim:6.3f} {r.ssim_min:8.3f} {r.psnr:6.2f} {r.sec_per_image:6.2f} "
            f"{r.cpu_sec_per_image:6.2f} "
            f"{r.n_people:4d} {r.dlib_distance_after:6.3f}"
        )
    if results:
        b = results[0].baseline
        lines.append(
            f"{'unprotected':>10s} {b['psr_unprotected']:6.3f} {b['psr_unprotected_jpeg75']:10.3f} "
            f"{'–':>6s} {'–':>7s} {'–':>5s} {b['psr_unprotected_surrogates']:8.3f} {1.0:6.3f} {1.0:8.3f} {'inf':>6s} "
            f"{0.0:6.2f} {0.0:6.2f} {results[0].n_people:4d} {b['dlib_distance']:6.3f}"
        )
    return "\n".join(lines)


def to_json(results: Sequence[ProtectBenchResult]) -> dict[str, Any]:
    """The JSON document: the first budget's figures at top level, every budget under ``sweep``."""
    first = asdict(results[0])
    doc: dict[str, Any] = {**first}
    if len(results) > 1:
        doc["sweep"] = [asdict(r) for r in results]
    return doc


def write_json(results: Sequence[ProtectBenchResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results), indent=2, default=float) + "\n")


def plot_sweep(results: Sequence[ProtectBenchResult], path: Path) -> None:
    """PNG of psr, psr_jpeg75 and mean SSIM against the L-infinity budget (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [float(r.budget["epsilon"]) for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(eps, [r.psr for r in results], "o-", lw=2.5, ms=8, label="psr (dlib)")
    ax.plot(eps, [r.psr_jpeg75 for r in results], "s-", label="psr after JPEG q75 (dlib)")
    ax.plot(eps, [r.psr_recognizer for r in results], "v-",
            label="psr, dlib recognizer alone (original box)")
    ax.plot(eps, [r.psr_surrogates for r in results], "^--", label="psr (surrogates, white box)")
    ax.plot(eps, [r.ssim for r in results], "k:", label="mean SSIM")
    base = results[0].baseline["psr_unprotected"]
    ax.axhline(base, color="grey", lw=0.8, label=f"unprotected psr ({base:.2f})")
    dist = ax.twinx()
    dist.plot(eps, [r.dlib_distance_after for r in results], "d-.", color="tab:purple",
              label="dlib distance to own photos")
    dist.axhline(DLIB_THRESHOLD, color="tab:purple", lw=0.8, ls=":")
    dist.set_ylabel("mean dlib distance (match below 0.6)", color="tab:purple")
    dist.set_ylim(0, 1.0)
    dist.legend(fontsize=8, loc="center right")
    ax.set_xlabel("L-inf budget epsilon (grey levels, face region)")
    ax.set_ylabel("protection success rate / SSIM")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    floor = results[0].budget.get("ssim_floor")
    ax.set_title(f"veilface cloak vs dlib, n={results[0].n_people} held-out LFW people"
                 + (f", SSIM floor {floor}" if floor is not None else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "DLIB_THRESHOLD",
    "ProtectBenchConfig",
    "ProtectBenchResult",
    "format_table",
    "plot_sweep",
    "run_protect_bench",
    "to_json",
    "write_json",
]
