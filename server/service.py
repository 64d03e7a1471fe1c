"""The data plane of the identification service (no protobuf, no grpc here).

Every method takes plain values, checks them at the boundary (identifiers,
counts, per-request limits) before any ciphertext is deserialized, and
returns plain records. Blocking database calls run in a thread; homomorphic
work runs in the worker pool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from veilface.crypto.kernel import NO_PUBLIC_KEY
from veilface.crypto.layout import DiagonalLayout
from veilface.crypto.params import get_param_set
from veilface.crypto.public_context import PublicContext, has_public_key, read_layout
from veilface.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from veilface.server import fair_queue, worker
from veilface.server.capacity import CapacityGuard, CapacityLimits, resident_bin_bytes
from veilface.server.config import ServerSettings
from veilface.server.enrollment import EnrollmentService
from veilface.server.identification import BinScore, IdentificationService
from veilface.server.limits import TenantLimiter
from veilface.server.scoring import ScoringBackend
from veilface.server.store.base import GalleryStore
from veilface.server.store.blobs import pack_blobs
from veilface.server.store.records import BinInfo, KeyRecord, KeyStats
from veilface.server.tokens import TENANT_SCOPES, IssuedToken, mint_token
from veilface.server.validation import (
    check_blob_sizes,
    check_count,
    check_handles,
    check_key_id,
    check_tenant_id,
)

log = logging.getLogger(__name__)

# What the SDK's protectors declare (veilface.client.protect); the server
# cannot check it on a sealed blob, it records it.
PROTECTIONS = frozenset({"blur", "pixelate", "mask", "adversarial"})


@dataclass(frozen=True)
class KeyView:
    record: KeyRecord
    layout: DiagonalLayout
    stats: KeyStats | None = None

    @property
    def rerandomizes(self) -> bool:
        """Whether the key's context carries a public key (without one no score is answered)."""
        return has_public_key(self.record.public_context)


