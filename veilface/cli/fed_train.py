"""``veilface fed train --task pad --export liveness.vfpad``: train and export the liveness model.

Runs the incremental-PAD Flower app on the kiosk proxy's sites
(:func:`veilface.federated.pad.export.train_and_export`) and writes a
``.vfpad`` artifact the client loads with ``FacePipeline(liveness=PATH)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from veilface.errors import InvalidArgument


def register_train(fed_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = fed_sub.add_parser(
        "train",
        help="train a task with Flower and export its model (pad: the client's liveness model)",
        description="Train the liveness (PAD) model with the incremental-PAD Flower app "
        "(Simulation Engine; domains in sequence, prompts + Selective EWC) on the kiosk "
        "proxy sites and export it as a .vfpad artifact.",
    )
    t.add_argument("--task", choices=["pad"], required=True)
    t.add_argument("--export", type=Path, required=True, help="where to write the .vfpad artifact")
    t.add_argument("--lfw", type=Path, help="LFW folder (default $VEILFACE_DATA/lfw or "
                   "../shared/data/lfw)")
    t.add_argument("--work-dir", type=Path, default=Path("runs/fed-train"),
                   help="proxy cache, checkpoints and metrics (runs/fed-train)")
    t.add_argument("--per-domain", type=int, default=1100, help="images per domain (1100: about all the training people hold, two photos each)")
    t.add_argument("--renders", type=int, default=1,
                   help="renders of each photo, each with its own species, scene and camera (1)")
    t.add_argument("--rounds", type=int, default=8, help="federated rounds per domain (8)")
    t.add_argument("--local-epochs", type=int, default=2, help="local epochs per round (2)")
    t.add_argument("--sites", type=int, default=2, help="Flower sites (SuperNodes) (2)")
    t.add_argument("--target-bpcer", type=float, default=0.05,
                   help="BPCER on the sites' validation identities the threshold is chosen at "
                   "(0.05)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2, help="CPUs for the run (2)")
    t.add_argument("--json", type=Path, help="also write the export report as JSON")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from veilface.cli.fed import _default_lfw
    from veilface.federated.pad.export import KioskTrainConfig, train_and_export

    if getattr(args, "verbose", 0) < 2:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    lfw = Path(args.lfw or _default_lfw())
    if not lfw.is_dir():
        raise InvalidArgument(f"no LFW folder at {lfw}; set VEILFACE_DATA or pass --lfw")
    if args.export.suffix != ".vfpad":
        raise InvalidArgument(f"--export must name a .vfpad file, got {args.export}")
    cfg = KioskTrainConfig(
        lfw_dir=str(lfw),
        work_dir=str(args.work_dir),
        per_domain=args.per_domain,
        renders=args.renders,
        rounds_per_domain=args.rounds,
        local_epochs=args.local_epochs,
        num_sites=args.sites,
        target_bpcer=args.target_bpcer,
        seed=args.seed,
        threads=args.threads,
    )
    args.export.parent.mkdir(parents=True, exist_ok=True)
    report = train_and_export(cfg, args.export, progress=not args.no_progress)
    out: dict[str, Any] = asdict(report)
    print(f"wrote {report.path}: fingerprint {report.fingerprint[:16]}…, "
          f"{report.parameters:,} weights")
    print(f"threshold P(live) >= {report.threshold:.4f}: BPCER {100 * report.validation_bpcer:.1f} % "
          f"APCER {100 * report.validation_apcer:.1f} % on {report.validation_images} validation "
          "images of the training sites (PROXY data)")
    print(f"{report.seconds:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


__all__ = ["register_train", "run_train"]
