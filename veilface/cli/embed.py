"""``veilface embed``: embed an LFW-style folder of faces into an ``.npz``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "embed",
        help="embed a folder of faces (<Name>/<Name>_NNNN.jpg) into an npz",
        description="Embed every person's photos with the on-device dlib pipeline; "
        "write emb [n, 128], labels [n], paths [n].",
    )
    p.add_argument("dir", type=Path, help="folder with one sub-folder of photos per person")
    p.add_argument("--out", type=Path, required=True, help="output .npz file")
    p.add_argument("--min-images", type=int, default=2, help="people with fewer are skipped (2)")
    p.add_argument("--max-people", type=int, help="only the first N people, in name order")
    p.add_argument("--max-per-person", type=int, help="at most N photos per person")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from veilface.bench.lfw_embeddings import build_embeddings, save_npz, summary

    result = build_embeddings(
        args.dir,
        min_images=args.min_images,
        max_people=args.max_people,
        max_per_person=args.max_per_person,
        progress=not args.no_progress,
    )
    out = save_npz(args.out, result)
    info = {"out": str(out), **summary(result)}
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        skipped = ", ".join(f"{k} {v}" for k, v in info["skipped"].items()) or "none"
        print(
            f"wrote {out}: {info['rows']} embeddings of {info['people']} people "
            f"({info['images_read']} images read in {info['seconds']} s; skipped: {skipped}; "
            f"dropped {info['dropped_people']} people left with < {args.min_images} good images)"
        )
    return 0


__all__ = ["register", "run"]
