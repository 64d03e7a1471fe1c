"""Gallery capacity: refuse an enrollment the machine cannot hold, before anything is written.

The scoring workers keep every bin of the gallery deserialized in memory
(server/worker.py), so the gallery's size is bounded by the machine's RAM:
past it the kernel's out-of-memory killer ends a worker, and with it every
query. Two limits, over the whole server (every tenant), keep that from
happening:

``max_templates``
    Subjects in bins plus staged templates (0: no count cap).
``max_gallery_bytes``
    Memory of the loaded bins. A bin's cost depends on its key only (a bin
    is allocated whole, however few templates it holds): ``d_pad``
    ciphertexts plus the cached scores against the key's center, each two
    polynomials of N 64-bit words per data prime
    (:func:`resident_bin_bytes`: 8.06 MiB at n4096/128-d, measured 7.94
    MiB, about 2 KiB per template in a full bin). 0 derives the budget as
    ``gallery_memory_fraction`` (default 0.5) of the machine's memory
    (:func:`machine_memory_bytes`): 12 GiB on a 24 GiB machine, room for
    1,524 such bins, 6.2 million templates in full bins or a million in
    bins a sixth full. What a process needs besides its bins (about 0.5
    GiB for the server and two workers, the probe cache, messages in
    flight) is what the rest of the fraction leaves.

Checks run when a write would add templates or bins: ReserveSlots (a new
bin only when no bin of the label has room: the store refuses to create
one, :meth:`GalleryStore.reserve`'s ``no_new_bin``), EnrollStaged, and a
BulkEnroll stream (its declared bins at the first chunk, then each chunk
before it is written; a re-pack is checked on the bins it adds net of
those it replaces, so shrinking a gallery is never refused). A refused
stream is aborted whole, as any failed stream (nothing becomes visible).

Within one front-end the check and the admitted writes in flight are
counted together, so concurrent enrollments cannot overshoot a limit.
Front-ends sharing a PostgreSQL store each read the store's totals, but
two of them admitting at the same instant may both pass: the limit may
then be passed by what two requests add (at most a stream's bins).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from veilface.crypto.layout import DiagonalLayout
from veilface.crypto.params import get_param_set
from veilface.errors import GalleryFull, NotFound
from veilface.server.config import ServerSettings
from veilface.server.store.base import GalleryStore
from veilface.server.store.records import GalleryUsage

log = logging.getLogger(__name__)

_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)

#: How to raise each limit, for the refusal messages.
_RAISE_TEMPLATES = "veilface serve --max-templates N, or VEILFACE_MAX_TEMPLATES"
_RAISE_BYTES = (
    "veilface serve --max-gallery-mb N, or VEILFACE_MAX_GALLERY_BYTES "
    "(or VEILFACE_GALLERY_MEMORY_FRACTION)"
)


def machine_memory_bytes() -> int:
    """This machine's memory: physical RAM, or the cgroup's limit when that is smaller.

    0 if neither can be read (then no derived budget applies).
    """
    try:
        phys = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        phys = 0
    for path in _CGROUP_LIMITS:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < (phys or int(raw) + 1):
            return int(raw)
    return max(phys, 0)


def resident_bin_bytes(param_set: str, layout: DiagonalLayout) -> int:
    """Memory a scoring worker holds for one loaded bin of a key (its ciphertexts, its center scores)."""
    return (layout.n_ciphertexts + 1) * get_param_set(param_set).resident_ciphertext_bytes


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class CapacityLimits:
    """The server's two gallery limits (0: none) and how the memory budget was set."""

    max_templates: int = 0
    max_gallery_bytes: int = 0
    budget_source: str = "max_gallery_bytes"

    @classmethod
    def from_settings(
        cls, settings: ServerSettings, *, machine_bytes: int | None = None
    ) -> CapacityLimits:
        """The configured limits; a derived budget when ``max_gallery_bytes`` is 0 and scoring is local."""
        if settings.max_gallery_bytes:
            return cls(settings.max_templates, settings.max_gallery_bytes)
        if settings.scoring != "local":  # the bins live on the cluster's nodes, not here
            return cls(settings.max_templates, 0)
        total = machine_memory_bytes() if machine_bytes is None else machine_bytes
        budget = int(total * settings.gallery_memory_fraction)
        source = (
            f"{settings.gallery_memory_fraction:.0%} of this machine's {_gib(total)}, "
            "the default"
        )
        return cls(settings.max_templates, budget, source)


