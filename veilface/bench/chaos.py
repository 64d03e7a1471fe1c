"""``veilface bench chaos``: hostile RPCs, memory bombs and SIGKILLs against a real server.

Starts ``veilface serve`` (with its worker processes) on a fresh SQLite
store in a temporary folder, sets up three tenants
(:mod:`veilface.bench.chaos_world`), then:

1. *quiet*: tenant A's legitimate client identifies, for the baseline p50;
2. *memory bombs* (:mod:`veilface.bench.chaos_bombs`), RSS of the server
   and its workers measured before and after;
3. *fuzz*: ``fuzz_rpcs`` hostile RPCs in all, spread evenly over every
   method of every service of the descriptors, from the generic and
   per-RPC generators, on a thread pool, plus clients killed mid-stream,
   while the legitimate client keeps identifying; a server that dies is
   restarted on the same store and counted as a crash;
4. the checks: nothing of a cut stream or killed client visible; then
   identification still exact against a plaintext search;
5. *kill cycles* (:mod:`veilface.bench.chaos_kill`).

Every choice (method order, generator, its parameters, kill moments) comes
from the seed; key material and encryption randomness are fresh, and the
timing of concurrent calls is the machine's.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veilface.bench import chaos_cases, chaos_cases_search  # noqa: F401 - registers generators
from veilface.bench.chaos_bombs import run_killed_client, stuffed_context
from veilface.bench.chaos_cases import SPECIFIC, fresh_handle
from veilface.bench.chaos_fuzz import (
    Call,
    Case,
    Expect,
    FuzzStats,
    Gen,
    Rpc,
    Setup,
    all_rpcs,
    bearer,
    declare_bins,
    execute,
)
from veilface.bench.chaos_generic import GENERIC
from veilface.bench.chaos_kill import KillPhase
from veilface.bench.chaos_legit import LegitTraffic
from veilface.bench.chaos_target import ChaosServer, RawResult, summarize_log
from veilface.bench.chaos_world import (
    TENANT_X,
    World,
    WorldSize,
    build_world,
    check_exact,
)
from veilface.proto.v1 import veilface_pb2 as pb

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass
class ChaosConfig:
    fuzz_rpcs: int = 10_000
    kills: int = 20
    seed: int = 0
    workers: int = 2  # server scoring processes
    concurrency: int = 4  # hostile calls in flight
    gallery: int = 512  # tenant A's bulk gallery
    exact_per_key: int = 20  # subjects checked per key after the fuzz (x2 probes each)
    quiet_queries: int = 30
    bomb_mb: int = 96  # size of the large bombs (under the 128 MiB default message limit)
    stuffed_keys: int = 4096
    deadline_s: float = 60.0
    progress: bool = True
    final_audit_sample: int = 100



#: CPU niceness of the attacker's threads (and of the clients they start).
ATTACKER_NICE = 10


def _attacker_priority() -> None:
    """Run this attacker thread at a lower CPU priority than the server and the kiosk.

    On one 2-core machine the attacker's own work (building and corrupting
    requests, killed clients) competes for the CPU with the server it
    attacks; a real attacker runs on its own machine. Linux niceness is per
    thread, so only the hostile threads are lowered: the server (started
    from the main thread), its restarts and the legitimate kiosk (its own
    process) keep normal priority, and the server still has to receive,
    parse and refuse every hostile request.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ATTACKER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: run as is
        pass

def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class _RssSampler:
    """Samples the server's RSS (server and workers) every 0.25 s; keeps the peak."""

    def __init__(self, srv: ChaosServer) -> None:
        self.srv, self.peak = srv, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self.srv.rss_mb())

    def settled(self, seconds: float = 1.5) -> float:
        """The RSS after ``seconds``: the median of a few samples."""
        samples = []
        for _ in range(5):
            time.sleep(seconds / 5)
            samples.append(self.srv.rss_mb())
        self.peak = max(self.peak, *samples)
        return float(np.median(samples))

    def __enter__(self) -> _RssSampler:  # noqa: PYI034 - private, never subclassed
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- planning ----------------------------------------------------------------------


SPECIFIC_SHARE = 0.6  # of a method's cases, when it has generators of its own