class GalleryService:
    """Tenants, keys and photos; the shared pieces of enrollment and identification.

    ``enrollment`` (:class:`EnrollmentService`) and ``identification``
    (:class:`IdentificationService`) are the two stages the servicers call;
    both use this object's key views, occupancy cache, scoring helper and
    background tasks.
    """

    def __init__(self, store: GalleryStore, pool: ScoringBackend, settings: ServerSettings) -> None:
        self.store = store
        self.pool = pool
        self.settings = settings
        self._layouts: dict[tuple[str, str], KeyView] = {}
        # Occupied slots per bin, keyed by bin version (every change of a bin's
        # subjects bumps its version), so queries do not re-read 100k rows.
        self.occupancy_cache: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Per-tenant calls and scoring work in flight (server/limits.py).
        self.limits = TenantLimiter(settings.max_concurrent_requests, settings.max_scoring_bins)
        self._key_locks: dict[str, asyncio.Lock] = {}
        # What the whole gallery may hold (server/capacity.py), checked by enrollment.
        self.capacity = CapacityGuard(store, CapacityLimits.from_settings(settings), self._bin_bytes)
        log.info("gallery capacity: %s", self.capacity.describe())
        self.enrollment = EnrollmentService(self)
        self.identification = IdentificationService(self)

    # -- tenants and keys -----------------------------------------------

    async def create_tenant(self, tenant_id: str) -> IssuedToken:
        """A new tenant and its first API token, with every tenant scope (shown once)."""
        check_tenant_id(tenant_id)
        issued = mint_token(tenant_id, "initial", TENANT_SCOPES)
        await asyncio.to_thread(self.store.create_tenant, tenant_id, issued.record)
        log.info("created tenant %s (first token %s)", tenant_id, issued.record.token_id)
        return issued

    async def register_key(self, tenant_id: str, key_id: str, public_context: bytes) -> KeyView:
        check_key_id(key_id)
        # One registration per tenant at a time, so the count below cannot race.
        async with self._key_locks.setdefault(tenant_id, asyncio.Lock()):
            return await self._register_key(tenant_id, key_id, public_context)

    async def _register_key(self, tenant_id: str, key_id: str, public_context: bytes) -> KeyView:
        known = [rec.key_id for rec, _ in await asyncio.to_thread(self.store.list_keys, tenant_id)]
        if key_id not in known and len(known) >= self.settings.max_keys_per_tenant:
            raise ResourceExhausted(
                f"this tenant has {len(known)} keys, the most allowed "
                f"({self.settings.max_keys_per_tenant}); re-use or re-pack into an existing key"
            )
        public = await asyncio.to_thread(
            functools.partial(PublicContext.from_bytes, max_dim=self.settings.max_template_dim),
            public_context,
        )
        record = KeyRecord(
            tenant_id,
            key_id,
            public.param_set.name,
            public.layout.dim,
            public.layout.m,
            public_context,
            public.fingerprint,
        )
        replaces = await self._upgrade_of(tenant_id, key_id, public) if key_id in known else ""
        # The store checks the cap again under the tenant's lock: another
        # front-end on the same database may be registering a key too.
        await asyncio.to_thread(
            functools.partial(
                self.store.put_key,
                record,
                max_keys=self.settings.max_keys_per_tenant,
                replaces=replaces,
            )
        )
        if replaces:
            self._layouts.pop((tenant_id, key_id), None)
            await self.pool.broadcast(worker.forget_key, tenant_id, key_id)
            log.info("tenant %s added a public key to key %s (%s)", tenant_id, key_id, public.fingerprint)
        else:
            log.info("tenant %s registered key %s (%s)", tenant_id, key_id, public.fingerprint)
        return await self.key(tenant_id, key_id)

    async def _upgrade_of(self, tenant_id: str, key_id: str, public: PublicContext) -> str:
        """The stored fingerprint a new context may replace, or "" (then it must be the same).

        A key registered before response re-randomization has no public key
        and gets no score answered; registering it again with a context that
        has one, the same parameter set and the same layout, adds the public
        key to the key as it is (bins, subjects and center unchanged). The
        server cannot check that the public key belongs to the key's secret
        key; only the tenant's manage scope registers keys, and a public key
        of another secret key only makes that tenant's own scores garbage.
        """
        if public.public_key is None:
            return ""
        try:
            old = await asyncio.to_thread(self.store.get_key, tenant_id, key_id)
        except NotFound:
            return ""
        if has_public_key(old.public_context) or read_layout(old.public_context) != public.layout:
            return ""
        if old.param_set != public.param_set.name:
            return ""
        return old.fingerprint

    async def register_center(self, tenant_id: str, key_id: str, center: Sequence[bytes]) -> KeyView:
        view = await self.key(tenant_id, key_id)
        check_count(center, view.layout.g1, "center")
        max_each = get_param_set(view.record.param_set).max_ciphertext_bytes
        check_blob_sizes(center, max_each, "center")
        await self.pool.call(0, worker.validate_probe, tenant_id, key_id, list(center))
        await asyncio.to_thread(self.store.set_center, tenant_id, key_id, pack_blobs(center))
        self._layouts.pop((tenant_id, key_id), None)
        await self.pool.broadcast(worker.forget_key, tenant_id, key_id)
        return await self.key(tenant_id, key_id)

    async def key(self, tenant_id: str, key_id: str) -> KeyView:
        check_key_id(key_id)
        view = self._layouts.get((tenant_id, key_id))
        # A view without a public key is read again: another front-end may have added one.
        if view is None or not view.rerandomizes:
            rec = await asyncio.to_thread(self.store.get_key, tenant_id, key_id)
            # The layout (its version too) as the key's public context names it.
            view = KeyView(rec, read_layout(rec.public_context))
            self._layouts[(tenant_id, key_id)] = view
        return view

    async def _bin_bytes(self, tenant_id: str, key_id: str) -> int:
        view = await self.key(tenant_id, key_id)
        return resident_bin_bytes(view.record.param_set, view.layout)

    async def scoring_key(self, tenant_id: str, key_id: str) -> KeyView:
        """:meth:`key`, for a score request: FailedPrecondition if the key has no public key."""
        view = await self.key(tenant_id, key_id)
        if not view.rerandomizes:
            raise FailedPrecondition(NO_PUBLIC_KEY)
        return view

    async def describe(self, tenant_id: str) -> list[KeyView]:
        rows = await asyncio.to_thread(self.store.list_keys, tenant_id)
        out = []
        for rec, stats in rows:
            view = await self.key(tenant_id, rec.key_id)
            out.append(KeyView(rec, view.layout, stats))
        return out

    # -- photos -----------------------------------------------------------

    async def upload_photo(
        self, tenant_id: str, handle: str, sealed: bytes, protection: str, *, replaces: str = ""
    ) -> str:
        """Keep a sealed photo; ``replaces``: a photo id deleted in the same transaction (re-seal)."""
        check_handles([handle])
        if len(replaces) > 64:
            raise InvalidArgument("bad photo id to replace")
        if not sealed:
            raise InvalidArgument("empty photo")
        if len(sealed) > self.settings.max_photo_bytes:
            raise ResourceExhausted(f"photos are at most {self.settings.max_photo_bytes} bytes")
        if protection not in PROTECTIONS:
            raise InvalidArgument(f"protection must be one of {sorted(PROTECTIONS)}")
        return await asyncio.to_thread(
            self.store.add_photo, tenant_id, handle, sealed, protection, replaces=replaces
        )

    async def list_photos(self, tenant_id: str, handle: str) -> list[str]:
        check_handles([handle])
        return await asyncio.to_thread(self.store.list_photos, tenant_id, handle)

    async def fetch_photo(self, tenant_id: str, photo_id: str) -> tuple[str, bytes, str]:
        if not photo_id or len(photo_id) > 64:
            raise InvalidArgument("bad photo id")
        return await asyncio.to_thread(self.store.get_photo, tenant_id, photo_id)

    # -- shared helpers -------------------------------------------------

    async def with_occupancy(self, bins: Sequence[BinInfo]) -> list[BinInfo]:
        missing = [
            b.bin_id
            for b in bins
            if (hit := self.occupancy_cache.get(b.bin_id)) is None or hit[0] != b.version
        ]
        if missing:
            fresh = await asyncio.to_thread(self.store.occupancy, missing)
            versions = {b.bin_id: b.version for b in bins}
            for bin_id, slots in fresh.items():
                self.occupancy_cache[bin_id] = (versions[bin_id], slots)
        return [BinInfo(b.bin_id, b.version, b.label, self.occupancy_cache[b.bin_id][1]) for b in bins]

    async def score_bins(
        self,
        tenant_id: str,
        key_id: str,
        view: KeyView,
        bins: Sequence[BinInfo],
        probe: Sequence[bytes],
        stage: str,
        *,
        keep: Mapping[int, Sequence[int]] | None = None,
        split: bool = True,
        add_center: bool = False,
        query_id: str = "",
    ) -> list[BinScore]:
        """Score bins in the workers; every slot not in ``keep[bin_id]`` comes back masked.

        ``keep=None``: each bin's occupied slots (preselection needs them all).
        ``query_id``: the probe is (or is about to be) the probe cache's entry
        of that query, so workers may reuse its deserialized form.
        """
        if not bins:
            return []
        with self.limits.scoring(tenant_id, len(bins)), self.pool.stats.scoring(len(bins)):
            return await self._score_bins(
                tenant_id, key_id, view, bins, probe, stage,
                keep=keep, split=split, add_center=add_center, query_id=query_id,
            )

    async def _score_bins(
        self,
        tenant_id: str,
        key_id: str,
        view: KeyView,
        bins: Sequence[BinInfo],
        probe: Sequence[bytes],
        stage: str,
        *,
        keep: Mapping[int, Sequence[int]] | None,
        split: bool,
        add_center: bool,
        query_id: str = "",
    ) -> list[BinScore]:
        kept = {
            # Python ints already (the store's occupancy, a request's slots)
            b.bin_id: tuple(b.occupied if keep is None else keep[b.bin_id])
            for b in bins
        }
        results = await self.pool.score(
            tenant_id,
            key_id,
            [(b.bin_id, b.version) for b in bins],
            probe,
            view.layout.giants(stage),
            kept,
            split=split,
            add_center=add_center,
            query_id=query_id,
        )
        return [
            BinScore(b.bin_id, b.version, tuple(b.occupied), tuple(parts), label=b.label)
            for b in bins
            if (parts := results.get(b.bin_id))
        ]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a task in the background, kept referenced until it ends (cancelled on close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def background(self, fut: Awaitable[object], what: str) -> None:
        """Run ``fut`` in the background; a failure is logged, never raised."""

        async def run() -> None:
            # in a queue of its own beside the tenant's calls (server/fair_queue.py)
            fair_queue.share.set(fair_queue.background_share(fair_queue.share.get()))
            try:
                await fut
            except Exception:
                log.exception("background %s failed", what)

        self.spawn(run())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
