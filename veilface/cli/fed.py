"""``veilface fed``: federated training commands (Flower).

``veilface fed bench --task vireid|pad --json PATH`` runs a task's proxy
benchmark end to end. Each task maps to a ``(module, function)`` in
:data:`BENCH_TASKS`; the function takes the parsed arguments and returns a
JSON-ready dict. To add a task, add one entry and one ``_bench_<task>``
function.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from veilface.errors import InvalidArgument


def _default_lfw() -> Path:
    env = os.environ.get("VEILFACE_DATA")
    if env:
        return Path(env) / "lfw"
    return Path.cwd().parent / "shared" / "data" / "lfw"


def _bench_vireid(args: argparse.Namespace) -> dict[str, Any]:
    from veilface.federated.vireid.bench import VIReIDBenchConfig, run_vireid_bench

    given = {
        key: value
        for key, value in (
            ("rounds", args.rounds),
            ("local_epochs", args.local_epochs),
            ("lr", args.lr),
            ("server_momentum", args.server_momentum),
            ("proto_source", args.proto_source),
        )
        if value is not None  # otherwise VIReIDBenchConfig's default
    }
    cfg = VIReIDBenchConfig(
        lfw_dir=str(args.lfw or _default_lfw()),
        work_dir=str(args.work_dir),
        protocol=args.protocol,
        **given,
        num_train_ids=args.train_ids,
        num_test_ids=args.test_ids,
        image_size=args.image_size,
        seed=args.seed,
        threads=args.threads,
    )
    result: dict[str, Any] = run_vireid_bench(cfg, progress=not args.no_progress)
    return result


def _print_vireid(result: dict[str, Any]) -> None:
    rows = [
        ("l2rw (ours)", result["rank1"], result["map"], result["minp"]),
        ("plain FedAvg", result["fedavg_rank1"], result["fedavg_map"], result["fedavg_minp"]),
        (
            "centralized",
            result["centralized_rank1"],
            result["centralized_map"],
            result["centralized_minp"],
        ),
    ]
    print(f"{result['benchmark']}, {result['protocol']}")
    print(f"{'method':<14} {'Rank-1':>7} {'mAP':>7} {'mINP':>7}")
    for name, r1, m, inp in rows:
        print(f"{name:<14} {100 * r1:7.1f} {100 * m:7.1f} {100 * inp:7.1f}")
    for key in ("rank1_over_fedavg", "rank1_over_centralized"):
        value = result[key]
        print(f"{key}: {'n/a' if value is None else f'{value:.2f}'}")
    for target, ok in result["targets"].items():
        print(f"target {target}: {'met' if ok else 'NOT met'}")
    print(f"total {result['seconds']['total']:.0f} s; plot {result['plot']}")


def _whole(value: float, flag: str) -> int:
    if not float(value).is_integer():
        raise InvalidArgument(f"{flag} must be a whole number for this task, got {value}")
    return int(value)


def _bench_pad(args: argparse.Namespace) -> dict[str, Any]:
    from veilface.federated.pad.bench import PADBenchConfig, run_pad_bench

    lfw = Path(args.lfw or _default_lfw())
    cfg = PADBenchConfig(
        lfw_dir=str(lfw),
        samples_dir=str(lfw.parent / "pad-samples"),
        work_dir=str(args.work_dir),
        image_size=args.image_size,
        rounds_per_domain=args.rounds if args.rounds is not None else 8,
        local_epochs=(
            _whole(args.local_epochs, "--local-epochs") if args.local_epochs is not None else 2
        ),
        seed=args.seed,
        threads=args.threads,
    )
    result: dict[str, Any] = run_pad_bench(cfg, progress=not args.no_progress)
    return result


def _print_pad(result: dict[str, Any]) -> None:
    from veilface.federated.pad.bench import print_pad_table

    print_pad_table(result)


# task -> (bench function, table printer). The PAD task adds its entry here.
BENCH_TASKS: dict[
    str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], None]]
] = {
    "vireid": (_bench_vireid, _print_vireid),
    "pad": (_bench_pad, _print_pad),
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("fed", help="federated training (Flower): proxy benchmarks")
    fed_sub = p.add_subparsers(dest="fed_command", required=True)
    b = fed_sub.add_parser(
        "bench",
        help="run a federated proxy benchmark end to end",
        description="Run the task's proxy benchmark with real Flower rounds (Simulation "
        "Engine) and print a table; --json writes the full results.",
    )
    b.add_argument("--task", choices=sorted(BENCH_TASKS), required=True)
    b.add_argument("--json", type=Path, help="write the results as JSON to this file")
    b.add_argument("--work-dir", type=Path, default=Path("runs/fed-bench"),
                   help="proxy cache, checkpoints, metrics and plots (runs/fed-bench)")
    b.add_argument("--lfw", type=Path, help="LFW folder (default $VEILFACE_DATA/lfw or "
                   "../shared/data/lfw)")
    b.add_argument("--rounds", type=int, help="federated rounds (task default)")
    b.add_argument("--local-epochs", type=float,
                   help="local epochs per round (vireid 0.5, pad 2; vireid may be fractional)")
    b.add_argument("--lr", type=float, help="vireid: Adam learning rate of every method (0.003)")
    b.add_argument("--server-momentum", type=float,
                   help="vireid: FedAvgM beta of the l2rw method (0.5); 0 = plain averaging")
    b.add_argument("--proto-source", choices=("local", "global"),
                   help="vireid: l2rw sites embed their prototypes with the global model they "
                   "received (global, default) or with the model they just trained (local)")
    b.add_argument("--protocol", default="camera-isolation",
                   choices=("camera-isolation", "entity-isolation", "entity-sharing"),
                   help="vireid: site partition (camera-isolation)")
    b.add_argument("--train-ids", type=int, default=100, help="vireid: training identities (100)")
    b.add_argument("--test-ids", type=int, default=50, help="vireid: test identities (50)")
    b.add_argument("--image-size", type=int, default=48, help="vireid: image side in pixels (48)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=2,
                   help="CPU threads for the whole run: Ray CPUs (sites training at once, one "
                   "torch thread each) and torch threads of the server/centralized parts (2)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_bench)

    from veilface.cli.fed_train import register_train

    register_train(fed_sub)


def run_bench(args: argparse.Namespace) -> int:
    if args.task not in BENCH_TASKS:
        raise InvalidArgument(f"unknown task {args.task!r}; choose from {sorted(BENCH_TASKS)}")
    if args.verbose < 2:  # Flower logs every round at INFO through its own handler
        logging.getLogger("flwr").setLevel(logging.WARNING)
    bench, show = BENCH_TASKS[args.task]
    result = bench(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    show(result)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


__all__ = ["BENCH_TASKS", "register", "run_bench"]