def generators_for(rpc: Rpc) -> list[tuple[str, Gen, float]]:
    """The generators of a method with their weights: generic ones 40%, its own 60%."""
    generic = [(name, fn, wgt) for name, (fn, wgt) in GENERIC.items()]
    own = SPECIFIC.get(rpc.name, [])
    if not own:
        return generic
    g_total, o_total = sum(g[2] for g in generic), sum(o[2] for o in own)
    scale = SPECIFIC_SHARE / (1 - SPECIFIC_SHARE) * g_total / o_total
    return generic + [(name, fn, wgt * scale) for name, fn, wgt in own]


def plan(seed: int, rpcs: list[Rpc]) -> Any:
    """Endless (rpc, generator name, generator, case seed): rounds over every method, shuffled."""
    rng = np.random.default_rng([seed, 1])
    i = 0
    while True:
        for k in rng.permutation(len(rpcs)).tolist():
            rpc = rpcs[k]
            gens = generators_for(rpc)
            weights = np.array([g[2] for g in gens], dtype=float)
            j = int(rng.choice(len(gens), p=weights / weights.sum()))
            yield rpc, gens[j][0], gens[j][1], i
            i += 1


class _Budget:
    def __init__(self, total: int) -> None:
        self.left, self._lock = total, threading.Lock()

    def take(self, n: int) -> int:
        with self._lock:
            got = min(n, self.left)
            self.left -= got
            return got


def _run_one(srv: ChaosServer, stats: FuzzStats, w: World, s: Setup, budget: _Budget, item: Any,
             seed: int, deadline: float) -> int:
    rpc, name, fn, i = item
    r = np.random.default_rng([seed, 2, i])
    try:
        case = fn(r, w, rpc, s)
    except Exception as exc:  # noqa: BLE001 - a generator out of step with changed messages
        with stats._lock:
            stats.generator_errors[f"{name}: {type(exc).__name__}: {str(exc)[:80]}"] += 1
        return 0
    n = budget.take(len(case.calls))
    if n == 0:
        return 0
    for c in case.calls:
        c.timeout_s = max(c.timeout_s, deadline)
    execute(srv, stats, Case(case.generator, case.calls[:n]))
    return n


# -- the bombs and killed clients ------------------------------------------------------


