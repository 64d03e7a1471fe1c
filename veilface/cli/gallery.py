"""``veilface enroll | identify | verify | delete | repack | rotate``: the tenant's gallery.

Photos (``--image``, ``--images``) go through the face pipeline and its
liveness gate before anything is sent: the shipped model by default, the
user's with ``--liveness PATH``, none with ``--no-liveness`` (printed). A
photo refused as a presentation attack ends the command with
:data:`~veilface.cli.common.EXIT_ATTACK` (3) and its score and threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from veilface.cli import common
from veilface.errors import InvalidArgument


def _add_input(p: argparse.ArgumentParser, *, many: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", type=Path, help="npz with arrays emb [n, d] and labels [n]")
    if many:
        src.add_argument("--images", type=Path, help="folder of <subject>/<image> files (dlib pipeline)")
    else:
        src.add_argument("--image", type=Path, help="a face photo (dlib pipeline)")
        p.add_argument("--row", type=int, default=0, help="row of --embeddings to use")
    g = p.add_argument_group("liveness (anti-spoofing) gate of --image/--images")
    which = g.add_mutually_exclusive_group()
    which.add_argument(
        "--liveness", type=Path, metavar="PATH",
        help="your liveness artifact (.vfpad, from veilface fed train --task pad --export) "
        "instead of the shipped default",
    )
    which.add_argument(
        "--no-liveness", action="store_true",
        help="skip the liveness check explicitly (printed, and recorded in --json output)",
    )
    g.add_argument(
        "--liveness-policy", choices=["refuse", "record"], default="refuse",
        help="refuse (default): a print or screen replay ends the command with exit status 3; "
        "record: go on, and report the score",
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("enroll", help="enroll templates (bulk from a file, or from face photos)")
    common.add_state_options(p)
    common.add_server_options(p)
    _add_input(p, many=True)
    p.add_argument("--first-only", action="store_true", help="enroll only the first row of each label")
    p.add_argument("--nlist", type=int, default=0, help="train IVF routing with this many lists first")
    p.add_argument("--single", action="store_true", help="enroll one by one instead of bulk")
    p.set_defaults(func=enroll)

    p = sub.add_parser("identify", help="1:N search of one probe")
    common.add_state_options(p)
    common.add_server_options(p)
    _add_input(p, many=False)
    p.add_argument("--mode", choices=["strict", "routed"], default="strict")
    p.add_argument(
        "--k", type=int, default=None,
        help="candidates kept after preselection (default: the SDK's choice for the gallery)",
    )
    p.add_argument("--nprobe", type=int, default=None, help="lists probed (default: the SDK's choice)")
    p.add_argument("--decoys", type=int, default=0)
    p.set_defaults(func=identify)

    p = sub.add_parser("verify", help="1:1 against a claimed subject")
    common.add_state_options(p)
    common.add_server_options(p)
    _add_input(p, many=False)
    p.add_argument("--subject", required=True)
    p.set_defaults(func=verify)

    p = sub.add_parser("delete", help="delete a subject (its bin is re-packed without it)")
    common.add_state_options(p)
    common.add_server_options(p)
    p.add_argument("--subject", required=True)
    p.set_defaults(func=delete)

    p = sub.add_parser(
        "repack", help="retrain the routing lists on the enrolled gallery and re-pack it atomically"
    )
    common.add_state_options(p)
    common.add_server_options(p)
    p.add_argument(
        "--nlist", type=int, default=None,
        help="number of IVF lists to train (default: the SDK chooses them, with nprobe and k, "
        "from the gallery, or keeps the number given last time)",
    )
    p.set_defaults(func=repack)

    p = sub.add_parser(
        "rotate", help="key rotation: a new CKKS key, the gallery moved to it atomically"
    )
    common.add_state_options(p)
    common.add_server_options(p)
    p.add_argument("--key-id", required=True, help="id of the new key")
    p.add_argument("--new-state", type=Path, required=True, help="where to save the new key's state")
    p.set_defaults(func=rotate)


def liveness_options(args: argparse.Namespace) -> dict[str, Any]:
    """``VeilClient``'s ``liveness=``/``liveness_policy=`` from the options (photos only)."""
    from veilface.client.liveness.gate import DEFAULT_LIVENESS

    given = args.liveness is not None or args.no_liveness or args.liveness_policy != "refuse"
    if args.embeddings is not None:
        if given:
            raise InvalidArgument(
                "--liveness, --no-liveness and --liveness-policy apply to --image/--images, "
                "not to --embeddings"
            )
        return {}
    if args.no_liveness:
        print(
            "veilface: liveness check skipped (--no-liveness): prints and screen replays are "
            "not refused",
            file=sys.stderr,
        )
        return {"liveness": None}
    chosen = DEFAULT_LIVENESS if args.liveness is None else args.liveness
    return {"liveness": chosen, "liveness_policy": args.liveness_policy}


