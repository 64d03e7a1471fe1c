"""Code that runs inside a scoring worker process.

Each worker owns the bins whose id maps to it (``bin_id % workers``), keeps
them deserialized in memory, and reads the database through its own
read-only connection. SEAL's evaluator is single-threaded and holds the GIL,
so processes are how the service uses both cores.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from veilface.crypto import seal_io
from veilface.crypto.kernel import AnyBin, Bin, BinKernel, ScoreCiphertext
from veilface.crypto.public_context import PublicContext
from veilface.errors import NotFound
from veilface.server.idle_work import IdleFiller
from veilface.server.store.base import BinReader
from veilface.server.store.blobs import pack_blobs, unpack_blobs
from veilface.server.store.factory import open_reader

log = logging.getLogger(__name__)


@dataclass
class _CachedBin:
    version: int
    # None: the bin holds no ciphertext yet. Packed (crypto/packed.py) where the product
    # kernel is built, else SEAL's ciphertexts: the same memory either way.
    cts: AnyBin | None
    key: tuple[str, str] = ("", "")  # the (tenant, key) whose context loaded it


@dataclass(frozen=True)
class WorkerLimits:
    """What one worker process may keep (``ServerSettings.max_resident_keys``, ``max_foreign_bins``).

    ``max_foreign_bins``: bins of other workers this one keeps loaded, least
    recently used first, for the queries the pool balances onto it
    (:meth:`veilface.server.scoring.ScoringBackend.score`); 0 keeps none.
    """

    max_resident_keys: int = 16
    max_foreign_bins: int = 32
    # Encryptions of zero made in idle time for re-randomizing responses, per resident key
    # (64 KiB each at n4096; server/idle_work.py). 0: each response encrypts its own.
    zero_pool: int = 64


class _WorkerState:
    def __init__(self, db: str) -> None:
        self.reader: BinReader = open_reader(db)
        # Loaded public contexts (a few MB of Galois keys each), least
        # recently used first; evicted past ``limits.max_resident_keys``.
        self.kernels: OrderedDict[tuple[str, str], BinKernel] = OrderedDict()
        self.limits = WorkerLimits()
        self.bins: OrderedDict[int, _CachedBin] = OrderedDict()
        # Other workers' bins scored here to balance a query, least recently used first.
        self.foreign: OrderedDict[int, _CachedBin] = OrderedDict()
        self.centers: dict[tuple[str, str], Bin | None] = {}
        # the same centering vectors in the form bins are scored against
        self.resident_centers: dict[tuple[str, str], AnyBin | None] = {}
        # (tenant, key, bin) -> (bin version, the bin's scores against that key's center)
        self.center_cache: dict[tuple[str, str, int], tuple[int, ScoreCiphertext]] = {}

    def kernel(self, tenant_id: str, key_id: str) -> BinKernel:
        k = self.kernels.get((tenant_id, key_id))
        # A context without a public key is read again: its key may have been given one since.
        if k is not None and k.public.public_key is not None:
            self.kernels.move_to_end((tenant_id, key_id))
            return k
        blob, _, center = self.reader.key_context(tenant_id, key_id)
        k = BinKernel(PublicContext.from_bytes(blob), zero_pool=self.limits.zero_pool)
        self.kernels[(tenant_id, key_id)] = k
        self.centers[(tenant_id, key_id)] = (
            k.load_probe(unpack_blobs(center)) if center is not None else None
        )
        self.resident_centers.pop((tenant_id, key_id), None)  # derived again on first use
        self.evict_kernels()
        return k

    def evict_kernels(self) -> None:
        """Drop the least recently used contexts past the limit (reloaded from the store on use).

        Bins loaded under an evicted context stay valid: a context rebuilt
        from the same public context has the same parameters.
        """
        while len(self.kernels) > self.limits.max_resident_keys:
            old, _ = self.kernels.popitem(last=False)
            self.centers.pop(old, None)
            self.resident_centers.pop(old, None)
            log.debug("evicted the context of a key (%d resident)", len(self.kernels))

    def center_scores(
        self, tenant_id: str, key_id: str, bin_id: int, cached: _CachedBin
    ) -> ScoreCiphertext | None:
        """The bin's full scores against the key's centering vector, cached per version.

        Keyed by (tenant, key, bin) and checked against the bin's version, so
        scores computed under one key never answer for another.
        """
        hit = self.center_cache.get((tenant_id, key_id, bin_id))
        if hit is not None and hit[0] == cached.version:
            return hit[1]
        kernel = self.kernel(tenant_id, key_id)
        center = self.resident_center(kernel, tenant_id, key_id)
        if center is None or cached.cts is None:
            return None
        ct = kernel.score(cached.cts, center, "full")
        self.center_cache[(tenant_id, key_id, bin_id)] = (cached.version, ct)
        return ct

    def resident_center(self, kernel: BinKernel, tenant_id: str, key_id: str) -> AnyBin | None:
        """The key's centering vector in the form its bins are held in (packed once)."""
        key = (tenant_id, key_id)
        if key not in self.resident_centers:
            cts = self.centers.get(key)
            self.resident_centers[key] = kernel.resident(cts) if cts is not None else None
        return self.resident_centers[key]

    def bin(self, bin_id: int, min_version: int = 0, *, foreign: bool = False) -> _CachedBin:
        """The bin at ``min_version`` or newer (``-1``: whatever the database has now).

        ``foreign``: another worker owns it; kept among the last
        ``limits.max_foreign_bins`` such bins (unless this worker holds it anyway).
        """
        if foreign and bin_id not in self.bins:
            cached = self._load(bin_id, min_version, self.foreign)
            while len(self.foreign) > self.limits.max_foreign_bins:
                old, _ = self.foreign.popitem(last=False)
                for entry in [e for e in self.center_cache if e[2] == old]:
                    del self.center_cache[entry]
            return cached
        return self._load(bin_id, min_version, self.bins)

    def _load(self, bin_id: int, min_version: int, bins: OrderedDict[int, _CachedBin]) -> _CachedBin:
        cached = bins.get(bin_id)
        if cached is not None and min_version < 0:
            current = self.reader.version(bin_id)
            if current is None:
                raise NotFound(f"no bin {bin_id}")
            min_version = current
        if cached is not None and 0 <= min_version <= cached.version:
            bins.move_to_end(bin_id)
            return cached
        data = self.reader.load(bin_id)
        kernel = self.kernel(data.tenant_id, data.key_id)
        if cached is not None and cached.version == data.version:
            pass
        elif cached is not None and cached.cts is not None and data.base_seq <= cached.version:
            for seq, blob in data.deltas:  # incremental: only the newer contributions
                if seq > cached.version:
                    kernel.add_into(cached.cts, kernel.load_resident_bin(unpack_blobs(blob)))
            cached.version = data.version
        else:
            cts: AnyBin | None = None
            if data.base is not None:
                cts = kernel.load_resident_bin(unpack_blobs(data.base))
            for _, blob in data.deltas:
                contrib = kernel.load_resident_bin(unpack_blobs(blob))
                if cts is None:
                    cts = contrib
                else:
                    kernel.add_into(cts, contrib)
            cached = _CachedBin(data.version, cts, (data.tenant_id, data.key_id))
        bins[bin_id] = cached
        bins.move_to_end(bin_id)
        return cached


