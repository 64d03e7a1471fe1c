"""Code that runs inside a scoring worker process.

Each worker owns the bins whose id maps to it (``bin_id % workers``), keeps
them deserialized in memory, and reads the database through its own
read-only connection. SEAL's evaluator is single-threaded and holds the GIL,
so processes are how the service uses both cores.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from veilface.crypto import seal_io
from veilface.crypto.kernel import Bin, BinKernel
from veilface.crypto.public_context import PublicContext
from veilface.errors import NotFound
from veilface.server.store.blobs import pack_blobs, unpack_blobs
from veilface.server.store.sqlite_store import BinReader

log = logging.getLogger(__name__)


@dataclass
class _CachedBin:
    version: int
    cts: Bin | None  # None: the bin holds no ciphertext yet


class _WorkerState:
    def __init__(self, db_path: str) -> None:
        self.reader = BinReader(db_path)
        self.kernels: dict[tuple[str, str], BinKernel] = {}
        self.bins: OrderedDict[int, _CachedBin] = OrderedDict()
        self.pending: dict[str, tuple[int, BinKernel, Bin, list[bytes] | None]] = {}
        self.probes: OrderedDict[tuple[str, str, str], Bin] = OrderedDict()
        self.centers: dict[tuple[str, str], Bin | None] = {}
        self.center_cache: dict[int, tuple[int, object]] = {}

    def kernel(self, tenant_id: str, key_id: str) -> BinKernel:
        k = self.kernels.get((tenant_id, key_id))
        if k is None:
            blob, _, center = self.reader.key_context(tenant_id, key_id)
            k = BinKernel(PublicContext.from_bytes(blob))
            self.kernels[(tenant_id, key_id)] = k
            self.centers[(tenant_id, key_id)] = (
                k.load_probe(unpack_blobs(center)) if center is not None else None
            )
        return k

    def probe(
        self, kernel: BinKernel, tenant_id: str, key_id: str, query_id: str, blobs: Sequence[bytes]
    ) -> Bin:
        """The query's probe, loaded once per worker and kept for its later stages."""
        probe = self.probes.get((tenant_id, key_id, query_id)) if query_id else None
        if probe is None:
            probe = kernel.load_probe(blobs)
            if query_id:
                self.probes[(tenant_id, key_id, query_id)] = probe
                while len(self.probes) > 16:
                    self.probes.popitem(last=False)
        return probe

    def center_scores(self, tenant_id: str, key_id: str, bin_id: int, cached: _CachedBin) -> object:
        """The bin's full scores against the key's centering vector, cached per version."""
        hit = self.center_cache.get(bin_id)
        if hit is not None and hit[0] == cached.version:
            return hit[1]
        kernel = self.kernel(tenant_id, key_id)
        center = self.centers.get((tenant_id, key_id))
        if center is None or cached.cts is None:
            return None
        ct = kernel.score(cached.cts, center, "full")
        self.center_cache[bin_id] = (cached.version, ct)
        return ct

    def bin(self, bin_id: int, min_version: int = 0) -> _CachedBin:
        """The bin at ``min_version`` or newer (``-1``: whatever the database has now)."""
        cached = self.bins.get(bin_id)
        if cached is not None and min_version < 0:
            current = self.reader.version(bin_id)
            if current is None:
                raise NotFound(f"no bin {bin_id}")
            min_version = current
        if cached is not None and 0 <= min_version <= cached.version:
            self.bins.move_to_end(bin_id)
            return cached
        data = self.reader.load(bin_id)
        kernel = self.kernel(data.tenant_id, data.key_id)
        if cached is not None and cached.version == data.version:
            pass
        elif cached is not None and cached.cts is not None and data.base_seq <= cached.version:
            for seq, blob in data.deltas:  # incremental: only the newer contributions
                if seq > cached.version:
                    kernel.add_into(cached.cts, kernel.load_bin(unpack_blobs(blob)))
            cached.version = data.version
        else:
            cts: Bin | None = None
            if data.base is not None:
                cts = kernel.load_bin(unpack_blobs(data.base))
            for _, blob in data.deltas:
                contrib = kernel.load_bin(unpack_blobs(blob))
                if cts is None:
                    cts = contrib
                else:
                    kernel.add_into(cts, contrib)
            cached = _CachedBin(data.version, cts)
        self.bins[bin_id] = cached
        self.bins.move_to_end(bin_id)
        return cached


_state: _WorkerState | None = None


def init(db_path: str) -> None:
    global _state
    _state = _WorkerState(db_path)


def _s() -> _WorkerState:
    if _state is None:
        raise RuntimeError("worker not initialised")
    return _state


def ping() -> bool:
    return True


def validate(
    tenant_id: str, key_id: str, blobs: Sequence[bytes], bin_id: int, part: tuple[int, int] | None = None
) -> str:
    """Load and check a contribution; keep it until the store commits it.

    With ``part=(start, stop)`` only those ciphertexts are checked and kept
    (another worker checks the rest in parallel); :func:`commit` loads the
    missing ones after the write is acknowledged.
    """
    state = _s()
    kernel = state.kernel(tenant_id, key_id)
    if part is None:
        cts: list[object] = list(kernel.load_bin(blobs))
    else:
        start, stop = part
        cts = [None] * len(blobs)
        cts[start:stop] = kernel.load_some(blobs, start, stop)
    token = secrets.token_hex(8)
    state.pending[token] = (bin_id, kernel, cts, list(blobs) if part else None)
    return token


