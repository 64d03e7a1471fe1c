"""``veilface bench``: benchmarks that print a table and write JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)
    p = bench.add_parser("identify", help="end-to-end encrypted identification vs plaintext FAISS")
    p.add_argument("--gallery", type=int, default=1000, help="synthetic gallery size")
    p.add_argument("--mode", choices=["strict", "routed"], default="strict")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--embeddings", type=Path, help="npz with emb [n, d] and labels [n]")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (routed; default 0: the SDK chooses)")
    p.add_argument("--nprobe", type=int, default=0, help="lists probed (default 0: the SDK's choice)")
    p.add_argument(
        "--k", type=int, default=None,
        help="candidates after preselection (0: every searched bin; default: the SDK's choice)",
    )
    p.add_argument("--single", type=int, default=40, help="templates enrolled one by one (half staged, half straight into bins)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--presel-dims", type=int, default=0, help="coordinates scored by preselection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--db", default="", metavar="sqlite|PATH|URL",
        help="the store: sqlite (default, a temporary file) or postgresql://... (a scratch "
        "schema of that database, dropped at the end)",
    )
    p.add_argument("--scoring", choices=["local", "ray"], default="local")
    p.add_argument(
        "--ray-address", default="", metavar="HOST:PORT",
        help="the Ray head (default with --scoring ray: start a local cluster of two nodes)",
    )
    p.add_argument(
        "--compare-db", default="", metavar="sqlite,postgresql",
        help="run the same gallery and queries on each store, in one invocation (needs --db "
        "postgresql://...); prints each figure's ratio to the first",
    )
    p.add_argument(
        "--compare-scoring", default="", metavar="local,ray",
        help="the same on each scoring backend (local processes, a Ray cluster)",
    )
    p.add_argument(
        "--concurrency", type=int, default=1, metavar="C",
        help="clients identifying at once, each a process with its own channel (default 1); "
        "reports qps and the latencies under that load",
    )
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=identify)

    p = bench.add_parser("face", help="face pipeline time per photo, end to end (decode to embedding)")
    p.add_argument("--images", type=Path, required=True, help="folder of photos (any depth, e.g. LFW)")
    p.add_argument("--backend", choices=["dlib", "insightface"], default="dlib")
    p.add_argument("--model-dir", type=Path, help="model folder (insightface: its root; required)")
    p.add_argument("--limit", type=int, default=200, help="photos timed, spread over the folder")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (insightface)")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=face)

    p = bench.add_parser("calibrate", help="cosine statistics of an embeddings file vs the synthetic model")
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--json", type=Path)
    p.set_defaults(func=calibrate)

    p = bench.add_parser(
        "pseudo-probes",
        help="the routing tuner's pseudo-probes vs real second photos of an embeddings file",
    )
    p.add_argument("--embeddings", type=Path, required=True, help=".npz from veilface embed (emb, labels)")
    p.add_argument("--nlist", type=int, default=32, help="lists to train on the gallery (32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here")
    p.set_defaults(func=pseudo_probes)

    p = bench.add_parser(
        "chaos", help="hostile RPCs, memory bombs and SIGKILLs against a real server (issue 10)"
    )
    p.add_argument("--fuzz-rpcs", type=int, default=10_000, help="hostile RPCs in all")
    p.add_argument("--kills", type=int, default=20, help="SIGKILL cycles during enrollment")
    p.add_argument("--workers", type=int, default=2, help="server scoring processes")
    p.add_argument("--concurrency", type=int, default=4, help="hostile calls in flight")
    p.add_argument("--gallery", type=int, default=512, help="tenant A's bulk gallery")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=chaos)

    p = bench.add_parser(
        "liveness",
        help="liveness gate: APCER, BPCER, ACER, HTER at the artifact's threshold, ms per face",
    )
    p.add_argument("--model", type=Path, help="liveness artifact (.vfpad; default: the shipped one)")
    p.add_argument(
        "--attacks", type=Path, metavar="DIR",
        help="your own set: DIR/live/ and DIR/attack/ images (attack/<species>/ names species)",
    )
    p.add_argument("--pad-samples", type=Path, help="default $VEILFACE_DATA/pad-samples")
    p.add_argument("--lfw", type=Path, help="LFW for the rendered attacks (default $VEILFACE_DATA/lfw)")
    p.add_argument("--people", type=int, default=100, help="LFW people rendered (unseen by training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-runs", type=int, default=50)
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=liveness)

    from veilface.cli.protect import register_bench

    register_bench(bench)


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def identify(args: argparse.Namespace) -> int:
    from veilface.bench.identify import BenchConfig, format_table, run_identify_bench, write_json
    from veilface.bench.identify_compare import format_compare_table

    cfg = BenchConfig(
        gallery=args.gallery,
        mode=args.mode,
        queries=args.queries,
        embeddings=args.embeddings,
        nlist=args.nlist,
        nprobe=args.nprobe,
        k=args.k,
        single=args.single,
        workers=args.workers,
        seed=args.seed,
        progress=not args.no_progress,
        presel_dims=args.presel_dims,
        db=args.db,
        scoring=args.scoring,
        ray_address=args.ray_address,
        compare_db=_names(args.compare_db),
        compare_scoring=_names(args.compare_scoring),
        concurrency=args.concurrency,
    )
    if cfg.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1")
    result = run_identify_bench(cfg)
    if "runs" in result:
        for label, run in result["runs"].items():
            print(f"== {label}")
            print(format_table(run))
        print(format_compare_table(result))
    else:
        print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def face(args: argparse.Namespace) -> int:
    from veilface.bench.face import FaceBenchConfig, format_table, run_face_bench, write_json

    cfg = FaceBenchConfig(
        images=args.images,
        backend=args.backend,
        model_dir=args.model_dir,
        limit=args.limit,
        threads=args.threads,
        progress=not args.no_progress,
    )
    result = run_face_bench(cfg)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from veilface.bench.synthetic import SyntheticFaces, cosine_stats

    with np.load(args.embeddings, allow_pickle=False) as d:
        real = cosine_stats(d["emb"], d["labels"])
    emb, lab = SyntheticFaces().sample(2000, 3)
    synth = cosine_stats(emb, lab)
    out = {"real": real, "synthetic": synth}
    for k in real:
        print(f"{k:16s} real {real[k]:.4f}   synthetic {synth[k]:.4f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def pseudo_probes(args: argparse.Namespace) -> int:
    from veilface.bench.pseudo_probes import format_report, run_pseudo_probe_check
    from veilface.cli.common import load_embeddings

    emb, labels = load_embeddings(args.embeddings)
    report = run_pseudo_probe_check(emb, labels, nlist=args.nlist, seed=args.seed)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def chaos(args: argparse.Namespace) -> int:
    from veilface.bench.chaos import ChaosConfig, format_table, run_chaos_bench, write_json

    cfg = ChaosConfig(
        fuzz_rpcs=args.fuzz_rpcs,
        kills=args.kills,
        workers=args.workers,
        concurrency=args.concurrency,
        gallery=args.gallery,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result = run_chaos_bench(cfg)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def liveness(args: argparse.Namespace) -> int:
    from veilface.bench.liveness import (
        LivenessBenchConfig,
        format_table,
        run_liveness_bench,
        write_json,
    )

    cfg = LivenessBenchConfig(
        model=args.model,
        pad_samples=args.pad_samples,
        lfw=args.lfw,
        attacks=args.attacks,
        n_people=args.people,
        seed=args.seed,
        timing_runs=args.timing_runs,
        progress=not args.no_progress,
    )
    result = run_liveness_bench(cfg)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
