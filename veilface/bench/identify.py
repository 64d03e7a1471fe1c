"""``veilface bench identify``: end-to-end identification benchmark.

Starts a real server (child process, SQLite file, worker processes) on a
free port, creates a tenant, bulk-enrolls the gallery, enrolls a few
templates one by one, then identifies probes through the SDK and compares
every encrypted top-1 with an exhaustive plaintext cosine search (FAISS
``IndexFlatIP``) over exactly the same gallery, timed in the same run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from veilface.bench.cpu import client_cpu, tree_cpu, tree_rss_mb

if TYPE_CHECKING:
    from veilface.server.launcher import LocalServer

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    gallery: int = 1000
    mode: str = "strict"
    queries: int = 100
    embeddings: Path | None = None
    # 0 (k: None): what the SDK chooses (VeilClient.train_routing, identify's defaults)
    nlist: int = 0
    nprobe: int = 0
    k: int | None = None
    single: int = 40
    workers: int = 2
    seed: int = 0
    progress: bool = True
    presel_dims: int = 0  # 0: the layout's default
    # The store (""): a SQLite file in a temporary folder; a postgresql:// URL:
    # a scratch schema of that database, dropped at the end.
    db: str = ""
    scoring: str = "local"  # or "ray"
    ray_address: str = ""  # "": a local cluster of two nodes, started for the run
    # Run the same gallery and queries on each of these (in this order; the
    # first is the baseline of the ratios): stores ("sqlite", "postgresql")
    # or scoring backends ("local", "ray"). At most one of the two.
    compare_db: tuple[str, ...] = ()
    compare_scoring: tuple[str, ...] = ()
    # Clients identifying at once, each a process with its own channel
    # (veilface/bench/identify_load.py); 1: this process, one query at a time.
    concurrency: int = 1


def _data(cfg: BenchConfig) -> tuple[npt.NDArray[np.float32], list[str], npt.NDArray[np.float32], list[str], str]:
    """Gallery (first row of each label) and probes (the other rows)."""
    if cfg.embeddings is not None:
        with np.load(cfg.embeddings, allow_pickle=False) as d:
            emb = np.asarray(d["emb"], dtype=np.float32)
            labels = [str(x) for x in d["labels"]]
        source = f"embeddings {cfg.embeddings}"
    else:
        from veilface.bench.synthetic import SyntheticFaces

        emb_, lab_ = SyntheticFaces().sample(cfg.gallery, 2, seed=cfg.seed)
        emb, labels = emb_, [str(x) for x in lab_]
        source = "synthetic (SyntheticFaces defaults, fitted to dlib on LFW)"
    first: dict[str, int] = {}
    probes: list[int] = []
    for i, lab in enumerate(labels):
        if lab in first:
            probes.append(i)
        else:
            first[lab] = i
    g_idx = list(first.values())
    if cfg.embeddings is None:
        g_idx = g_idx[: cfg.gallery]
    rng = np.random.default_rng(cfg.seed)
    probes = [p for p in probes if labels[p] in first]
    if len(probes) > cfg.queries:
        probes = sorted(rng.choice(probes, cfg.queries, replace=False).tolist())
    return (
        emb[g_idx],
        [labels[i] for i in g_idx],
        emb[probes],
        [labels[i] for i in probes],
        source,
    )


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_identify_bench(cfg: BenchConfig) -> dict[str, Any]:
    """One run on the store and scoring backend ``cfg`` names, or a comparison of two.

    With ``cfg.compare_db`` or ``cfg.compare_scoring`` the same gallery and
    queries run on each backend in turn (:mod:`veilface.bench.identify_compare`).
    """
    from veilface.bench.identify_compare import check_compare, run_compare, run_single

    if cfg.compare_db or cfg.compare_scoring:
        check_compare(cfg)
    data = BenchData.make(cfg)
    if cfg.compare_db or cfg.compare_scoring:
        return run_compare(cfg, data)
    return run_single(cfg, data)


@dataclass
class BenchData:
    """The gallery, the probes and the plaintext baseline, shared by every run of one invocation."""

    gal: npt.NDArray[np.float32]
    gal_labels: list[str]
    probes: npt.NDArray[np.float32]
    probe_labels: list[str]
    source: str
    index: Any  # faiss.IndexFlatIP over the normalized gallery

    @classmethod
    def make(cls, cfg: BenchConfig) -> BenchData:
        import faiss

        gal, gal_labels, probes, probe_labels, source = _data(cfg)
        # Plaintext baseline over exactly the enrolled gallery.
        gnorm = gal / np.linalg.norm(gal, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(gal.shape[1])
        index.add(np.ascontiguousarray(gnorm, dtype=np.float32))
        return cls(gal, gal_labels, probes, probe_labels, source, index)


def measure(cfg: BenchConfig, data: BenchData, srv: LocalServer, tenant: str = "bench") -> dict[str, Any]:
    """Enroll ``data``'s gallery as a new tenant of the running ``srv``, then time its queries."""
    from tqdm import tqdm

    from veilface.client.admin import AdminClient
    from veilface.client.route_training import search_options
    from veilface.client.sdk import VeilClient
    from veilface.client.tenant_state import TenantState

    gal, gal_labels, probes, probe_labels, index = (
        data.gal, data.gal_labels, data.probes, data.probe_labels, data.index
    )
    dim = gal.shape[1]
    n_single = min(cfg.single, max(0, len(gal) - 1))
    bulk_ids = [f"{lab}" for lab in gal_labels[: len(gal) - n_single]]
    single_ids = gal_labels[len(gal) - n_single :]
    result: dict[str, Any] = {
        "mode": cfg.mode,
        "gallery": len(gal),
        "queries": len(probes),
        "dim": dim,
        "source": data.source,
        "k": cfg.k,
    }
    with AdminClient(srv.target, token=srv.admin_token) as admin:
        token = admin.create_tenant(tenant).api_token
    state = TenantState.new(tenant, dim=dim, presel_dims=cfg.presel_dims)
    with VeilClient(srv.target, state, token=token) as client:
        client.register_key()
        search: dict[str, Any] = {"k": cfg.k, "nprobe": cfg.nprobe or None}
        if cfg.mode == "routed":
            t = time.perf_counter()
            chosen = client.train_routing(gal, nlist=cfg.nlist or None, seed=cfg.seed)
            result["routing_train_s"] = time.perf_counter() - t
            result["search_defaults"] = chosen.to_dict()
            result["nlist"] = client.state.router.nlist if client.state.router is not None else 0
        # What identify will use: the flags, or the SDK's choice where they are left out.
        used = search_options(client.state, cfg.mode, cfg.k, cfg.nprobe or None)
        result.update(k=used.k, mode_used=used.mode.value, fallback=used.fallback)
        if cfg.mode == "routed":
            result["nprobe"] = used.nprobe

        # The centering vector is fixed once per key from the tenant's own
        # templates (and registered encrypted); not part of the import rate.
        client.calibrate(gal[: len(bulk_ids)] if bulk_ids else gal)
        t = time.perf_counter()
        if bulk_ids:
            client.enroll_many(bulk_ids, gal[: len(bulk_ids)], progress=cfg.progress)
        bulk_s = time.perf_counter() - t
        result["enroll_bulk_s"] = bulk_s
        result["enroll_bulk_per_s"] = len(bulk_ids) / bulk_s if bulk_s > 0 else float("nan")

        # Let the workers finish the bulk import's background work (loading
        # bins, precomputing their scores against the center) before timing.
        for p in probes[:2]:
            client.identify(p, mode=cfg.mode, **search)

        # Single enrollments, one after another as at a kiosk: every
        # other one through the staging area (acknowledged durable and
        # searchable, then folded into its bin in the background; the
        # fold is timed apart), the others straight into their bin
        # (the baseline, in the same run).
        single_ms, fold_ms, direct_ms = [], [], []
        for i, (sid, e) in enumerate(zip(single_ids, gal[len(bulk_ids) :], strict=True)):
            t = time.perf_counter()
            if i % 2 == 0:
                client.enroll(sid, e)
                single_ms.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                client.flush()
                fold_ms.append((time.perf_counter() - t) * 1e3)
            else:
                client.enroll(sid, e, staged=False)
                direct_ms.append((time.perf_counter() - t) * 1e3)
        result["enroll_single_n"] = len(single_ms)
        result["enroll_single_p50_ms"] = _pct(single_ms, 50)
        result["enroll_single_p95_ms"] = _pct(single_ms, 95)
        result["enroll_fold_p50_ms"] = _pct(fold_ms, 50)
        result["enroll_direct_p50_ms"] = _pct(direct_ms, 50)
        result["enroll_direct_p95_ms"] = _pct(direct_ms, 95)
        # Let compaction (2 s after a bin's last write) fold the single
        # enrollments' deltas into their bins before measuring storage.
        # The machine may be loaded: wait for 5 s without change.
        time.sleep(3.0)
        last, stable = -1, 0
        for _ in range(120):
            stored = client.describe().keys[0].stored_bytes
            stable = stable + 1 if stored == last else 0
            if stable >= 5:
                break
            last = stored
            time.sleep(1.0)

        desc = client.describe()
        key = desc.keys[0]
        result["presel_dims"] = key.presel_dims
        result["bytes_per_template"] = key.stored_bytes / max(1, key.subjects)
        result["bins"] = key.bins

        # warm-up: the workers deserialize their bins on first use and
        # finish precomputing the bins' scores against the center
        for p in probes[:3]:
            client.identify(p, mode=cfg.mode, **search)

        lat, pre_ms, rr_ms, enc_ms, qbytes, hits, enc_correct, plain_correct, plain_ms = (
            [], [], [], [], [], 0, 0, 0, [],
        )
        route_hits, bins_pre, bins_rr = 0, [], []
        router = client.state.router
        gal_lists = (
            router.assign((client.normalize(gal) @ client._mix.T).astype(np.float32))
            if router is not None
            else None
        )
        server_pid = srv.proc.pid if srv.proc is not None else None
        if server_pid is not None:
            s_cpu0, c_cpu0 = tree_cpu(server_pid), client_cpu(server_pid)
        load = None
        if cfg.concurrency > 1:  # the encrypted queries first, C clients at once
            from veilface.bench.identify_load import identify_concurrently

            load = identify_concurrently(
                srv.target, token, client.state, probes, cfg.concurrency, {"mode": cfg.mode, **search}
            )
        t_loop = time.perf_counter()
        for i, (p, lab) in enumerate(tqdm(
            list(zip(probes, probe_labels, strict=True)),
            desc=f"identify ({cfg.mode})",
            disable=not cfg.progress or load is not None,
        )):
            t = time.perf_counter()
            q = np.ascontiguousarray(p[None, :] / np.linalg.norm(p), dtype=np.float32)
            _, top = index.search(q, 1)
            plain_ms.append((time.perf_counter() - t) * 1e3)
            plain_top = gal_labels[int(top[0, 0])]
            if load is None:
                r = client.identify(p, mode=cfg.mode, **search)
            else:
                r = load.answers[i]
            if gal_lists is not None and router is not None and result.get("nprobe"):
                probed = router.probe_lists(
                    (client._mix @ q[0].astype(np.float64)).astype(np.float32),
                    min(result["nprobe"], router.nlist),
                )
                route_hits += int(gal_lists[int(top[0, 0])] in set(np.ravel(probed).tolist()))
            bins_pre.append(r.stats.bins_preselected)
            bins_rr.append(r.stats.bins_reranked)
            lat.append(r.stats.total_ms)
            pre_ms.append(r.stats.preselect_ms)
            rr_ms.append(r.stats.rerank_ms)
            enc_ms.append(r.stats.encrypt_ms)
            qbytes.append(r.stats.bytes_up + r.stats.bytes_down)
            hits += int(r.subject_id == plain_top)
            enc_correct += int(r.subject_id == lab)
            plain_correct += int(plain_top == lab)
        n = max(1, len(probes))
        # One at a time, the loop's wall time (the plaintext search in it takes microseconds).
        wall_s = time.perf_counter() - t_loop if load is None else load.wall_s
        result.update(
            concurrency=cfg.concurrency,
            qps=len(probes) / wall_s if wall_s > 0 else float("nan"),
            p50_ms=_pct(lat, 50),
            p95_ms=_pct(lat, 95),
            p99_ms=_pct(lat, 99),
            preselect_p50_ms=_pct(pre_ms, 50),
            rerank_p50_ms=_pct(rr_ms, 50),
            probe_encrypt_p50_ms=_pct(enc_ms, 50),
            plaintext_p50_ms=_pct(plain_ms, 50),
            hit_rate=hits / n,
            rank1_encrypted=enc_correct / n,
            rank1_plaintext=plain_correct / n,
            query_bytes=float(np.mean(qbytes)) if qbytes else float("nan"),
            bins_preselected_mean=float(np.mean(bins_pre)) if bins_pre else 0.0,
            bins_reranked_mean=float(np.mean(bins_rr)) if bins_rr else 0.0,
        )
        if server_pid is not None:
            # CPU time (not wall time) per template searched, server tree + client,
            # plaintext baseline included (it is microseconds against milliseconds)
            server_s = tree_cpu(server_pid) - s_cpu0
            client_s = client_cpu(server_pid) - c_cpu0 + (load.client_cpu_s if load else 0.0)
            searched = n * len(gal)
            result["us_per_template_core"] = (server_s + client_s) / searched * 1e6
            result["server_us_per_template_core"] = server_s / searched * 1e6
            result["server_rss_mb"] = tree_rss_mb(server_pid)
        if gal_lists is not None:
            result["routing_recall"] = route_hits / n
        result["slowdown_vs_plaintext"] = result["p50_ms"] / max(result["plaintext_p50_ms"], 1e-9)
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("mode", result["mode"]),
        ("gallery / queries", f"{result['gallery']} / {result['queries']}"),
        ("identify p50 / p95 / p99 (ms)",
         f"{result['p50_ms']:.1f} / {result['p95_ms']:.1f} / {result.get('p99_ms', float('nan')):.1f}"),
        ("queries per second (clients at once)",
         f"{result.get('qps', float('nan')):.1f} ({result.get('concurrency', 1)})"),
        ("  preselect / rerank p50 (ms)", f"{result['preselect_p50_ms']:.1f} / {result['rerank_p50_ms']:.1f}"),
        ("plaintext FAISS p50 (ms)", f"{result['plaintext_p50_ms']:.3f}"),
        ("hit rate (vs plaintext top-1)", f"{result['hit_rate']:.4f}"),
        ("routing recall (true list probed)", f"{result.get('routing_recall', float('nan')):.4f}"),
        ("bins preselected / re-ranked", f"{result['bins_preselected_mean']:.1f} / {result['bins_reranked_mean']:.1f}"),
        ("rank-1 encrypted / plaintext", f"{result['rank1_encrypted']:.4f} / {result['rank1_plaintext']:.4f}"),
        ("bytes per template at rest", f"{result['bytes_per_template']:.0f}"),
        ("query bytes (both ways)", f"{result['query_bytes']:.0f}"),
        ("single enroll p50 / p95 (ms, durable)", f"{result['enroll_single_p50_ms']:.1f} / {result['enroll_single_p95_ms']:.1f}"),
        ("  then fold into bin p50 (ms, background)", f"{result['enroll_fold_p50_ms']:.1f}"),
        ("  straight into bin p50 (ms, baseline)", f"{result['enroll_direct_p50_ms']:.1f}"),
        ("bulk enroll (templates/s)", f"{result['enroll_bulk_per_s']:.0f}"),
        ("CPU us per template searched (all / server)",
         (f"{result.get('us_per_template_core', float('nan')):.2f} / "
         f"{result.get('server_us_per_template_core', float('nan')):.2f}")),
        ("server RSS after the queries (MiB)", f"{result.get('server_rss_mb', float('nan')):.0f}"),
    ]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
