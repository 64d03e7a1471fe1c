"""``veilface bench protect``: does adversarial protection stop a recognizer from matching a person?

For every selected person (see :mod:`veilface.bench.protect_selection`; by
default the held-out LFW people of the ``test`` half), the first image is
protected with :func:`veilface.client.protect.cloak` and judged the way an
adversary would (:mod:`veilface.bench.protect_judges`): dlib's recognizer on
the face a detector finds, compared with the person's other images (the
references, embedded by the same judge) at dlib's distance 0.6. A reading
*protects* the photo when the recognizer matches none of the references.

``psr``
    share of protected photos dlib's recognizer no longer matches, on the
    face found by dlib's CNN detector, or at the original photo's box when
    the detector misses it (``n_undetected_cnn`` counts those). The headline.
``psr_mtcnn``
    the same with MTCNN as the detector (``n_undetected_mtcnn``).
``psr_hog``
    dlib's HOG detector then the recognizer, no fallback: a photo in which
    HOG finds no face counts as protected (``n_undetected_hog``). What the
    benchmark reported as ``psr`` before issue 11; the gap to ``psr`` is
    detector evasion.
``psr_jpeg75``, ``psr_resize``, ``psr_blur``
    ``psr`` after JPEG quality 75, after shrinking to 112 px on the long side
    and back (bicubic), after a Gaussian blur of sigma 1.
``psr_surrogates``
    the same against each surrogate at the HOG box of the original photo
    (cosine threshold at 1 % false accepts over this run's impostor pairs),
    averaged: how well the attack works on the models it optimised against.
``dlib_distance_before`` / ``dlib_distance_after``
    mean over people of the mean dlib distance (CNN judge) from the
    unprotected / protected photo to the person's references.
``baseline``
    every ``psr_*`` and count above for the *unprotected* photos of the same
    people in the same run.

``ssim``/``psnr`` compare protected and original pixels; ``sec_per_image``
is the wall time of :func:`cloak` (detection included) and
``cpu_sec_per_image`` the CPU time of this process during it (all threads).
Each result keeps one record per person (name, files, every reading's
distances and detected flag, unprotected and protected) so the aggregates
can be checked.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from veilface.bench.protect_judges import (
    DLIB_THRESHOLD,
    READINGS,
    DlibJudge,
    OriginalFaces,
    References,
    Verdict,
)
from veilface.bench.protect_selection import PeopleRule, PeopleSelection, select_people
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

#: Report key of each reading (``psr`` is the CNN judge).
PSR_KEYS = {spec.name: ("psr" if spec.name == "cnn" else f"psr_{spec.name}") for spec in READINGS}
_T = TypeVar("_T")


@dataclass
class ProtectBenchConfig:
    """Options of the protection benchmark."""

    images: Path
    people: PeopleRule = "test"
    max_people: int | None = None
    max_others: int = 8
    preset: str = "medium"
    epsilon: float | None = None
    ssim_floor: float | None = None
    steps: int | None = None
    weights: Path | None = None
    #: folders the surrogates were trained on (default: the weights' manifest)
    train_data: tuple[Path, ...] | None = None
    cnn_upsample: int = 0
    mtcnn_weights: Path | None = None
    threads: int = 2
    seed: int = 0
    progress: bool = True


@dataclass
class _Person:
    name: str
    probe: Path
    probe_rgb: npt.NDArray[np.uint8]
    original: OriginalFaces
    refs: References
    refs_sur: list[npt.NDArray[np.float32]]  # per surrogate (n_refs, d)
    unprotected: Verdict
    unprotected_sur: list[bool]  # per surrogate: matched


@dataclass
class ProtectBenchResult:
    """Figures of one budget (see the module docstring)."""

    psr: float
    psr_hog: float
    psr_mtcnn: float
    psr_jpeg75: float
    psr_resize: float
    psr_blur: float
    psr_surrogates: float
    ssim: float
    ssim_min: float
    psnr: float
    sec_per_image: float
    cpu_sec_per_image: float
    n_people: int
    n_refused: int
    n_undetected_cnn: int
    n_undetected_hog: int
    n_undetected_mtcnn: int
    dlib_distance_before: float
    dlib_distance_after: float
    budget: dict[str, Any] = field(default_factory=dict)
    #: people the protector refused (name, error class), left out of every figure above
    refused: list[dict[str, str]] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    people: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ProtectBenchRun:
    """What :func:`run_protect_bench` returns: one result per budget, and who was measured."""

    results: list[ProtectBenchResult]
    selection: PeopleSelection


def _progress(items: Sequence[_T], desc: str, unit: str, on: bool) -> Iterable[_T]:
    if not on:
        return items
    from tqdm import tqdm

    bar: Iterable[_T] = tqdm(items, desc=desc, unit=unit)
    return bar


def _sur_embed(
    ensemble: Any, rgb: npt.NDArray[np.uint8], box: Any
) -> list[npt.NDArray[np.float32]]:
    import torch
    import torch.nn.functional as F

    from veilface.client.protect.face_crops import crop_square, cut
    from veilface.client.protect.surrogate_training import image_tensor

    x, square = image_tensor(rgb), crop_square(box)
    with torch.no_grad():
        return [F.normalize(m(cut(x, square, m.crop_size)))[0].numpy() for m in ensemble.models]


def _sur_matched(ensemble: Any, person: _Person, rgb: npt.NDArray[np.uint8]) -> list[bool]:
    """Per surrogate: does it still match ``rgb`` (at the original's HOG box) to the person?"""
    emb = _sur_embed(ensemble, rgb, person.original.boxes["hog"])
    return [
        bool((person.refs_sur[i] @ emb[i]).max() >= ensemble.thresholds.get(arch, math.nan))
        for i, arch in enumerate(ensemble.archs)
    ]


def _prepare(
    cfg: ProtectBenchConfig, selection: PeopleSelection, judge: DlibJudge, ensemble: Any
) -> list[_Person]:
    """Locate each probe's face and embed the references (once for every budget)."""
    from veilface.client.face import load_image
    from veilface.errors import FaceError

    out: list[_Person] = []
    names = list(selection.people)
    for name in _progress(names, "embedding references (dlib)", "person", cfg.progress):
        files = selection.people[name]
        try:
            probe_rgb = load_image(files[0])
        except FaceError:
            selection.drop(name, "no_face")
            continue
        original = judge.locate(probe_rgb)
        refs = judge.references(name, files[1 : 1 + cfg.max_others])
        if original is None or not refs.files:
            selection.drop(name, "no_face")
            continue
        refs_sur = [
            _sur_embed(ensemble, load_image(f), face.box)
            for f, face in zip(refs.files, refs.faces["hog"], strict=True)
        ]
        out.append(
            _Person(
                name=name,
                probe=files[0],
                probe_rgb=probe_rgb,
                original=original,
                refs=refs,
                refs_sur=[np.stack([s[i] for s in refs_sur]) for i in range(len(ensemble.models))],
                unprotected=judge.judge(probe_rgb, original, refs),
                unprotected_sur=[],
            )
        )
    return out


def _calibrate(people: Sequence[_Person], ensemble: Any) -> dict[str, float]:
    """Per surrogate, the cosine threshold at 1% false accepts over this run's impostor pairs.

    Impostor pairs are reference images of two different benchmark people;
    with fewer than 100 such pairs the threshold recorded at training time
    (``manifest.json``) is kept.
    """
    out: dict[str, float] = {}
    owners = np.concatenate([np.full(len(p.refs.files), i) for i, p in enumerate(people)])
    different = owners[:, None] != owners[None, :]
    upper = np.triu(np.ones_like(different), k=1)
    for i, arch in enumerate(ensemble.archs):
        emb = np.concatenate([p.refs_sur[i] for p in people])
        impostor = (emb @ emb.T)[different & upper]
        if impostor.size >= 100:
            out[arch] = float(np.quantile(impostor, 0.99))
        else:
            out[arch] = float(ensemble.thresholds.get(arch, math.nan))
    return out


def _aggregate(verdicts: Sequence[Verdict], sur: Sequence[Sequence[bool]]) -> dict[str, float]:
    """``psr_*``, ``n_undetected_*`` and the mean CNN-judge distance over some verdicts."""
    out: dict[str, float] = {}
    for name, key in PSR_KEYS.items():
        out[key] = float(np.mean([v.protected(name) for v in verdicts]))
    for det in ("cnn", "hog", "mtcnn"):
        out[f"n_undetected_{det}"] = sum(not v.readings[det].detected for v in verdicts)
    out["psr_surrogates"] = float(np.mean([not m for s in sur for m in s])) if sur else math.nan
    out["dlib_distance"] = float(np.nanmean([v.readings["cnn"].mean_distance for v in verdicts]))
    return out


def _record(
    person: _Person, verdict: Verdict, sur: Sequence[bool], extra: dict[str, Any]
) -> dict[str, Any]:
    def readings(v: Verdict) -> dict[str, Any]:
        return {name: r.to_json() for name, r in v.readings.items()}

    return {
        "name": person.name,
        "probe": person.probe.name,
        "references": [Path(f).name for f in person.refs.files],
        "original_found": dict(person.original.found),
        "unprotected": readings(person.unprotected),
        "protected": readings(verdict),
        "surrogates_matched_unprotected": list(person.unprotected_sur),
        "surrogates_matched": list(sur),
        **extra,
    }


def run_protect_bench(
    cfg: ProtectBenchConfig,
    *,
    epsilons: Sequence[float | None] = (None,),
    ssim_floors: Sequence[float] | None = None,
    selection: PeopleSelection | None = None,
) -> ProtectBenchRun:
    """Run the benchmark for each budget in ``epsilons`` (``None``: the preset's).

    With ``ssim_floors``, each floor is one budget instead (at ``cfg.epsilon``):
    the psr-against-SSIM curve of the preset as the user would tighten or
    loosen its floor.

    The people are chosen by :func:`select_people` unless ``selection`` is
    given; the run's selection also counts the people dropped for want of a face.
    The references are embedded once and shared by every budget.
    """
    import torch

    from veilface.client.protect.adversarial import cloak
    from veilface.client.protect.image_quality import psnr, ssim
    from veilface.client.protect.surrogates import load_ensemble
    from veilface.errors import FaceError

    torch.set_num_threads(max(1, cfg.threads))
    if selection is None:
        selection = select_people(
            cfg.images,
            cfg.people,
            max_people=cfg.max_people,
            train_data=cfg.train_data,
            weights_dir=cfg.weights,
        )
    judge = DlibJudge(cnn_upsample=cfg.cnn_upsample, mtcnn_weights=cfg.mtcnn_weights)
    judge.load()
    ensemble = load_ensemble(cfg.weights)
    people = _prepare(cfg, selection, judge, ensemble)
    if not people:
        raise InvalidArgument(
            f"no selected person has a face dlib can find: {selection.summary_line()}"
        )
    logger.info(selection.summary_line())
    ensemble.thresholds = _calibrate(people, ensemble)
    for p in people:
        p.unprotected_sur = _sur_matched(ensemble, p, p.probe_rgb)
    results = []
    budgets: list[tuple[float | None, float | None]] = (
        [(cfg.epsilon, f) for f in ssim_floors]
        if ssim_floors
        else [(e if e is not None else cfg.epsilon, cfg.ssim_floor) for e in epsilons]
    )
    for eps, floor in budgets:
        label = f"SSIM >= {floor:g}" if ssim_floors else (
            "preset" if eps is None else f"eps {eps:g}"
        )
        budget = {
            "preset": cfg.preset,
            "epsilon": eps,
            "ssim_floor": floor,
            "steps": cfg.steps,
        }
        done: list[tuple[_Person, Verdict, list[bool], dict[str, float]]] = []
        refused: list[dict[str, str]] = []
        last: Exception | None = None
        for person in _progress(people, f"protecting ({label})", "img", cfg.progress):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                prot = cloak(
                    person.probe_rgb,
                    preset=cfg.preset,
                    epsilon=budget["epsilon"],
                    ssim_floor=budget["ssim_floor"],
                    steps=cfg.steps,
                    ensemble=ensemble,
                    seed=cfg.seed,
                )
            except (FaceError, InvalidArgument) as exc:  # no face, or a change below the floor
                logger.info("the protector refused %s: %s", person.name, type(exc).__name__)
                refused.append({"name": person.name, "reason": type(exc).__name__})
                last = exc
                continue
            sec, cpu = time.perf_counter() - t0, time.process_time() - c0
            pixels = np.array(prot.pixels)
            verdict = judge.judge(pixels, person.original, person.refs)
            quality = {
                "ssim": ssim(pixels, person.probe_rgb),
                "psnr": psnr(pixels, person.probe_rgb),
                "sec": sec,
                "cpu": cpu,
            }
            done.append((person, verdict, _sur_matched(ensemble, person, pixels), quality))
        if not done:
            raise InvalidArgument(f"every probe was refused by the protector: {last}") from last
        results.append(_result(done, refused, budget, ensemble.thresholds))
    return ProtectBenchRun(results=results, selection=selection)


def _result(
    done: Sequence[tuple[_Person, Verdict, list[bool], dict[str, float]]],
    refused: list[dict[str, str]],
    budget: dict[str, Any],
    thresholds: dict[str, float],
) -> ProtectBenchResult:
    after = _aggregate([d[1] for d in done], [d[2] for d in done])
    before = _aggregate([d[0].unprotected for d in done], [d[0].unprotected_sur for d in done])
    quality = [d[3] for d in done]
    return ProtectBenchResult(
        psr=after["psr"],
        psr_hog=after["psr_hog"],
        psr_mtcnn=after["psr_mtcnn"],
        psr_jpeg75=after["psr_jpeg75"],
        psr_resize=after["psr_resize"],
        psr_blur=after["psr_blur"],
        psr_surrogates=after["psr_surrogates"],
        ssim=float(np.mean([q["ssim"] for q in quality])),
        ssim_min=float(np.min([q["ssim"] for q in quality])),
        psnr=float(np.mean([q["psnr"] for q in quality])),
        sec_per_image=float(np.mean([q["sec"] for q in quality])),
        cpu_sec_per_image=float(np.mean([q["cpu"] for q in quality])),
        n_people=len(done),
        n_refused=len(refused),
        refused=refused,
        n_undetected_cnn=int(after["n_undetected_cnn"]),
        n_undetected_hog=int(after["n_undetected_hog"]),
        n_undetected_mtcnn=int(after["n_undetected_mtcnn"]),
        dlib_distance_before=before["dlib_distance"],
        dlib_distance_after=after["dlib_distance"],
        budget=budget,
        baseline={**before, **{f"surrogate_threshold_{a}": t for a, t in thresholds.items()}},
        people=[_record(p, v, s, q) for p, v, s, q in done],
    )


def format_table(results: Sequence[ProtectBenchResult]) -> str:
    """A plain-text table of the results, one row per budget, plus the unprotected baseline."""
    cols = ("psr", "psr_hog", "psr_mtcnn", "psr_jpeg75", "psr_resize", "psr_blur", "psr_surrogates")
    short = ("psr", "hog", "mtcnn", "jpeg75", "resize", "blur", "sur")
    head = (
        f"{'budget':>11s} "
        + " ".join(f"{c:>6s}" for c in short)
        + f" {'ssim':>6s} {'min':>6s} {'psnr':>6s} {'s/img':>6s} {'cpu s':>6s} {'n':>4s}"
        + f" {'undet c/h/m':>11s} {'dist':>6s}"
    )
    lines = [head]
    for r in results:
        label = _budget_label(r.budget)
        und = f"{r.n_undetected_cnn}/{r.n_undetected_hog}/{r.n_undetected_mtcnn}"
        lines.append(
            f"{label:>11s} "
            + " ".join(f"{getattr(r, c):6.3f}" for c in cols)
            + f" {r.ssim:6.3f} {r.ssim_min:6.3f} {r.psnr:6.2f} {r.sec_per_image:6.2f}"
            f" {r.cpu_sec_per_image:6.2f} {r.n_people:4d} {und:>11s} {r.dlib_distance_after:6.3f}"
        )
    if results:
        b, n = results[0].baseline, results[0].n_people
        und = (
            f"{b['n_undetected_cnn']:.0f}/{b['n_undetected_hog']:.0f}/{b['n_undetected_mtcnn']:.0f}"
        )
        lines.append(
            f"{'unprotected':>11s} "
            + " ".join(f"{b[c]:6.3f}" for c in cols)
            + f" {1.0:6.3f} {1.0:6.3f} {'inf':>6s} {'–':>6s} {'–':>6s} {n:4d} {und:>11s}"
            f" {b['dlib_distance']:6.3f}"
        )
    return "\n".join(lines)


def to_json(
    results: Sequence[ProtectBenchResult], selection: PeopleSelection | None = None
) -> dict[str, Any]:
    """The JSON document: the first budget's figures at top level, every budget under ``sweep``."""
    doc: dict[str, Any] = {**asdict(results[0]), "threshold": DLIB_THRESHOLD}
    if selection is not None:
        doc["selection"] = selection.to_json()
    if len(results) > 1:
        doc["sweep"] = [asdict(r) for r in results]
    return doc


def write_json(
    results: Sequence[ProtectBenchResult], path: Path, selection: PeopleSelection | None = None
) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results, selection), indent=2, default=float) + "\n")


