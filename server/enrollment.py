"""Enrollment: slot reservations, contributions, bulk import, staging, deletion.

Every method checks its input at the boundary before any ciphertext is
deserialized, and makes a write durable before acknowledging it. The shared
pieces (key views, the worker pool, background tasks) live in
:class:`veilface.server.service.GalleryService`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from veilface.crypto.ciphertext_checks import load_checked
from veilface.crypto.params import get_param_set
from veilface.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from veilface.server import worker
from veilface.server.store.blobs import pack_blobs
from veilface.server.store.records import BinInfo, BinSummary, Reservation, StagedRecord
from veilface.server.validation import (
    check_blob_sizes,
    check_count,
    check_handles,
    check_id,
    check_int64,
    check_label,
)

if TYPE_CHECKING:
    from veilface.server.service import GalleryService, KeyView

log = logging.getLogger(__name__)


#: Keys whose staged-scoring support the front-end remembers (oldest forgotten first).
STAGING_MEMO_KEYS = 4096


@dataclass(frozen=True)
class BulkChunk:
    tenant_id: str
    key_id: str
    label: str
    handles: Sequence[str]
    slots: Sequence[int]
    ciphertexts: Sequence[bytes]
    replaces: Sequence[tuple[int, int]] = ()  # first chunk: (bin id, version) swapped out at the end
    renew_handles: bool = False  # first chunk, with replaces: new handles (key rotation), counts checked
    total_bins: int = 0  # first chunk: how many chunks (bins) the stream holds; required


@dataclass(frozen=True)
class EnrollResult:
    """An acknowledged (durable) contribution: its bin, the slots it took, the bin's new version."""

    bin_id: int
    slots: tuple[int, ...]
    version: int


@dataclass(frozen=True)
class BulkResult:
    """An acknowledged bulk stream: the bins it activated and the subjects they hold."""

    bin_ids: tuple[int, ...]
    subjects: int


@dataclass(frozen=True)
class SubjectBin:
    """A subject's bin whole, read at ``info.version``: the subject's slot, packed ciphertexts."""

    key_id: str
    info: BinInfo
    slot: int
    blob: bytes


@dataclass(frozen=True)
class FetchedBin:
    """A bin whole, read at ``info.version``: subjects and packed ciphertexts.

    ``slots[i]`` holds ``handles[i]``, by slot.
    """

    key_id: str
    info: BinInfo
    slots: tuple[int, ...]
    handles: tuple[str, ...]
    blob: bytes


def max_ciphertext_bytes(view: KeyView) -> int:
    """Largest ciphertext accepted under the key (its parameter set's fresh ciphertext)."""
    return int(get_param_set(view.record.param_set).max_ciphertext_bytes)


@dataclass
class _Compactions:
    scheduled: set[int] = field(default_factory=set)
    last_write: dict[int, float] = field(default_factory=dict)


