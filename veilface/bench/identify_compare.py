"""The store and scoring backend of a ``bench identify`` run, and comparisons in one invocation.

``--db``: ``sqlite`` (default: a file in a temporary folder), a SQLite path
that does not exist yet, or a ``postgresql://`` URL, where each run gets a
scratch schema (``veilface_bench_<random>``, dropped at the end) so the
bench never touches the database's own tables. ``--scoring ray``: the
cluster at ``--ray-address``, or a local one of two nodes started for the
invocation (:class:`veilface.bench.ray_cluster.LocalRayCluster`); the
bench's actors are not detached, so they end with its server.

``--compare-db sqlite,postgresql`` / ``--compare-scoring local,ray`` run
the same gallery and queries (one :class:`~veilface.bench.identify.BenchData`)
on each backend in turn, the first being the baseline, and report each
figure's ratio to it: a time's ``candidate / baseline``, a rate's
``baseline / candidate``, so above 1 is always slower. The issue's targets
are checked on them: every figure within 1.25x for the store, the p50
within 1.5x for scoring (:data:`TARGETS`).
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from veilface.bench.identify import BenchConfig, BenchData, measure
from veilface.errors import InvalidArgument
from veilface.server.launcher import LocalServer

log = logging.getLogger(__name__)

#: Figures compared: (name, True for a time, False for a rate).
FIGURES = (
    ("p50_ms", True),
    ("p95_ms", True),
    ("preselect_p50_ms", True),
    ("rerank_p50_ms", True),
    ("enroll_single_p50_ms", True),
    ("enroll_direct_p50_ms", True),
    ("enroll_bulk_per_s", False),
)
#: (largest slowdown allowed, the figures it applies to) per comparison (issue 13's targets).
TARGETS: dict[str, tuple[float, tuple[str, ...]]] = {
    "db": (1.25, tuple(name for name, _ in FIGURES)),
    "scoring": (1.5, ("p50_ms",)),
}
STORES = ("sqlite", "postgresql")
SCORINGS = ("local", "ray")


def _store_kind(db: str) -> str:
    return "postgresql" if db.lower().startswith(("postgresql://", "postgres://")) else "sqlite"


@contextmanager
def scratch_schema(url: str) -> Iterator[str]:
    """``url`` pointed at a new schema of its database (``search_path``), dropped on exit."""
    import psycopg

    if "options=" in url:
        raise InvalidArgument("give the bench a PostgreSQL URL without options= (it sets search_path)")
    schema = f"veilface_bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}".encode())
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


@contextmanager
def bench_server(
    cfg: BenchConfig, store: str, scoring: str, ray_address: str, tmp: Path, run: int
) -> Iterator[LocalServer]:
    """A server on ``store`` ("sqlite" or "postgresql") scoring on ``scoring``."""
    extra = ["--scoring", scoring]
    if scoring == "ray":
        extra += ["--ray-address", ray_address]
    env = {"VEILFACE_RAY_DETACHED": "0"}  # the bench's actors end with its server
    with ExitStack() as stack:
        admin: Path | None = None
        db: str | Path
        if store == "postgresql":
            if _store_kind(cfg.db) != "postgresql":
                raise InvalidArgument("a PostgreSQL run needs --db postgresql://user:pw@host:port/db")
            db = stack.enter_context(scratch_schema(cfg.db))
            admin = tmp / f"admin-{run}"
        elif cfg.db and cfg.db != "sqlite" and run == 0 and not cfg.compare_db:
            db = Path(cfg.db.removeprefix("sqlite:///"))
            if db.exists():
                raise InvalidArgument(f"--db {db} exists; the bench wants a new SQLite file")
        else:
            db = tmp / f"bench-{run}.db"
        srv = stack.enter_context(
            LocalServer(db, admin_token_file=admin, workers=cfg.workers, extra_args=extra, env=env)
        )
        yield srv


@contextmanager
def ray_cluster(cfg: BenchConfig) -> Iterator[str]:
    """``cfg.ray_address``, or a local cluster of two nodes for the invocation."""
    if cfg.ray_address:
        yield cfg.ray_address
        return
    from veilface.bench.ray_cluster import LocalRayCluster

    with LocalRayCluster(2, cpus_per_node=max(1, cfg.workers // 2),
                         fast_failure_detection=False) as cluster:
        log.info("started a local Ray cluster of 2 nodes at %s", cluster.address)
        yield cluster.address


def _variants(cfg: BenchConfig) -> tuple[str, list[tuple[str, str]]]:
    if cfg.compare_db and cfg.compare_scoring:
        raise InvalidArgument("compare stores or scoring backends, not both at once")
    if cfg.compare_db:
        bad = [s for s in cfg.compare_db if s not in STORES]
        if bad or len(cfg.compare_db) < 2:
            raise InvalidArgument(f"--compare-db takes two or more of {', '.join(STORES)}")
        if "postgresql" in cfg.compare_db and _store_kind(cfg.db) != "postgresql":
            raise InvalidArgument("--compare-db postgresql needs --db postgresql://user@host:port/db")
        return "db", [(s, cfg.scoring) for s in cfg.compare_db]
    bad = [s for s in cfg.compare_scoring if s not in SCORINGS]
    if bad or len(cfg.compare_scoring) < 2:
        raise InvalidArgument(f"--compare-scoring takes two or more of {', '.join(SCORINGS)}")
    return "scoring", [(_store_kind(cfg.db), s) for s in cfg.compare_scoring]


def _label(store: str, scoring: str, what: str) -> str:
    return store if what == "db" else scoring


def run_single(cfg: BenchConfig, data: BenchData) -> dict[str, Any]:
    """One run on ``cfg.db`` and ``cfg.scoring``."""
    store = _store_kind(cfg.db)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="veilface-bench-")))
        address = stack.enter_context(ray_cluster(cfg)) if cfg.scoring == "ray" else ""
        srv = stack.enter_context(bench_server(cfg, store, cfg.scoring, address, tmp, 0))
        result = measure(cfg, data, srv)
    result.update(store=store, scoring=cfg.scoring)
    return result


def check_compare(cfg: BenchConfig) -> None:
    """Refuse a comparison that cannot run, before any data is made."""
    _variants(cfg)


def run_compare(cfg: BenchConfig, data: BenchData) -> dict[str, Any]:
    """The same gallery and queries on each backend in turn; figures and their ratios."""
    what, variants = _variants(cfg)
    runs: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="veilface-bench-")))
        address = (
            stack.enter_context(ray_cluster(cfg)) if any(s == "ray" for _, s in variants) else ""
        )
        for i, (store, scoring) in enumerate(variants):
            label = _label(store, scoring, what)
            log.info("bench run %d: store %s, scoring %s", i, store, scoring)
            with bench_server(cfg, store, scoring, address, tmp, i) as srv:
                runs[label] = measure(cfg, data, srv, tenant=f"bench{i}")
            runs[label].update(store=store, scoring=scoring)
    return compare(what, runs)


def compare(what: str, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of every run's figures to the first run's (above 1: slower), and the target's verdict."""
    labels = list(runs)
    base = runs[labels[0]]
    limit, judged = TARGETS[what]
    ratios: dict[str, dict[str, float]] = {}
    for label in labels[1:]:
        run = runs[label]
        ratios[label] = {
            name: (run[name] / base[name] if is_time else base[name] / run[name])
            for name, is_time in FIGURES
            if base.get(name) and run.get(name)
        }
    worst = max((r[n] for r in ratios.values() for n in judged if n in r), default=float("nan"))
    return {
        "compare": what,
        "baseline": labels[0],
        "runs": runs,
        "ratios": ratios,
        "target": {"max_slowdown": limit, "figures": list(judged)},
        "worst_slowdown": worst,
        "within_target": bool(worst <= limit),
    }


def format_compare_table(result: dict[str, Any]) -> str:
    labels = list(result["runs"])
    head = ["figure", *labels, *(f"{lab}/{labels[0]}" for lab in labels[1:])]
    rows = [head]
    for name, _ in FIGURES:
        cells = [name]
        cells += [f"{result['runs'][lab].get(name, float('nan')):.1f}" for lab in labels]
        cells += [f"{result['ratios'][lab].get(name, float('nan')):.3f}x" for lab in labels[1:]]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    target = result["target"]
    lines.append(
        f"worst slowdown {result['worst_slowdown']:.3f}x over {', '.join(target['figures'])}; "
        f"target <= {target['max_slowdown']}x: {'met' if result['within_target'] else 'NOT met'}"
    )
    return "\n".join(lines)


__all__ = ["check_compare", "compare", "format_compare_table", "run_compare", "run_single", "scratch_schema"]
