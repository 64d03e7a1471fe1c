"""The server's one cache of probes: query id -> validated probe ciphertexts.

Preselection remembers its probe so that the re-ranking of the same query
(``ScoreCandidates`` with the query id) need not upload it again. This is
the only place a probe outlives the request that brought it:

- The cache lives in the server process and holds the probe's serialized
  ciphertexts, which the workers need anyway (each scoring call sends them
  to the worker processes).
- A worker loads the probe at the start of every scoring call, which
  validates it, and drops it when the call returns. Keeping loaded probes in
  the workers too would be a second cache per process, bounded separately,
  holding deserialized ciphertexts (larger than the seeded bytes) for up to
  the whole TTL, to save the few milliseconds of loading ``g1`` ciphertexts
  per call.

A probe is put here only after a worker has loaded it (so random bytes are
never remembered) and after each blob passed its size check on arrival.
The cache is bounded by entry count, total bytes and bytes per tenant, and
entries expire after a TTL. Over a bound, the oldest entries go first (a
tenant over its own share loses its own oldest entries, never another
tenant's); a forgotten probe costs the client one more upload (it gets
NOT_FOUND and resends it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from veilface.errors import NotFound


@dataclass(frozen=True)
class CachedProbe:
    """A validated probe of one query, under its tenant and key."""

    tenant_id: str
    key_id: str
    blobs: tuple[bytes, ...]
    nbytes: int
    expires_at: float


@dataclass(frozen=True)
class ProbeLimits:
    """Bounds of the cache (from :class:`veilface.server.config.ServerSettings`)."""

    max_entries: int
    max_bytes: int
    max_bytes_per_tenant: int
    ttl_s: float


class ProbeCache:
    """Recent queries' probes, bounded by count, bytes, bytes per tenant and age.

    Not thread-safe: used from the server's event loop only.
    """

    def __init__(self, limits: ProbeLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._entries: OrderedDict[str, CachedProbe] = OrderedDict()
        self._bytes = 0
        self._tenant_bytes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of all cached probes."""
        return self._bytes

    def tenant_bytes(self, tenant_id: str) -> int:
        """Bytes of the tenant's cached probes."""
        return self._tenant_bytes.get(tenant_id, 0)

    def put(self, query_id: str, tenant_id: str, key_id: str, blobs: Sequence[bytes]) -> bool:
        """Remember a validated probe; False if it alone exceeds a bound (not kept)."""
        nbytes = sum(len(b) for b in blobs)
        lim = self.limits
        self._expire()
        if lim.max_entries <= 0 or nbytes > min(lim.max_bytes, lim.max_bytes_per_tenant):
            return False
        self._drop(query_id)
        self._entries[query_id] = CachedProbe(
            tenant_id, key_id, tuple(blobs), nbytes, self._clock() + lim.ttl_s
        )
        self._bytes += nbytes
        self._tenant_bytes[tenant_id] = self.tenant_bytes(tenant_id) + nbytes
        while self.tenant_bytes(tenant_id) > lim.max_bytes_per_tenant:
            oldest = next(q for q, e in self._entries.items() if e.tenant_id == tenant_id)
            self._drop(oldest)
        while len(self._entries) > lim.max_entries or self._bytes > lim.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def get(self, query_id: str, tenant_id: str, key_id: str) -> tuple[bytes, ...]:
        """The probe of a query of this tenant and key; NotFound if unknown or expired."""
        self._expire()
        entry = self._entries.get(query_id) if query_id else None
        if entry is None or (entry.tenant_id, entry.key_id) != (tenant_id, key_id):
            raise NotFound("unknown or expired query id; send the probe again")
        return entry.blobs

    def _expire(self) -> None:
        now = self._clock()
        while self._entries and next(iter(self._entries.values())).expires_at <= now:
            self._drop(next(iter(self._entries)))

    def _drop(self, query_id: str) -> None:
        entry = self._entries.pop(query_id, None)
        if entry is None:
            return
        self._bytes -= entry.nbytes
        left = self._tenant_bytes[entry.tenant_id] - entry.nbytes
        if left:
            self._tenant_bytes[entry.tenant_id] = left
        else:
            del self._tenant_bytes[entry.tenant_id]