_state: _WorkerState | None = None
_idle = IdleFiller()

_F = TypeVar("_F", bound=Callable[..., Any])


def _call(fn: _F) -> _F:
    """A worker call: the idle filler pauses while it runs (server/idle_work.py)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _idle.busy():
            return fn(*args, **kwargs)

    return cast(_F, run)


def init(db: str, pending: Any = None) -> None:
    """Open the worker's reader of the store ``db`` names (a SQLite path or a URL).

    ``pending``: a shared integer the server keeps at the number of jobs it
    has submitted to this worker and not yet had answered (the idle filler
    waits while it is above zero).
    """
    global _state
    _idle.pending = pending
    from veilface.server.limits import bound_heap_growth

    bound_heap_growth()  # large argument buffers go back to the system once freed
    _state = _WorkerState(db)


def _s() -> _WorkerState:
    if _state is None:
        raise RuntimeError("worker not initialised")
    return _state


def ping() -> bool:
    return True


def configure(limits: WorkerLimits) -> None:
    """Apply the server's limits (called once on every worker at start-up)."""
    state = _s()
    state.limits = limits
    state.evict_kernels()


def resident_keys() -> int:
    """How many public contexts this worker holds loaded (for tests and metrics)."""
    return len(_s().kernels)


@_call
def check_stored(tenant_id: str, key_id: str, bin_id: int, start: int, stop: int) -> None:
    """Validate ciphertexts ``start:stop`` of a bin as the store holds it, and drop them.

    A bulk import writes each bin (invisible) before it is validated; the
    workers read their share back from the database rather than being sent
    it, so no ciphertext is copied through the pool and none is kept: after
    activation the owner loads the bin like any other (:func:`preload`).
    """
    data = _s().reader.load(bin_id)
    if data.base is None or (data.tenant_id, data.key_id) != (tenant_id, key_id):
        raise NotFound(f"no staged bin {bin_id} for this key")
    blobs = unpack_blobs(data.base)
    _s().kernel(tenant_id, key_id).load_checked_each(blobs[start:stop])


