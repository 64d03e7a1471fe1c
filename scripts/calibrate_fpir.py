"""Regenerate the 1:N threshold calibration of a face model and its held-out report.

    veilface embed ../shared/data/lfw --out lfw_dlib_all.npz --min-images 1 --max-per-person 2
    python scripts/calibrate_fpir.py lfw_dlib_all.npz \\
        --out client/calibration/dlib-lfw.json --report docs/bench/fpir-dlib-lfw.json

Several ``.npz`` files (shards of one ``veilface embed`` run over disjoint
people) may be given; their rows are concatenated. People are split at
random (``--seed``) into a fit half, whose impostor pairs make the
calibration, and a held-out half, on which FPIR and FNIR are measured
(``veilface/bench/fpir.py``; the rule is in ``client/thresholds.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: How the shipped calibration's embeddings were made (in 16 shards of people, merged in name order).
EMBED_COMMAND = "veilface embed ../shared/data/lfw --out lfw_dlib_all.npz --min-images 1 --max-per-person 2"


def main(argv: list[str] | None = None) -> int:
    from veilface.bench.fpir import (
        HeldOut,
        calibration_to_dict,
        empirical_max_threshold,
        evaluate,
        fit_calibration,
        genuine_scores,
        impostor_scores,
        split_identities,
        unit_rows,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("embeddings", type=Path, nargs="+", help="npz files with emb [n, d] and labels [n]")
    ap.add_argument("--model", default="dlib")
    ap.add_argument("--out", type=Path, required=True, help="the calibration JSON the SDK ships")
    ap.add_argument("--report", type=Path, help="the held-out figures, as JSON")
    ap.add_argument("--target-fpir", type=float, default=0.01)
    ap.add_argument("--sizes", default="200,1000,100000")
    ap.add_argument("--draws", type=int, default=5, help="random galleries per probe")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    embs, labs = [], []
    for path in args.embeddings:
        with np.load(path, allow_pickle=False) as d:
            embs.append(np.asarray(d["emb"], dtype=np.float64))
            labs.append(np.asarray(d["labels"]).astype(str))
    x, labels = unit_rows(np.concatenate(embs)), np.concatenate(labs)
    fit, held = split_identities(labels, seed=args.seed)
    scores = impostor_scores(x[fit], labels[fit])
    people = len(np.unique(labels))
    source = (
        f"LFW (deep-funneled), dlib ResNet 128-d via veilface embed, {len(x)} images of {people} "
        f"people; fit on {len(np.unique(labels[fit]))} of them ({int(fit.sum())} images, "
        f"{len(scores):,} impostor pairs), seed {args.seed}"
    )
    cal = fit_calibration(scores, model=args.model, dim=x.shape[1], source=source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(calibration_to_dict(cal), indent=1) + "\n")
    print(f"wrote {args.out}: {len(cal.table)} table points, tail {cal.tail}")

    sizes = tuple(int(s) for s in args.sizes.split(","))
    held_out = HeldOut.make(x[held], labels[held])
    figures = evaluate(
        cal, held_out, sizes, target_fpir=args.target_fpir, draws=args.draws, seed=args.seed,
        extra_thresholds={"0.92": 0.92},
    )
    fit_people = len(np.unique(labels[fit]))
    empirical_max = {
        str(n): empirical_max_threshold(x[fit], labels[fit], n, args.target_fpir, seed=args.seed)
        for n in sizes
        if n < fit_people
    }
    gen = genuine_scores(x[held], labels[held])
    report = {
        "calibration": str(args.out),
        "source": source,
        "target_fpir": args.target_fpir,
        "held_out_people": len(held_out.gallery),
        "held_out_images": len(held_out.probes),
        "held_out_mated_people": len(held_out.mated),
        "genuine_cosine_mean_std": [float(gen.mean()), float(gen.std())],
        "impostor_cosine_mean_std_fit": [float(scores.mean()), float(scores.std())],
        "fmr_at": {f"{t:.3f}": cal.fmr(t) for t in (0.90, 0.92, 0.94, 0.95, 0.96)},
        "by_gallery_size": figures,
        "empirical_max_threshold_fit": empirical_max,
        "command": "python scripts/calibrate_fpir.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "embeddings_made_with": EMBED_COMMAND,
    }
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.report}")
    for n, row in figures.items():
        kind = "held-out" if row["empirical"] else "model (extrapolated)"
        print(
            f"N={n:>7}: threshold {row['threshold']:.4f}; FPIR {row.get('fpir', row['fpir_model']):.4f}, "
            f"FNIR {row.get('fnir', row['fnir_model']):.4f} ({kind}); model FPIR "
            f"{row['fpir_model']:.4f} FNIR {row['fnir_model']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