def liveness_text(result: Any) -> str:
    """One line on a photo's liveness decision (a LivenessScore or the skipped marker)."""
    if getattr(result, "skipped", False):
        return "liveness: not checked (--no-liveness)"
    verdict = "live" if result.live else "ATTACK, recorded (--liveness-policy record)"
    rel = ">=" if result.live else "<"
    return f"liveness: {verdict} (score {result.score:.3f} {rel} threshold {result.threshold:.3f})"


def _enroll_folder(args: argparse.Namespace) -> int:
    with common.client(args, **liveness_options(args)) as c:
        scan = c.images.scan_folder(args.images, progress=not args.json)
        if scan.subject_ids and args.nlist:
            c.train_routing(scan.embeddings, nlist=args.nlist)
            c.state.save(args.state, **common.secret_args(args))
        report = c.images.enroll_scan(scan, single=args.single)
        c.state.save(args.state, **common.secret_args(args))
    refused = ", ".join(f"{n} {reason}" for reason, n in report.refused.items())
    text = (
        f"enrolled {report.subjects} subjects from {scan.photos_examined} photos; "
        f"{len(scan.refusals)} refused" + (f" ({refused})" if refused else "")
    )
    if scan.without_photo:
        text += f"; {len(scan.without_photo)} subjects had no usable photo"
    common.emit(args, report.to_json(), text)
    return 0


def enroll(args: argparse.Namespace) -> int:
    if args.images:
        return _enroll_folder(args)
    liveness_options(args)  # refuses liveness options given with --embeddings
    emb, labels = common.load_embeddings(args.embeddings)
    if args.first_only:
        seen: dict[str, int] = {}
        for i, lab in enumerate(labels):
            seen.setdefault(lab, i)
        idx = list(seen.values())
        emb, labels = emb[idx], [labels[i] for i in idx]
    with common.client(args) as c:
        if args.nlist:
            c.train_routing(emb, nlist=args.nlist)
            c.state.save(args.state, **common.secret_args(args))
        if args.single:
            for lab, e in zip(labels, emb, strict=True):
                c.enroll(lab, e)
            bins, subjects = -1, len(labels)
        else:
            r = c.enroll_many(labels, emb, progress=not args.json)
            bins, subjects = r.bins, r.subjects
        # The first enrollment fixes the key's centering vector: keep it.
        c.state.save(args.state, **common.secret_args(args))
    common.emit(args, {"subjects": subjects, "bins": bins}, f"enrolled {subjects} subjects")
    return 0


def _probe(args: argparse.Namespace) -> np.ndarray:
    emb, _ = common.load_embeddings(args.embeddings)
    if not 0 <= args.row < len(emb):
        raise InvalidArgument(f"--row must be in [0, {len(emb)})")
    return np.asarray(emb[args.row])


