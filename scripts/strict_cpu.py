"""Core time per template of strict exhaustive identification, in CPU seconds.

``veilface bench identify`` reports wall-clock latencies; on a machine
shared with another job they measure the other job as much as veilface.
This script runs the same kind of gallery (synthetic, bulk-enrolled) and
strict exhaustive queries (``k=0``) and counts the CPU time the server (its
process and scoring workers) and the client spent per query::

    python scripts/strict_cpu.py --gallery 100000 --queries 30 [--json out.json]

``us_per_template_cpu`` = (server + client CPU per query) / gallery. It
uses only the public SDK, so it runs unchanged on older checkouts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from veilface.bench.cpu import client_cpu
from veilface.bench.cpu import process_cpu as _cpu
from veilface.bench.cpu import tree_cpu as _tree_cpu
from veilface.bench.synthetic import SyntheticFaces
from veilface.client.admin import AdminClient
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.server.launcher import LocalServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    emb, labels = SyntheticFaces().sample(args.gallery, 2, seed=0)
    gallery, probes = emb[0::2], emb[1::2]
    names = [str(x) for x in labels[0::2]]
    out: dict[str, float] = {"gallery": args.gallery, "queries": args.queries}
    with tempfile.TemporaryDirectory(prefix="veilface-cpu-") as tmp, LocalServer(
        Path(tmp) / "g.db", workers=2
    ) as srv:
        assert srv.proc is not None
        with AdminClient(srv.target, token=srv.admin_token) as admin:
            token = admin.create_tenant("cpu").api_token
        state = TenantState.new("cpu", dim=128)
        with VeilClient(srv.target, state, token=token) as c:
            c.register_key()
            c.calibrate(gallery)
            s0, c0, t0 = _tree_cpu(srv.proc.pid), time.process_time(), time.perf_counter()
            c.enroll_many(names, gallery)
            out["bulk_wall_s"] = time.perf_counter() - t0
            out["bulk_client_cpu_us_per_template"] = (time.process_time() - c0) / args.gallery * 1e6
            out["bulk_server_cpu_us_per_template"] = (_tree_cpu(srv.proc.pid) - s0) / args.gallery * 1e6
            key = c.describe().keys[0]
            out["bytes_per_template"] = key.stored_bytes / max(1, key.subjects)
            for p in probes[:4]:  # warm-up: workers load their bins, center scores
                c.identify(p, mode="strict", k=0)
            time.sleep(2.0)
            lat, hits = [], 0
            front = psutil.Process(srv.proc.pid)
            s0, c0, f0 = _tree_cpu(srv.proc.pid), client_cpu(srv.proc.pid), _cpu(front)
            for i in range(args.queries):
                t = time.perf_counter()
                r = c.identify(probes[i], mode="strict", k=0)
                lat.append((time.perf_counter() - t) * 1e3)
                hits += r.subject_id == names[i]
            server_cpu = _tree_cpu(srv.proc.pid) - s0
            client_s = client_cpu(srv.proc.pid) - c0
            front_cpu = _cpu(front) - f0
    n = args.queries
    out["server_cpu_ms_per_query"] = server_cpu / n * 1e3
    out["server_front_cpu_ms_per_query"] = front_cpu / n * 1e3  # gRPC, store, dispatch
    out["client_cpu_ms_per_query"] = client_s / n * 1e3
    out["us_per_template_cpu"] = (server_cpu + client_s) / n / args.gallery * 1e6
    out["server_us_per_template_cpu"] = server_cpu / n / args.gallery * 1e6
    out["p50_wall_ms"] = statistics.median(lat)
    out["rank1"] = hits / n
    text = json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
