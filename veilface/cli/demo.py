"""``veilface demo``: the whole job on a local server, narrated.

Starts a server on an embedded SQLite store in a temporary folder, creates a
tenant, generates its keys, enrolls a gallery (bulk, then one template on
its own), identifies probes in strict and routed mode, verifies a genuine
and an impostor claim, deletes a subject and shows it is gone.

Faces: with ``--images DIR`` (``<person>/<photo>`` folders, e.g. LFW) the
dlib pipeline embeds real photos; by default it uses the embedded
synthetic templates (no data set ships with the package).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from veilface.cli import common

if TYPE_CHECKING:
    from veilface.client.sdk import Identification, VeilClient


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the main job end to end on a local server")
    p.add_argument("--images", type=Path, help="<person>/<photo> folder to embed with dlib")
    p.add_argument("--people", type=int, default=200, help="gallery size")
    p.add_argument("--probes", type=int, default=10)
    p.set_defaults(func=run)


def _photos(root: Path, people: int) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    from veilface.client.face import FacePipeline
    from veilface.errors import FaceError

    # LFW photos as a synthetic gallery for the demo, not captures at a camera: no liveness
    # gate (`veilface identify --image` runs it).
    pipe = FacePipeline(on_multiple="largest", liveness=None)
    gal, gl, pro, pl = [], [], [], []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        photos = sorted(person.iterdir())
        if len(photos) < 2:
            continue
        try:
            a, b = pipe.embed(photos[0]).vector, pipe.embed(photos[1]).vector
        except FaceError:
            continue
        gal.append(a)
        gl.append(person.name)
        pro.append(b)
        pl.append(person.name)
        if len(gal) >= people:
            break
    return np.array(gal), gl, np.array(pro), pl


def _threshold_note(r: Identification, client: VeilClient) -> str:
    """Why the decision used its threshold, in a few words."""
    if r.threshold_source == "calibrated":
        model = client.thresholds.model
        return f"{model} at {client.thresholds.target_fpir:.0%} FPIR for {r.gallery_size} subjects"
    return f"{r.threshold_source} threshold"


def run(args: argparse.Namespace) -> int:
    from veilface.bench.synthetic import SyntheticFaces
    from veilface.client.admin import AdminClient
    from veilface.client.sdk import VeilClient
    from veilface.client.tenant_state import TenantState
    from veilface.server.launcher import LocalServer

    if args.images:
        print(f"embedding faces from {args.images} with the dlib pipeline ...")
        gal, names, probes, probe_names = _photos(args.images, args.people)
        source = f"{len(gal)} people from {args.images} (dlib, 128-d)"
    else:
        emb, labels = SyntheticFaces().sample(args.people, 2, seed=7)
        gal, probes = emb[0::2], emb[1::2]
        names = probe_names = [str(x) for x in labels[0::2]]
        source = f"{len(gal)} synthetic identities (embedded default; pass --images for photos)"
    n_probe = min(args.probes, len(probes))

    # Taken out of the environment before the server starts, so it never inherits it.
    passphrase = common.take_env_passphrase() or "demo passphrase"
    with tempfile.TemporaryDirectory(prefix="veilface-demo-") as tmp:  # noqa: SIM117
        with LocalServer(Path(tmp) / "demo.db") as srv:
            print(f"1. server up on {srv.target}, store {srv.db_path}")
            with AdminClient(srv.target, token=srv.admin_token) as admin:
                token = admin.create_tenant("demo").api_token
            state = TenantState.new("demo", dim=gal.shape[1])
            # The 1:1 threshold (verify) for dlib on LFW; identify raises it for the gallery's
            # size to a 1% false-positive identification rate (client/thresholds.py).
            state.threshold = 0.92
            state_path = Path(tmp) / "tenant.vfk"
            state.save(state_path, passphrase=passphrase)
            print(f"2. tenant 'demo' created; CKKS keys generated, secret key sealed in {state_path.name}")
            with VeilClient(srv.target, state, token=token) as client:
                info = client.register_key()
                print(
                    f"3. public context registered ({info.param_set}, {info.n_ciphertexts} ciphertexts/bin, "
                    f"{info.capacity} slots/bin); the server holds no secret key"
                )
                client.train_routing(gal, nlist=max(1, len(gal) // 64))
                t = time.perf_counter()
                client.enroll_many(names[:-1], gal[:-1])
                client.enroll(names[-1], gal[-1])
                print(
                    f"4. enrolled {source}: {len(gal) - 1} in bulk + 1 on its own "
                    f"({(time.perf_counter() - t):.2f} s)"
                )
                for mode in ("strict", "routed"):
                    correct, accepted, times = 0, 0, []
                    for p, want in zip(probes[:n_probe], probe_names[:n_probe], strict=True):
                        r = client.identify(p, mode=mode, nprobe=2)
                        correct += int(r.subject_id == want)
                        accepted += int(r.subject_id == want and r.match)
                        times.append(r.stats.total_ms)
                    print(
                        f"5. identify ({mode}): {correct}/{n_probe} probes found their own subject first, "
                        f"{accepted} of them above the threshold {r.threshold:.3f} "
                        f"({_threshold_note(r, client)}), median {np.median(times):.0f} ms"
                    )
                g = client.verify(names[0], probes[0])
                i = client.verify(names[1], probes[0])
                print(
                    f"6. verify: genuine claim cosine {g.score:.3f} -> {'accept' if g.match else 'reject'}; "
                    f"impostor claim cosine {i.score:.3f} -> {'accept' if i.match else 'reject'}"
                )
                client.delete(names[0])
                after = client.identify(probes[0])
                print(
                    f"7. deleted {names[0]}; its probe now finds {after.subject_id} at cosine "
                    f"{after.score:.3f} -> {'match' if after.match else 'no match'} "
                    f"(threshold {after.threshold:.3f}: {_threshold_note(after, client)})"
                )
                desc = client.describe().keys[0]
                print(
                    f"8. server holds {desc.subjects} subjects in {desc.bins} bins of {info.capacity} "
                    f"slots ({desc.stored_bytes / 2**20:.1f} MiB of ciphertexts; bins are sized for "
                    f"large galleries, so a tiny one pays for empty slots)"
                )
    print("done: the server never saw a template, a probe or a score in clear.")
    return 0