def _with_liveness(payload: dict[str, Any], text: str, capture: Any) -> tuple[dict[str, Any], str]:
    if capture is None:
        return payload, text
    from veilface.client.liveness.gate import liveness_record

    payload["liveness"] = liveness_record(capture.liveness)
    return payload, f"{text}\n{liveness_text(capture.liveness)}"


def identify(args: argparse.Namespace) -> int:
    search = {"mode": args.mode, "k": args.k, "nprobe": args.nprobe, "decoys": args.decoys}
    capture = None
    if args.image:
        with common.client(args, **liveness_options(args)) as c:
            got = c.identify_image(args.image, **search)
        r, capture = got.identification, got.capture
    else:
        liveness_options(args)
        probe = _probe(args)
        with common.client(args) as c:
            r = c.identify(probe, **search)
    payload: dict[str, Any] = {
        "subject": r.subject_id,
        "score": r.score,
        "match": r.match,
        "candidates": [[x.subject_id, x.score] for x in r.candidates[:5]],
        "stats": vars(r.stats),
        "mode": r.mode.value,
        "fallback": r.fallback,
    }
    verdict = "match" if r.match else "no match"
    text = f"{verdict}: {r.subject_id} (cosine {r.score:.4f}) in {r.stats.total_ms:.0f} ms"
    if r.fallback:
        text += f"\nran strict: {r.fallback}"
    common.emit(args, *_with_liveness(payload, text, capture))
    return 0


def verify(args: argparse.Namespace) -> int:
    capture = None
    if args.image:
        with common.client(args, **liveness_options(args)) as c:
            got = c.verify_image(args.subject, args.image)
        r, capture = got.verification, got.capture
    else:
        liveness_options(args)
        probe = _probe(args)
        with common.client(args) as c:
            r = c.verify(args.subject, probe)
    payload = {"subject": r.subject_id, "score": r.score, "match": r.match}
    text = f"{'accepted' if r.match else 'rejected'}: {r.subject_id} (cosine {r.score:.4f})"
    common.emit(args, *_with_liveness(payload, text, capture))
    return 0


def delete(args: argparse.Namespace) -> int:
    with common.client(args) as c:
        c.delete(args.subject)
    common.emit(args, {"deleted": args.subject}, f"deleted {args.subject}")
    return 0


def repack(args: argparse.Namespace) -> int:
    with common.client(args) as c:
        report = c.repack(nlist=args.nlist, progress=not args.json)
        c.state.save(args.state, **common.secret_args(args))  # the new router
    common.emit(
        args,
        {"subjects": report.subjects, "old_bins": report.old_bins, "new_bins": report.new_bins},
        f"re-packed {report.subjects} subjects from {report.old_bins} bins into {report.new_bins} "
        f"under {args.nlist} lists; {args.state} updated",
    )
    return 0


def rotate(args: argparse.Namespace) -> int:
    from veilface.client.sdk import VeilClient

    with common.client(args) as old:
        new_state = old.state.rotated(args.key_id)
        with VeilClient(
            args.server,
            new_state,
            token=common.token(args),
            root_cert=args.root_cert,
            insecure=getattr(args, "insecure", False),
        ) as new:
            new.register_key()
            # Saved before the move: if the move fails, the new key is kept.
            new_state.save(args.new_state, **common.secret_args(args))
            report = old.repack(target=new, progress=not args.json)
            new_state.save(args.new_state, **common.secret_args(args))  # center and router
    common.emit(
        args,
        {
            "subjects": report.subjects,
            "key_id": report.key_id,
            "new_bins": report.new_bins,
            "photos": report.photos,
            "photo_subjects_left": report.photo_subjects_left,
        },
        f"moved {report.subjects} subjects to key {report.key_id} ({report.new_bins} bins) under "
        f"new handles, re-sealed {report.photos} photos; use --state {args.new_state} from now on"
        + (
            f" (photos of {report.photo_subjects_left} subjects are still under the old key: keep "
            "the old state and run veilface.client.repack.reseal_photos)"
            if report.photo_subjects_left
            else ""
        ),
    )
    return 0