@_call
def preload(bin_ids: Sequence[int]) -> int:
    """Load bins into this worker's memory ahead of their first query (background)."""
    done = 0
    for bin_id in bin_ids:
        try:
            _s().bin(bin_id, -1)
            done += 1
        except NotFound:
            continue
    return done


@_call
def preload_foreign(tenant_id: str, key_id: str, bin_ids: Sequence[int]) -> int:
    """Load other workers' bins (and their center scores) into the foreign cache, ahead of use.

    The pool asks for this after a query it could not balance, so that the
    next one finds the bins here (:meth:`ScoringBackend.score`).
    """
    state = _s()
    done = 0
    for bin_id in bin_ids:
        try:
            cached = state.bin(bin_id, -1, foreign=True)
        except NotFound:
            continue
        state.center_scores(tenant_id, key_id, bin_id, cached)
        done += 1
    return done


@_call
def check_part(tenant_id: str, key_id: str, blobs: Sequence[bytes]) -> None:
    """Validate a share of a contribution's ciphertexts and drop them."""
    kernel = _s().kernel(tenant_id, key_id)
    kernel.load_checked_each(blobs)


@_call
def validate_probe(tenant_id: str, key_id: str, blobs: Sequence[bytes]) -> int:
    return len(_s().kernel(tenant_id, key_id).load_probe(blobs))


def forget(bin_ids: Sequence[int]) -> None:
    state = _s()
    for b in bin_ids:
        state.bins.pop(b, None)
        state.foreign.pop(b, None)
    gone = set(bin_ids)  # and their center scores (stale: the bin is gone or re-packed)
    for entry in [e for e in state.center_cache if e[2] in gone]:
        del state.center_cache[entry]


@dataclass(frozen=True)
class ScoreUnit:
    """One bin (or a share of its giant steps) to score for one response.

    ``keep``: the slots the response needs; every other slot of the score
    ciphertext is masked (:meth:`BinKernel.mask`). ``add_center``: add the
    bin's scores against the key's centering vector (re-ranking of centered
    probes; set on one share of a split bin only). ``foreign``: the bin's
    owner is another worker (kept here in the bounded foreign cache).
    """

    bin_id: int
    version: int
    first_giant: int
    stop_giant: int
    add_center: bool
    keep: tuple[int, ...]
    foreign: bool = False


#: Deserialized probes a worker keeps, by query, for the query's next stage.
_PROBE_MEMO_SIZE = 8
_probe_memo: OrderedDict[tuple[str, str, str], AnyBin] = OrderedDict()