def check_part(tenant_id: str, key_id: str, blobs: Sequence[bytes]) -> None:
    """Validate a share of a contribution's ciphertexts and drop them."""
    kernel = _s().kernel(tenant_id, key_id)
    kernel.load_checked_each(blobs)


def validate_probe(tenant_id: str, key_id: str, blobs: Sequence[bytes]) -> int:
    return len(_s().kernel(tenant_id, key_id).load_probe(blobs))


def commit(token: str, new_version: int) -> None:
    """The store made the contribution durable as ``new_version``: fold it in."""
    state = _s()
    item = state.pending.pop(token, None)
    if item is None:
        return
    bin_id, kernel, cts, blobs = item
    if blobs is not None:  # fill in the part another worker validated
        missing = [i for i, ct in enumerate(cts) if ct is None]
        if missing:
            loaded = kernel.load_some(blobs, missing[0], missing[-1] + 1)
            for i, ct in zip(range(missing[0], missing[-1] + 1), loaded):
                cts[i] = ct
    cached = state.bins.get(bin_id)
    if cached is not None and cached.version >= new_version:
        return  # a query already reloaded the bin with this contribution
    if new_version == 1 and cached is None:
        state.bins[bin_id] = _CachedBin(1, cts)
    elif cached is not None and cached.version == new_version - 1:
        if cached.cts is None:
            cached.cts = cts
        else:
            kernel.add_into(cached.cts, cts)
        cached.version = new_version
    else:
        state.bins.pop(bin_id, None)  # reload lazily


def discard(token: str) -> None:
    _s().pending.pop(token, None)


def forget(bin_ids: Sequence[int]) -> None:
    for b in bin_ids:
        _s().bins.pop(b, None)


def score(
    tenant_id: str,
    key_id: str,
    units: Sequence[tuple[int, int, int, int, bool]],
    probe_blobs: Sequence[bytes],
    query_id: str = "",
) -> list[bytes | None]:
    """Score work units ``(bin_id, version, first_giant, stop_giant, add_center)``.

    Returns one ciphertext per unit (``None`` for a bin with no ciphertext
    yet). With ``add_center`` the bin's scores against the key's centering
    vector are added (re-ranking of centered probes). The loaded probe is
    kept under ``query_id`` so the re-ranking stage of the same query does
    not deserialize it again.
    """
    state = _s()
    kernel = state.kernel(tenant_id, key_id)
    probe = state.probe(kernel, tenant_id, key_id, query_id, probe_blobs)
    out: list[bytes | None] = []
    for bin_id, version, g0, g1, add_center in units:
        cached = state.bin(bin_id, version)
        if cached.cts is None:
            out.append(None)
            continue
        ct = kernel.score_giants(cached.cts, probe, range(g0, g1))
        if add_center:
            centered = state.center_scores(tenant_id, key_id, bin_id, cached)
            if centered is not None:
                kernel.add_scores(ct, centered)
        out.append(seal_io.to_bytes(ct))
    return out


def check_staged(tenant_id: str, key_id: str, blob: bytes) -> bool:
    """Validate a staged template; False if the key's context cannot score staged templates."""
    kernel = _s().kernel(tenant_id, key_id)
    if not kernel.public.supports_staging:
        return False
    kernel.load_staged(blob)
    return True


def score_staged(
    tenant_id: str,
    key_id: str,
    blobs: Sequence[bytes],
    probe_blobs: Sequence[bytes],
    query_id: str = "",
    add_center: bool = False,
) -> list[bytes]:
    """Full scores of staged templates (one ciphertext each, every slot the score).

    ``add_center``: the probe is centered (identification); add the key's
    centering vector so the score is the same as a bin's after re-ranking.
    """
    state = _s()
    kernel = state.kernel(tenant_id, key_id)
    probe = state.probe(kernel, tenant_id, key_id, query_id, probe_blobs)
    center = state.centers.get((tenant_id, key_id)) if add_center else None
    return [seal_io.to_bytes(kernel.score_staged(kernel.load_staged(b), probe, center)) for b in blobs]


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
    """The key's center changed: drop what was derived from it."""
    state = _s()
    state.kernels.pop((tenant_id, key_id), None)
    state.centers.pop((tenant_id, key_id), None)
    state.center_cache.clear()


def current(bin_id: int) -> tuple[int, bytes] | None:
    """The bin's merged ciphertexts (for compaction and re-packing)."""
    state = _s()
    try:
        cached = state.bin(bin_id, -1)
    except NotFound:
        return None
    if cached.cts is None:
        return None
    return cached.version, pack_blobs(BinKernel.serialize(cached.cts))


__all__ = [
    "check_staged",
    "commit",
    "current",
    "discard",
    "forget",
    "init",
    "ping",
    "score",
    "score_staged",
    "validate",
]