class CapacityGuard:
    """Admit gallery writes against :class:`CapacityLimits` (see the module docstring).

    ``bin_bytes(tenant_id, key_id)`` gives the resident cost of one bin of a
    key (:func:`resident_bin_bytes` of its parameters). Runs on the server's
    event loop: the counters need no lock, the lock only keeps one
    admission's read of the store and its check together.
    """

    def __init__(
        self,
        store: GalleryStore,
        limits: CapacityLimits,
        bin_bytes: Callable[[str, str], Awaitable[int]],
    ) -> None:
        self.store = store
        self.limits = limits
        self._bin_bytes_of = bin_bytes
        self._bin_bytes: dict[tuple[str, str], int] = {}
        self._lock = asyncio.Lock()
        self._pending_bytes = 0
        self._pending_templates = 0
        # Admissions that ended while another one was checking: applied after its check.
        self._deferred: list[tuple[int, int]] = []

    @property
    def enabled(self) -> bool:
        return bool(self.limits.max_templates or self.limits.max_gallery_bytes)

    async def bin_bytes(self, tenant_id: str, key_id: str) -> int:
        hit = self._bin_bytes.get((tenant_id, key_id))
        if hit is None:
            hit = self._bin_bytes[(tenant_id, key_id)] = await self._bin_bytes_of(tenant_id, key_id)
        return hit

    async def held_bytes(self, usage: GalleryUsage) -> int:
        """Estimated memory of every bin the store holds (every tenant, every state)."""
        total = 0
        for k in usage.keys:
            try:
                total += k.bins * await self.bin_bytes(k.tenant_id, k.key_id)
            except NotFound:  # a key gone since the read: its bins went with it
                continue
        return total

    async def check_bins(self, tenant_id: str, key_id: str, bins: int) -> None:
        """Refuse up front (GalleryFull) a stream whose ``bins`` new bins cannot all be held."""
        if bins > 0 and self.limits.max_gallery_bytes:
            async with self.admit(tenant_id, key_id, bins=bins):
                pass

    @contextlib.asynccontextmanager
    async def admit(
        self,
        tenant_id: str,
        key_id: str,
        *,
        bins: int = 0,
        templates: int = 0,
        bin_optional: bool = False,
    ) -> AsyncIterator[str]:
        """Hold room for a write of ``bins`` bins and ``templates`` templates while the block runs.

        Raises GalleryFull if either limit would be passed. With
        ``bin_optional`` (a reservation, which needs a new bin only when no
        bin of its label has room) a bin past the budget is not refused
        here: the block receives the refusal message to pass to the store
        as ``no_new_bin`` ("" when the bin fits).
        """
        need_templates = max(templates, 0) if self.limits.max_templates else 0
        check_bytes = bins > 0 and bool(self.limits.max_gallery_bytes)
        if not (need_templates or check_bytes):
            yield ""
            return
        need_bytes, refusal = 0, ""
        async with self._lock:
            try:
                usage = await asyncio.to_thread(
                    self.store.gallery_usage, count_templates=bool(need_templates)
                )
                if need_templates:
                    self._check_templates(usage, need_templates)
                if check_bytes:
                    per_bin = await self.bin_bytes(tenant_id, key_id)
                    held = await self.held_bytes(usage) + self._pending_bytes
                    if held + bins * per_bin > self.limits.max_gallery_bytes:
                        refusal = self._bytes_message(bins, per_bin)
                        log.warning(
                            "gallery memory budget reached: %s held of %s; refused %d more bin(s)",
                            _gib(held), _gib(self.limits.max_gallery_bytes), bins,
                        )
                        if not bin_optional:
                            raise GalleryFull(refusal)
                    else:
                        need_bytes = bins * per_bin
                self._pending_bytes += need_bytes
                self._pending_templates += need_templates
            finally:
                for b, t in self._deferred:
                    self._pending_bytes -= b
                    self._pending_templates -= t
                self._deferred.clear()
        try:
            yield refusal
        finally:
            if self._lock.locked():  # another admission read the store before this write ended
                self._deferred.append((need_bytes, need_templates))
            else:
                self._pending_bytes -= need_bytes
                self._pending_templates -= need_templates

    def _check_templates(self, usage: GalleryUsage, n: int) -> None:
        cap = self.limits.max_templates
        if usage.templates + self._pending_templates + n > cap:
            log.warning("template cap reached: %d held of %d; refused %d more", usage.templates, cap, n)
            raise GalleryFull(
                f"this server holds at most {cap:,} templates (max_templates) and {n:,} more "
                f"would pass it; nothing was written. The operator raises it with {_RAISE_TEMPLATES}"
            )

    def _bytes_message(self, bins: int, per_bin: int) -> str:
        return (
            f"the server's gallery memory budget is reached: {bins:,} more bin(s) of this key "
            f"({_gib(per_bin)} each, held loaded by the scoring workers) would pass "
            f"max_gallery_bytes = {_gib(self.limits.max_gallery_bytes)} "
            f"({self.limits.budget_source}); nothing was written. The operator raises it with "
            f"{_RAISE_BYTES}, or adds memory; re-packing into fuller bins frees room"
        )

    def describe(self) -> str:
        """The limits in words, for the start-up log."""
        parts = []
        if self.limits.max_gallery_bytes:
            parts.append(
                f"gallery memory budget {_gib(self.limits.max_gallery_bytes)} "
                f"({self.limits.budget_source})"
            )
        if self.limits.max_templates:
            parts.append(f"at most {self.limits.max_templates:,} templates")
        return "; ".join(parts) or "no gallery capacity limit"


__all__ = [
    "CapacityGuard",
    "CapacityLimits",
    "machine_memory_bytes",
    "resident_bin_bytes",
]