def bomb_cases(w: World, cfg: ChaosConfig, s: Setup, r: np.random.Generator) -> list[Case]:
    """Item 1's memory bombs, on the attacker's own tenant (each must fail)."""
    x = w.key("x.k1")
    g1, big = x.g1, cfg.bomb_mb * MiB
    tok = bearer(w.tokens[TENANT_X])
    path = {m: f"/veilface.v1.{m}" for m in (
        "Identification/Preselect", "Tenants/RegisterKey", "Enrollment/Enroll", "Enrollment/EnrollStaged",
        "Enrollment/BulkEnroll", "Tenants/RegisterCenter")}
    one_big = [r.bytes(big - (g1 - 1) * 1024)] + [r.bytes(1024) for _ in range(g1 - 1)]
    spread = [r.bytes(big // g1) for _ in range(g1)]
    t = cfg.deadline_s * 3

    def pre(probe: list[bytes], routed: bool) -> bytes:
        return bytes(pb.PreselectRequest(
            tenant_id=TENANT_X, key_id="k1", probe_ciphertexts=probe,
            mode=pb.SEARCH_MODE_ROUTED if routed else pb.SEARCH_MODE_STRICT,
            labels=["no-such-list"] if routed else [],
        ).SerializeToString())

    res = s.unary("Enrollment/ReserveSlots", pb.ReserveSlotsRequest(tenant_id=TENANT_X, key_id="k1", count=1),
                  w.tokens[TENANT_X], pb.ReserveSlotsResponse)
    huge_part = big // 3
    enroll_msgs = [
        pb.EnrollRequest(tenant_id=TENANT_X, key_id="k1", reservation_id=res.reservation_id if res else "r",
                         handles=[fresh_handle(r)], ciphertexts=[r.bytes(huge_part)]).SerializeToString(),
        *[pb.EnrollRequest(ciphertexts=[r.bytes(huge_part)]).SerializeToString() for _ in range(2)],
    ]
    chunks = []
    for _ in range(48):
        n = 4
        chunks.append(pb.BulkEnrollChunk(tenant_id=TENANT_X, key_id="k1", handles=[fresh_handle(r) for _ in range(n)],
                                         slots=list(range(n)), ciphertexts=w.samples.bulk))
    declare_bins(chunks[0], 64)  # more than are sent: the server can tell the cut
    absent = tuple((TENANT_X, h) for c in chunks for h in c.handles)
    stuffed = stuffed_context(x, w.samples.context, keys=cfg.stuffed_keys)
    F = Expect.FAIL
    return [
        Case("bomb_preselect_one_huge_probe", [Call(path["Identification/Preselect"], pre(one_big, False), tok, F, t)]),
        Case("bomb_preselect_cached_unknown_label", [Call(path["Identification/Preselect"], pre(spread, True), tok, F, t)]),
        Case("bomb_register_key_stuffed_galois", [Call(
            path["Tenants/RegisterKey"],
            pb.RegisterKeyRequest(tenant_id=TENANT_X, key_id="kbomb", public_context=stuffed).SerializeToString(),
            tok, F, t)]),
        Case("bomb_register_key_huge", [Call(
            path["Tenants/RegisterKey"],
            pb.RegisterKeyRequest(tenant_id=TENANT_X, key_id="kbig", public_context=r.bytes(big)).SerializeToString(),
            tok, F, t)]),
        Case("bomb_register_center_huge", [Call(
            path["Tenants/RegisterCenter"],
            pb.RegisterCenterRequest(tenant_id=TENANT_X, key_id="k1", center_ciphertexts=spread).SerializeToString(),
            tok, F, t)]),
        Case("bomb_enroll_huge_blobs", [Call(path["Enrollment/Enroll"], enroll_msgs, tok, F, t)]),
        Case("bomb_enroll_staged_huge", [Call(
            path["Enrollment/EnrollStaged"],
            pb.EnrollStagedRequest(tenant_id=TENANT_X, key_id="k1", handle=fresh_handle(r),
                                   ciphertext=r.bytes(big)).SerializeToString(), tok, F, t)]),
        Case("bomb_bulk_many_bins_cut", [Call(path["Enrollment/BulkEnroll"],
                                              [c.SerializeToString() for c in chunks], tok, F, t * 2,
                                              cut="raise", absent=absent)]),
        # If the stuffed context was accepted, this makes the workers load it.
        Case("bomb_use_stuffed_key", [Call(path["Identification/Preselect"], pb.PreselectRequest(
            tenant_id=TENANT_X, key_id="kbomb", mode=pb.SEARCH_MODE_STRICT,
            probe_ciphertexts=w.samples.probes["x.k1"]).SerializeToString(), tok, Expect.ANY, t)]),
    ]


def killed_client_case(srv: ChaosServer, stats: FuzzStats, w: World, r: np.random.Generator) -> int:
    """A bulk-enrolling child process of the attacker, SIGKILLed after its first chunk."""
    chunks = [pb.BulkEnrollChunk(tenant_id=TENANT_X, key_id="k1", handles=[fresh_handle(r) for _ in range(4)],
                                 slots=[0, 1, 2, 3], ciphertexts=w.samples.bulk) for _ in range(3)]
    declare_bins(chunks[0], len(chunks))
    path = "/veilface.v1.Enrollment/BulkEnroll"
    call = Call(path, [], bearer(w.tokens[TENANT_X]), Expect.FAIL, cut="killed",
                absent=tuple((TENANT_X, h) for c in chunks for h in c.handles))
    got = run_killed_client(srv.target, path, w.tokens[TENANT_X], [c.SerializeToString() for c in chunks], r)
    stats.record("killed_client", call, RawResult("CLIENT_KILLED", "", got.elapsed_s))
    return 1


def check_absent(srv: ChaosServer, stats: FuzzStats, w: World, s: Setup) -> int:
    """After the fuzz: every subject of a cut stream or killed client must be absent."""
    checked = 0
    for generator, method, absent in list(stats.pending_absent):
        visible = 0
        for tenant, handle in absent:
            checked += 1
            got = s.unary("Enrollment/FetchSubjectBin", pb.FetchSubjectBinRequest(tenant_id=tenant, handle=handle),
                          w.tokens[tenant], pb.FetchSubjectBinResponse)
            visible += got is not None
        if visible:
            stats.mark_visible(generator, method, f"{visible}/{len(absent)} subjects of a cut stream visible")
    return checked


# -- the run -------------------------------------------------------------------------


def _fuzz(srv: ChaosServer, w: World, cfg: ChaosConfig, stats: FuzzStats, budget: int, bar: Any) -> None:
    s = Setup(srv)
    rpcs = all_rpcs()
    left = _Budget(budget)
    n_killed = max(1, cfg.fuzz_rpcs // 1000)
    killed_at = set(np.random.default_rng([cfg.seed, 4]).choice(max(budget, 1), n_killed).tolist())
    with ThreadPoolExecutor(
        cfg.concurrency, thread_name_prefix="chaos-fuzz", initializer=_attacker_priority
    ) as ex:
        pending: set[Future[int]] = set()
        for item in plan(cfg.seed, rpcs):
            if left.left <= 0:
                break
            while len(pending) >= 2 * cfg.concurrency:
                done, pending = wait(pending, timeout=5, return_when=FIRST_COMPLETED)
                bar.update(sum(f.result() for f in done))
                if not srv.alive():
                    srv.ensure_alive()
            if item[3] in killed_at and left.take(1):
                r = np.random.default_rng([cfg.seed, 5, item[3]])
                pending.add(ex.submit(killed_client_case, srv, stats, w, r))
            pending.add(ex.submit(_run_one, srv, stats, w, s, left, item, cfg.seed, cfg.deadline_s))
        for f in pending:
            bar.update(f.result())


class _QuietCuts(logging.Filter):
    """Drop gRPC's traceback for request iterators the benchmark makes raise on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Exception iterating requests" not in record.getMessage()


def run_chaos_bench(cfg: ChaosConfig) -> dict[str, Any]:
    quiet = _QuietCuts()
    logging.getLogger("grpc._channel").addFilter(quiet)
    try:
        return _run(cfg)
    finally:
        logging.getLogger("grpc._channel").removeFilter(quiet)


def _run(cfg: ChaosConfig) -> dict[str, Any]:
    from tqdm import tqdm

    t_start = time.perf_counter()
    result: dict[str, Any] = {"seed": cfg.seed, "config": asdict(cfg)}
    stats = FuzzStats()
    with tempfile.TemporaryDirectory(prefix="veilface-chaos-") as tmp:
        srv = ChaosServer(Path(tmp) / "chaos.db", workers=cfg.workers, log_path=Path(tmp) / "server.log")
        srv.start()
        try:
            with _RssSampler(srv) as rss:
                log.info("setting up tenants and galleries")
                w = build_world(srv, WorldSize(gallery=cfg.gallery), cfg.seed)
                result["setup_s"] = time.perf_counter() - t_start
                legit = LegitTraffic(srv, w, seed=cfg.seed)
                legit.measure(3)  # warm-up: workers load the bins
                quiet = legit.measure(cfg.quiet_queries)
                result["legit_p50_quiet_ms"] = _pct(quiet, 50)
                result["rss_before_mb"] = rss.settled()
                s = Setup(srv)
                bombs = bomb_cases(w, cfg, s, np.random.default_rng([cfg.seed, 6]))
                bar = tqdm(total=cfg.fuzz_rpcs, desc="hostile RPCs", unit="rpc", disable=not cfg.progress)
                legit.start()
                t_fuzz = time.perf_counter()
                with ThreadPoolExecutor(
                    2, thread_name_prefix="chaos-bomb", initializer=_attacker_priority
                ) as ex:
                    for _ in ex.map(lambda c: execute(srv, stats, c), bombs[:-1]):
                        bar.update(1)
                execute(srv, stats, bombs[-1])
                bar.update(1)
                del bombs
                result["rss_after_bombs_mb"] = rss.settled(3.0)
                result["memory_bomb_rss_growth_mb"] = result["rss_after_bombs_mb"] - result["rss_before_mb"]
                _fuzz(srv, w, cfg, stats, max(0, cfg.fuzz_rpcs - stats.rpcs), bar)
                bar.close()
                result["fuzz_s"] = time.perf_counter() - t_fuzz
                legit.stop()
                result["legit_p50_under_attack_ms"] = _pct(legit.latencies_ms, 50)
                result["legit_p95_under_attack_ms"] = _pct(legit.latencies_ms, 95)
                result["legit_queries_under_attack"] = len(legit.latencies_ms)
                result["legit_errors_under_attack"] = dict(legit.errors)
                result["legit_wrong_under_attack"] = legit.wrong
                result["rss_after_fuzz_mb"] = rss.settled()
                srv.ensure_alive()
                time.sleep(3.0)  # let a server that commits dropped streams late do so
                result["absent_checked"] = check_absent(srv, stats, w, s)
                exact = check_exact(srv, w, per_key=cfg.exact_per_key, seed=cfg.seed)
                result["exact_after_fuzz"] = exact.exact
                result["exact_checked"] = exact.checked
                result["exact_failures"] = exact.failures[:10]
                result["crashes"] = srv.crashes
                result["peak_rss_mb"] = rss.peak
            t_kill = time.perf_counter()
            result.update(_kill_phase(srv, cfg))
            result["kill_phase_s"] = time.perf_counter() - t_kill
        finally:
            srv.stop()
            result["server_internal_errors"] = summarize_log(srv.log_path)
    result.update(_fuzz_summary(stats))
    result["elapsed_s"] = time.perf_counter() - t_start
    return result


def _kill_phase(srv: ChaosServer, cfg: ChaosConfig) -> dict[str, Any]:
    from tqdm import tqdm

    phase = KillPhase(srv, seed=cfg.seed)
    phase.setup()
    for n in tqdm(range(cfg.kills), desc="kill cycles", disable=not cfg.progress):
        phase.cycle(n)
    phase.final_audit(sample=cfg.final_audit_sample)
    return phase.report.as_dict()


def _fuzz_summary(stats: FuzzStats) -> dict[str, Any]:
    methods = {r.name for r in all_rpcs()}
    return {
        "fuzz_rpcs": stats.rpcs,
        **stats.totals(),
        "status_counts": dict(sorted(stats.status.items())),
        "cut_streams_visible": stats.cut_streams_visible,
        "generators": {k: v.as_dict() for k, v in sorted(stats.generators.items())},
        "methods": {k: v.as_dict() for k, v in sorted(stats.methods.items())},
        "methods_missing": sorted(methods - set(stats.methods)),
        "generator_errors": dict(stats.generator_errors),
        "crash_suspects": stats.crash_suspects[:20],
    }


# -- output ---------------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    def f(key: str, fmt: str = "{:.1f}") -> str:
        v = result.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else str(v)

    rows = [
        ("hostile RPCs (methods)", f"{result['fuzz_rpcs']} ({len(result['methods'])})"),
        ("crashes / hangs", f"{result['crashes']} / {result['hangs']}"),
        ("internal errors", str(result["internal_errors"])),
        ("unexpected successes", str(result["unexpected_successes"])),
        ("server RSS before / peak (MB)", f"{f('rss_before_mb')} / {f('peak_rss_mb')}"),
        ("memory bombs growth (MB)", f("memory_bomb_rss_growth_mb")),
        ("legit identify p50 quiet / attack (ms)",
         f"{f('legit_p50_quiet_ms')} / {f('legit_p50_under_attack_ms')}"),
        ("legit wrong / errors under attack",
         f"{result['legit_wrong_under_attack']} / {sum(result['legit_errors_under_attack'].values())}"),
        ("exact after fuzz (checked)", f"{result['exact_after_fuzz']} ({result['exact_checked']})"),
        ("kills / acknowledged", f"{result['kills']} / {result['acknowledged']}"),
        ("lost / duplicates / partial bulk",
         f"{result['lost']} / {result['duplicates']} / {result['partial_bulk_visible']}"),
    ]
    w = max(len(r[0]) for r in rows)
    out = [f"{k.ljust(w)}  {v}" for k, v in rows]
    bad = [(g, s) for g, s in result["generators"].items()
           if s["internal_errors"] or s["unexpected_successes"] or s["hangs"]]
    if bad:
        out.append("")
        out.append(f"{'generator'.ljust(36)} {'rpcs':>6} {'internal':>8} {'unexp.OK':>8} {'hangs':>6}")
        for g, s in bad:
            out.append(f"{g.ljust(36)} {s['rpcs']:>6} {s['internal_errors']:>8} "
                       f"{s['unexpected_successes']:>8} {s['hangs']:>6}")
    return "\n".join(out)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