class EnrollmentService:
    """Writes to a tenant's gallery (enroll, bulk import, staging, delete, re-pack reads)."""

    def __init__(self, core: GalleryService) -> None:
        self.core = core
        self.store = core.store
        self.pool = core.pool
        self.settings = core.settings
        self._compactions = _Compactions()
        self._staged_turn = 0
        # (tenant, key, context fingerprint) -> whether its context can score staged templates
        self._staging: dict[tuple[str, str, str], bool] = {}
        self._seal_contexts: dict[str, Any] = {}

    async def reserve(self, tenant_id: str, key_id: str, label: str, count: int) -> Reservation:
        view = await self.core.key(tenant_id, key_id)
        check_label(label)
        if count < 1:
            raise InvalidArgument("reserve at least one slot")
        limit = min(self.settings.max_reserve, view.layout.capacity)
        if count > limit:
            raise ResourceExhausted(f"at most {limit} slots per reservation; use BulkEnroll")
        # A new bin only if none of the label has room: past the memory budget the store refuses it.
        capacity = self.core.capacity.admit(tenant_id, key_id, bins=1, templates=count, bin_optional=True)
        async with capacity as no_new_bin:
            return await asyncio.to_thread(
                self.store.reserve,
                tenant_id,
                key_id,
                label,
                count,
                view.layout.capacity,
                self.settings.reservation_ttl_s,
                self.settings.max_reservations_per_tenant,
                no_new_bin,
            )

    async def enroll(
        self,
        tenant_id: str,
        key_id: str,
        reservation_id: str,
        handles: Sequence[str],
        chunks: AsyncIterator[Sequence[bytes]],
        staged_id: int = 0,
    ) -> EnrollResult:
        """Validate a contribution as its ciphertexts stream in, then make it durable.

        With ``staged_id`` the contribution is the fold of that staged
        template (one handle): the bin delta is written and the staged row
        removed in one transaction.
        """
        check_int64(staged_id, "staged id")
        view = await self.core.key(tenant_id, key_id)
        res = await asyncio.to_thread(self.store.get_reservation, tenant_id, reservation_id)
        if res.key_id != key_id:
            raise InvalidArgument("the reservation was made for another key")
        check_handles(handles)
        if len(handles) != len(res.slots):
            raise InvalidArgument(f"the reservation holds {len(res.slots)} slots; send as many handles")
        if staged_id and len(handles) != 1:
            raise InvalidArgument("a fold of a staged template carries exactly one handle")
        expected = view.layout.n_ciphertexts
        max_each = max_ciphertext_bytes(view)
        blobs: list[bytes] = []
        checks: list[asyncio.Future[None]] = []
        try:
            async for chunk in chunks:
                if len(blobs) + len(chunk) > expected:
                    raise InvalidArgument(f"a contribution is {expected} ciphertexts for this key")
                check_blob_sizes(chunk, max_each, "contribution")  # on arrival, before any is kept
                blobs.extend(chunk)
                # Each chunk is checked by the next worker while more arrive.
                worker_idx = len(checks) % self.pool.n
                checks.append(
                    asyncio.ensure_future(
                        self.pool.call(worker_idx, worker.check_part, tenant_id, key_id, list(chunk))
                    )
                )
            check_count(blobs, expected, "contribution")
            await asyncio.gather(*checks)
        except BaseException:
            for c in checks:
                c.cancel()
            await asyncio.gather(*checks, return_exceptions=True)
            blobs.clear()  # a refused contribution's megabytes go now, not with the exception
            checks.clear()
            raise
        # Checked again at commit: reservations hold slots, not templates (a fold adds none).
        async with self.core.capacity.admit(tenant_id, key_id, templates=0 if staged_id else len(handles)):
            version = await asyncio.to_thread(
                self.store.commit_enroll, res, list(handles), pack_blobs(blobs), staged_id
            )
        # Durable now: acknowledge. The owner folds the new delta into its
        # in-memory bin when the bin is next scored or compacted (whichever
        # comes first), so a burst of enrollments never waits for it.
        self._schedule_compaction(res.bin_id)
        return EnrollResult(bin_id=res.bin_id, slots=tuple(res.slots), version=version)

    async def enroll_staged(
        self, tenant_id: str, key_id: str, label: str, handle: str, ciphertext: bytes
    ) -> int:
        """Keep one template in the key's staging area; acknowledged once durable."""
        view = await self.core.key(tenant_id, key_id)
        check_label(label)
        check_handles([handle])
        if not ciphertext:
            raise InvalidArgument("a staged template is one ciphertext; got none")
        check_blob_sizes([ciphertext], max_ciphertext_bytes(view), "staged template")
        ok = await self._check_staged(
            tenant_id, key_id, view.record.fingerprint, view.record.param_set, ciphertext
        )
        if not ok:
            raise FailedPrecondition(
                "this key's public context has no staged-scoring rotations; "
                "register a new key (or enroll straight into a bin)"
            )
        async with self.core.capacity.admit(tenant_id, key_id, templates=1):
            return await asyncio.to_thread(
                self.store.stage_template,
                tenant_id,
                key_id,
                label,
                handle,
                ciphertext,
                self.settings.max_staged,
            )

    async def _check_staged(
        self, tenant_id: str, key_id: str, fingerprint: str, param_set: str, ciphertext: bytes
    ) -> bool:
        """Validate a staged template; False if the key's context cannot score staged templates.

        The first of a key goes to a worker, which has the key's Galois keys
        and says whether they cover staged scoring; after that the check is
        here, in the front-end (one ciphertext load, ~0.1 ms, needing only
        the parameter set's SEAL context), so an acknowledgement never waits
        behind the workers' queue: a bulk import's bin preloads, a strict
        search of a million.
        """
        known = self._staging.get((tenant_id, key_id, fingerprint))
        if known is None:
            # Any worker can check it; alternate so two kiosks enrolling at once use both cores.
            self._staged_turn = (self._staged_turn + 1) % self.pool.n
            known = bool(
                await self.pool.call(self._staged_turn, worker.check_staged, tenant_id, key_id, ciphertext)
            )
            if len(self._staging) >= STAGING_MEMO_KEYS:
                self._staging.pop(next(iter(self._staging)))
            self._staging[(tenant_id, key_id, fingerprint)] = known
            return known
        if known:
            ps = get_param_set(param_set)
            ctx = self._seal_contexts.get(ps.name)
            if ctx is None:
                ctx = self._seal_contexts[ps.name] = await asyncio.to_thread(ps.seal_context)
            await asyncio.to_thread(load_checked, ctx, ciphertext, scale=ps.scale, what="staged template")
        return known

    async def fetch_staged(self, tenant_id: str, key_id: str, limit: int) -> list[StagedRecord]:
        await self.core.key(tenant_id, key_id)
        cap = self.settings.max_staged
        return await asyncio.to_thread(
            self.store.staged_templates, tenant_id, key_id, None, limit=min(limit or cap, cap)
        )

    async def bulk_enroll(self, chunks: AsyncIterator[BulkChunk], tenant_of_call: str) -> BulkResult:
        """Stage every chunk as a new bin; activate them all only at the end.

        The first chunk declares ``total_bins``; the bins become visible only
        when exactly that many chunks arrived and the stream ended cleanly.
        A stream that is cut (the client died, cancelled, its iterator
        raised) can look like a clean end to the server, so the count is
        what tells them apart: anything short of it removes every staged bin.

        Each chunk is checked as it arrives (counts, sizes, then its
        ciphertexts, read back from the store by the workers) and nothing of
        it is kept in memory; the owners load the bins after activation.

        A stream whose first chunk names bins it ``replaces`` is a re-pack
        (routing retrained, key rotation): at the end the named bins go and
        the new ones take over their handles, in one transaction.
        """
        stream_id = secrets.token_hex(12)
        staged: list[int] = []
        replaces: list[tuple[int, int]] = []
        renew = False
        declared = 0
        try:
            async for chunk in chunks:
                if chunk.renew_handles:
                    if staged or not chunk.replaces:
                        raise InvalidArgument(
                            "only the first chunk of a re-pack (with replaces) may renew the handles"
                        )
                    renew = True
                if chunk.replaces:
                    if staged or replaces:
                        raise InvalidArgument("only the first chunk of a stream names the bins it replaces")
                    if len(chunk.replaces) > self.settings.max_bins_per_request:
                        raise ResourceExhausted(
                            f"a re-pack replaces at most {self.settings.max_bins_per_request} bins"
                        )
                    replaces = [
                        (check_id(b, "replaced bin id"), check_int64(v, "replaced bin version"))
                        for b, v in chunk.replaces
                    ]
                if not staged:
                    declared = self._declared_bins(chunk.total_bins, repack=bool(replaces))
                elif chunk.total_bins:
                    raise InvalidArgument("only the first chunk of a stream declares total_bins")
                if len(staged) >= declared:
                    raise InvalidArgument(f"the stream declared {declared} bins and sends more")
                if chunk.tenant_id != tenant_of_call:
                    raise PermissionDenied("a bulk stream may only write to its own tenant")
                view = await self.core.key(chunk.tenant_id, chunk.key_id)
                if not staged:  # the stream's new bins (a re-pack's net of those it replaces)
                    await self.core.capacity.check_bins(
                        chunk.tenant_id, chunk.key_id, declared - len(replaces)
                    )
                check_label(chunk.label)
                check_handles(chunk.handles)
                if not chunk.handles or len(chunk.handles) != len(chunk.slots):
                    raise InvalidArgument("each bulk chunk needs one slot per handle, and at least one")
                view.layout.check_slots(chunk.slots)
                check_count(chunk.ciphertexts, view.layout.n_ciphertexts, "bin")
                check_blob_sizes(chunk.ciphertexts, max_ciphertext_bytes(view), "bin")
                new = 0 if replaces else 1  # a re-pack was checked on its net bins above
                async with self.core.capacity.admit(
                    chunk.tenant_id, chunk.key_id, bins=new, templates=new * len(chunk.handles)
                ):
                    bin_id = await asyncio.to_thread(
                        self.store.stage_bin,
                        chunk.tenant_id,
                        chunk.key_id,
                        chunk.label,
                        stream_id,
                        list(chunk.handles),
                        [int(s) for s in chunk.slots],
                        pack_blobs(chunk.ciphertexts),
                        repack=bool(replaces),
                    )
                staged.append(bin_id)
                await self._check_stored_bin(
                    chunk.tenant_id, chunk.key_id, bin_id, view.layout.n_ciphertexts
                )
            if not staged:
                raise InvalidArgument("empty bulk stream")
            if len(staged) != declared:
                raise InvalidArgument(
                    f"the stream ended after {len(staged)} of the {declared} bins it declared; "
                    "nothing was imported"
                )
            bins, subjects = await asyncio.to_thread(
                self.store.activate_stream, stream_id, tenant_of_call, replaces, renew_handles=renew
            )
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.store.abort_stream, stream_id))
            raise
        if replaces:
            gone = [b for b, _ in replaces]
            await self.pool.broadcast(worker.forget, gone)
            for b in gone:
                self.core.occupancy_cache.pop(b, None)
            log.info("tenant %s re-packed %d bins into %d", tenant_of_call, len(gone), len(bins))
        by_owner: dict[int, list[int]] = {}
        for b in staged:
            by_owner.setdefault(self.pool.owner(b), []).append(b)
        for owner, group in by_owner.items():  # queued on the owners before any later request
            self.core.background(self._preload(owner, group), "bin preload")
        self._warm_centers(tenant_of_call, staged)
        return BulkResult(bin_ids=tuple(bins), subjects=subjects)

    def _declared_bins(self, total: int, *, repack: bool) -> int:
        """The first chunk's ``total_bins``, checked against the per-stream cap."""
        cap = self.settings.max_bins_per_request if repack else self.settings.max_bins_per_stream
        if total < 1:
            raise InvalidArgument(
                "the first chunk of a bulk stream must declare total_bins, the number of "
                "chunks (bins) the stream holds"
            )
        if total > cap:
            raise ResourceExhausted(
                f"a bulk stream imports at most {cap} bins; this one declares {total}: split "
                "the import into several streams"
            )
        return int(total)

    async def _check_stored_bin(self, tenant_id: str, key_id: str, bin_id: int, n: int) -> None:
        """Validate a staged bin's ciphertexts on every worker at once, each reading its share."""
        parts = max(1, min(self.pool.n, n))
        owner = self.pool.owner(bin_id)
        results = await asyncio.gather(
            *(
                self.pool.call(
                    (owner + i) % self.pool.n,
                    worker.check_stored,
                    tenant_id,
                    key_id,
                    bin_id,
                    i * n // parts,
                    (i + 1) * n // parts,
                )
                for i in range(parts)
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _check_blobs(self, tenant_id: str, key_id: str, blobs: Sequence[bytes]) -> None:
        """Validate ciphertexts shared over every worker, dropping them after."""
        parts = max(1, min(self.pool.n, len(blobs)))
        n = len(blobs)
        results = await asyncio.gather(
            *(
                self.pool.call(
                    i,
                    worker.check_part,
                    tenant_id,
                    key_id,
                    list(blobs[i * n // parts : (i + 1) * n // parts]),
                )
                for i in range(parts)
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _warm_centers(self, tenant_id: str, bin_ids: Sequence[int]) -> None:
        """Precompute the bins' scores against the key's center, off the query path."""
        by_owner: dict[int, list[int]] = {}
        for b in bin_ids:
            by_owner.setdefault(self.pool.owner(b), []).append(b)
        for owner, group in by_owner.items():
            self.core.background(self._warm(owner, tenant_id, group), "center precompute")

    async def _warm(self, owner: int, tenant_id: str, bin_ids: list[int]) -> None:
        _, key_id = await asyncio.to_thread(self.store.bin_owner, bin_ids[0])
        for b in bin_ids:  # one bin per job: a query or an enrollment waits for one at most
            await self.pool.call(owner, worker.precompute_centers, tenant_id, key_id, [b])

    async def _preload(self, owner: int, bin_ids: list[int]) -> None:
        for b in bin_ids:  # one bin per job, as above
            await self.pool.call(owner, worker.preload, [b])

    async def list_key_bins(self, tenant_id: str, key_id: str) -> list[BinSummary]:
        """Every active bin of a key (id, label, version, subjects), by id."""
        await self.core.key(tenant_id, key_id)
        return await asyncio.to_thread(self.store.key_bins, tenant_id, key_id)

    async def fetch_bin(self, tenant_id: str, bin_id: int) -> FetchedBin:
        """A bin whole: its key, info, subjects and packed ciphertexts, all at one version."""
        check_id(bin_id, "bin id")
        info = await asyncio.to_thread(self.store.bin_info, tenant_id, bin_id, with_occupancy=False)
        key_id = (await asyncio.to_thread(self.store.bin_owner, bin_id))[1]
        current = await self.pool.call(self.pool.owner(bin_id), worker.current, bin_id)
        if current is None:
            raise NotFound("the bin holds no ciphertext")
        version, blob = current
        subjects = await asyncio.to_thread(self.store.bin_subjects, bin_id)
        if version != info.version:
            raise FailedPrecondition("the bin is changing; try again")
        return FetchedBin(
            key_id=key_id,
            info=info,
            slots=tuple(s for s, _ in subjects),
            handles=tuple(h for _, h in subjects),
            blob=blob,
        )

    async def fetch_subject_bin(self, tenant_id: str, handle: str) -> SubjectBin | StagedRecord:
        """The subject's bin (with its slot and packed ciphertexts), or its staged record."""
        check_handles([handle])
        staged = await asyncio.to_thread(self.store.staged_subject, tenant_id, handle)
        if staged is not None:
            return staged
        ref = await asyncio.to_thread(self.store.subject, tenant_id, handle)
        current = await self.pool.call(self.pool.owner(ref.bin_id), worker.current, ref.bin_id)
        if current is None:
            raise NotFound("the subject's bin holds no ciphertext")
        info = await asyncio.to_thread(self.store.bin_info, tenant_id, ref.bin_id)
        version, blob = current
        if version != info.version:
            raise FailedPrecondition("the bin is changing; try again")
        return SubjectBin(key_id=ref.key_id, info=info, slot=ref.slot, blob=blob)

    async def delete_subject(
        self, tenant_id: str, handle: str, bin_id: int, version: int, ciphertexts: Sequence[bytes]
    ) -> int:
        check_handles([handle])
        check_int64(bin_id, "bin id")
        check_int64(version, "bin version")
        if bin_id == 0 and not ciphertexts:  # a staged subject: nothing to re-pack
            await asyncio.to_thread(self.store.delete_staged, tenant_id, handle)
            log.info("tenant %s deleted a staged subject", tenant_id)
            return 0
        ref = await asyncio.to_thread(self.store.subject, tenant_id, handle)
        view = await self.core.key(tenant_id, ref.key_id)
        check_id(bin_id, "bin id")
        check_count(ciphertexts, view.layout.n_ciphertexts, "bin")
        check_blob_sizes(ciphertexts, max_ciphertext_bytes(view), "bin")
        await self._check_blobs(tenant_id, ref.key_id, ciphertexts)
        owner = self.pool.owner(bin_id)
        new_version = await asyncio.to_thread(
            self.store.repack_delete, tenant_id, handle, bin_id, version, pack_blobs(ciphertexts)
        )
        await self.pool.call(owner, worker.forget, [bin_id])
        log.info("tenant %s deleted a subject; bin %d re-packed", tenant_id, bin_id)
        return int(new_version)

    def _schedule_compaction(self, bin_id: int) -> None:
        self._compactions.last_write[bin_id] = time.monotonic()
        if bin_id in self._compactions.scheduled:
            return
        self._compactions.scheduled.add(bin_id)
        self.core.spawn(self._compact(bin_id))

    async def _compact(self, bin_id: int) -> None:
        # Wait until the bin has been quiet for compact_delay_s, so that a burst
        # of enrollments costs one rewrite of the bin and never delays them.
        while True:
            idle = time.monotonic() - self._compactions.last_write.get(bin_id, 0.0)
            if idle >= self.settings.compact_delay_s:
                break
            await asyncio.sleep(self.settings.compact_delay_s - idle)
        self._compactions.scheduled.discard(bin_id)
        try:
            current = await self.pool.call(self.pool.owner(bin_id), worker.current, bin_id)
            if current is not None:
                version, blob = current
                await asyncio.to_thread(self.store.compact, bin_id, blob, version)
                tenant_id, key_id = await asyncio.to_thread(self.store.bin_owner, bin_id)
                await self.pool.call(
                    self.pool.owner(bin_id), worker.precompute_centers, tenant_id, key_id, [bin_id]
                )
        except Exception:  # compaction is an optimisation; the deltas stay valid
            log.exception("compaction of bin %d failed", bin_id)