@_call
def score(
    tenant_id: str,
    key_id: str,
    units: Sequence[ScoreUnit],
    probe_blobs: Sequence[bytes],
    query_id: str = "",
) -> list[bytes | None]:
    """Score work units; one masked ciphertext per unit (``None``: the bin has none yet).

    The probe is loaded (and so validated) here. The server process keeps
    the one probe cache of bytes (:class:`veilface.server.probes.ProbeCache`,
    bounded per tenant and in total); with ``query_id`` (a probe of that
    cache) the worker also keeps the deserialized form of the last
    :data:`_PROBE_MEMO_SIZE` queries, so a query's re-ranking does not load
    its probe again (about 2.4 ms). It is a memo of objects the worker itself
    loaded and validated, never of bytes it was sent. Each unit's ciphertext
    is masked on its own, with fresh masks, so a share of a split bin reveals
    no partial score either.
    """
    state = _s()
    kernel = state.kernel(tenant_id, key_id)
    memo_key = (tenant_id, key_id, query_id)
    probe = _probe_memo.get(memo_key) if query_id else None
    if probe is None:
        probe = kernel.load_resident_probe(probe_blobs)
        if query_id:
            _probe_memo[memo_key] = probe
            while len(_probe_memo) > _PROBE_MEMO_SIZE:
                _probe_memo.popitem(last=False)
    else:
        _probe_memo.move_to_end(memo_key)
    out: list[bytes | None] = []
    for unit in units:
        cached = state.bin(unit.bin_id, unit.version, foreign=unit.foreign)
        if cached.cts is None:
            out.append(None)
            continue
        ct = kernel.score_giants(cached.cts, probe, range(unit.first_giant, unit.stop_giant))
        if unit.add_center:
            centered = state.center_scores(tenant_id, key_id, unit.bin_id, cached)
            if centered is not None:
                kernel.add_scores(ct, centered)
        kernel.mask(ct, unit.keep)
        out.append(seal_io.to_bytes(ct))
    _idle.want(kernel.rerandomizer)
    return out


@_call
def check_staged(tenant_id: str, key_id: str, blob: bytes) -> bool:
    """Validate a staged template; False if the key's context cannot score staged templates."""
    kernel = _s().kernel(tenant_id, key_id)
    if not kernel.public.supports_staging:
        return False
    kernel.load_staged(blob)
    return True


@_call
def score_staged(
    tenant_id: str,
    key_id: str,
    blobs: Sequence[bytes],
    probe_blobs: Sequence[bytes],
    add_center: bool = False,
    keep: tuple[int, ...] | None = None,
) -> list[bytes]:
    """Full scores of staged templates, one masked ciphertext each.

    ``add_center``: the probe is centered (identification); add the key's
    centering vector so the score is the same as a bin's after re-ranking.
    ``keep=None`` (identification): only the mean over the slots survives
    the mask (:meth:`BinKernel.mask_keep_mean`); otherwise the given slots
    (verification: slot 0).
    """
    state = _s()
    kernel = state.kernel(tenant_id, key_id)
    probe = kernel.load_probe(probe_blobs)
    center = state.centers.get((tenant_id, key_id)) if add_center else None
    out = []
    for b in blobs:
        ct = kernel.score_staged(kernel.load_staged(b), probe, center)
        if keep is None:
            kernel.mask_keep_mean(ct)
        else:
            kernel.mask(ct, keep)
        out.append(seal_io.to_bytes(ct))
    _idle.want(kernel.rerandomizer)
    return out


@_call
def precompute_centers(tenant_id: str, key_id: str, bin_ids: Sequence[int]) -> int:
    """Warm the centering scores of bins after they change (runs in the background)."""
    state = _s()
    done = 0
    for bin_id in bin_ids:
        try:
            cached = state.bin(bin_id, -1)
        except NotFound:
            continue
        done += state.center_scores(tenant_id, key_id, bin_id, cached) is not None
    return done


def forget_key(tenant_id: str, key_id: str) -> None:
    """The key's center changed: drop what was derived from it (that key's entries only)."""
    state = _s()
    state.kernels.pop((tenant_id, key_id), None)
    state.centers.pop((tenant_id, key_id), None)
    state.resident_centers.pop((tenant_id, key_id), None)
    for entry in [e for e in state.center_cache if e[:2] == (tenant_id, key_id)]:
        del state.center_cache[entry]


@_call
def current(bin_id: int) -> tuple[int, bytes] | None:
    """The bin's merged ciphertexts (for compaction and re-packing)."""
    state = _s()
    try:
        cached = state.bin(bin_id, -1)
    except NotFound:
        return None
    if cached.cts is None:
        return None
    kernel = state.kernel(*cached.key)
    return cached.version, pack_blobs(kernel.serialize_bin(cached.cts))


__all__ = [
    "ScoreUnit",
    "WorkerLimits",
    "check_staged",
    "check_stored",
    "configure",
    "current",
    "forget",
    "init",
    "ping",
    "preload",
    "preload_foreign",
    "resident_keys",
    "score",
    "score_staged",
]