def _budget_label(budget: dict[str, Any]) -> str:
    """``eps 32``, ``SSIM >= 0.9`` (a floor sweep) or the preset's name."""
    eps, floor = budget.get("epsilon"), budget.get("ssim_floor")
    if floor is not None and eps is None:
        return f"SSIM>={floor:g}"
    if eps is not None:
        return f"eps {eps:g}"
    return str(budget.get("preset"))


def plot_sweep(results: Sequence[ProtectBenchResult], path: Path) -> None:
    """PNG of psr (CNN judge), psr_hog and psr_jpeg75 against mean SSIM (needs matplotlib).

    One point per budget, labelled with its epsilon, plus the unprotected
    photos at SSIM 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(results, key=lambda r: r.ssim)
    x = [r.ssim for r in pts] + [1.0]
    base = results[0].baseline
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, style, label in (
        ("psr", "o-", "psr: dlib recognizer on dlib CNN detector's face"),
        ("psr_jpeg75", "s--", "psr after JPEG q75"),
        ("psr_hog", "v:", "psr_hog: dlib HOG detector + recognizer (no fallback)"),
    ):
        lw = 2.5 if key == "psr" else 1.2
        ax.plot(x, [getattr(r, key) for r in pts] + [base[key]], style, lw=lw, ms=6, label=label)
    for r in pts:
        ax.annotate(
            _budget_label(r.budget),
            (r.ssim, r.psr),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=7,
        )
    ax.axhline(0.8, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("mean SSIM to the original photo")
    ax.set_ylabel("protection success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    floors = {r.budget.get("ssim_floor") for r in results}
    floor = floors.pop() if len(floors) == 1 else None
    ax.set_title(
        f"veilface cloak vs dlib's recognizer, n={results[0].n_people} people"
        + (f", SSIM floor {floor}" if floor is not None else ""),
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "DLIB_THRESHOLD",
    "PSR_KEYS",
    "ProtectBenchConfig",
    "ProtectBenchResult",
    "ProtectBenchRun",
    "format_table",
    "plot_sweep",
    "run_protect_bench",
    "to_json",
    "write_json",
]
