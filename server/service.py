"""The data plane of the identification service (no protobuf, no grpc here).

Every method takes plain values, checks them at the boundary (identifiers,
counts, per-request limits) before any ciphertext is deserialized, and
returns plain records. Blocking database calls run in a thread; homomorphic
work runs in the worker pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field

from veilface.crypto.layout import DiagonalLayout
from veilface.crypto.params import get_param_set
from veilface.crypto.public_context import PublicContext
from veilface.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from veilface.server import worker
from veilface.server.config import ServerSettings
from veilface.server.scoring import WorkerPool
from veilface.server.store.blobs import pack_blobs
from veilface.server.store.records import BinInfo, KeyRecord, KeyStats, Reservation, StagedRecord
from veilface.server.store.sqlite_store import SQLiteStore

log = logging.getLogger(__name__)

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_HANDLE = 512
MAX_LABEL = 128
MAX_LABELS = 4096
# What the SDK's protectors declare (veilface.client.protect); the server
# cannot check it on a sealed blob, it records it.
PROTECTIONS = frozenset({"blur", "pixelate", "mask", "adversarial"})


def hash_token(token: str) -> str:
    """API tokens are 256-bit random strings, so one SHA-256 is enough to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class KeyView:
    record: KeyRecord
    layout: DiagonalLayout
    stats: KeyStats | None = None


@dataclass(frozen=True)
class BinScore:
    """Encrypted scores of one bin: the sum of ``parts`` (one per worker that scored it)."""

    bin_id: int
    version: int
    occupancy: bytes
    parts: tuple[bytes, ...]
    slots: tuple[int, ...] = ()
    handles: tuple[str, ...] = ()


@dataclass(frozen=True)
class StagedScore:
    """Encrypted full score of one staged template (every slot holds it)."""

    staged_id: int
    handle: str
    scores: bytes


@dataclass(frozen=True)
class BulkChunk:
    tenant_id: str
    key_id: str
    label: str
    handles: Sequence[str]
    slots: Sequence[int]
    ciphertexts: Sequence[bytes]
    replaces: Sequence[tuple[int, int]] = ()  # first chunk: (bin id, version) swapped out at the end


@dataclass
class _Compactions:
    scheduled: set[int] = field(default_factory=set)
    last_write: dict[int, float] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def occupancy_bitmap(occupied: Sequence[int], capacity: int) -> bytes:
    bits = bytearray((capacity + 7) // 8)
    for s in occupied:
        bits[s // 8] |= 1 << (s % 8)
    return bytes(bits)


def check_tenant_id(tenant_id: str) -> str:
    if not TENANT_RE.match(tenant_id or ""):
        raise InvalidArgument(
            "tenant id must be 1-63 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
        )
    return tenant_id


def check_key_id(key_id: str) -> str:
    if not KEY_RE.match(key_id or ""):
        raise InvalidArgument("key id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return key_id


def check_handles(handles: Sequence[str]) -> None:
    for h in handles:
        if not h or len(h) > MAX_HANDLE:
            raise InvalidArgument(f"subject handles must be 1-{MAX_HANDLE} characters")
    if len(set(handles)) != len(handles):
        raise InvalidArgument("subject handles in one request must be distinct")


def check_label(label: str) -> str:
    if len(label) > MAX_LABEL:
        raise InvalidArgument(f"bin labels are at most {MAX_LABEL} characters")
    return label


class GalleryService:
    """Tenants, keys, enrollment and identification over encrypted bins."""

    def __init__(self, store: SQLiteStore, pool: WorkerPool, settings: ServerSettings) -> None:
        self.store = store
        self.pool = pool
        self.settings = settings
        self._layouts: dict[tuple[str, str], KeyView] = {}
        self._compactions = _Compactions()
        # Occupied slots per bin, keyed by bin version (every change of a bin's
        # subjects bumps its version), so queries do not re-read 100k rows.
        self._occupancy: dict[int, tuple[int, tuple[int, ...]]] = {}
        # Probes of recent queries, so that re-ranking need not resend them.
        self._probes: OrderedDict[str, tuple[str, str, list[bytes], float]] = OrderedDict()
        self._staged_turn = 0

    # -- tenants and keys -----------------------------------------------

    async def create_tenant(self, tenant_id: str) -> str:
        check_tenant_id(tenant_id)
        token = "vf_" + secrets.token_urlsafe(32)
        await asyncio.to_thread(self.store.create_tenant, tenant_id, hash_token(token))
        log.info("created tenant %s", tenant_id)
        return token

    async def register_key(self, tenant_id: str, key_id: str, public_context: bytes) -> KeyView:
        check_key_id(key_id)
        public = await asyncio.to_thread(PublicContext.from_bytes, public_context)
        record = KeyRecord(
            tenant_id,
            key_id,
            public.param_set.name,
            public.layout.dim,
            public.layout.m,
            public_context,
            public.fingerprint,
        )
        await asyncio.to_thread(self.store.put_key, record)
        log.info("tenant %s registered key %s (%s)", tenant_id, key_id, public.fingerprint)
        return await self.key(tenant_id, key_id)

    async def register_center(self, tenant_id: str, key_id: str, center: Sequence[bytes]) -> KeyView:
        view = await self.key(tenant_id, key_id)
        self._check_count(center, view.layout.g1, "center")
        await self.pool.call(0, worker.validate_probe, tenant_id, key_id, list(center))
        await asyncio.to_thread(self.store.set_center, tenant_id, key_id, pack_blobs(center))
        self._layouts.pop((tenant_id, key_id), None)
        await self.pool.broadcast(worker.forget_key, tenant_id, key_id)
        return await self.key(tenant_id, key_id)

    async def key(self, tenant_id: str, key_id: str) -> KeyView:
        check_key_id(key_id)
        view = self._layouts.get((tenant_id, key_id))
        if view is None:
            rec = await asyncio.to_thread(self.store.get_key, tenant_id, key_id)
            layout = DiagonalLayout(rec.dim, get_param_set(rec.param_set).slots, rec.presel_dims)
            view = KeyView(rec, layout)
            self._layouts[(tenant_id, key_id)] = view
        return view

    async def describe(self, tenant_id: str) -> list[KeyView]:
        rows = await asyncio.to_thread(self.store.list_keys, tenant_id)
        out = []
        for rec, stats in rows:
            view = await self.key(tenant_id, rec.key_id)
            out.append(KeyView(rec, view.layout, stats))
        return out

    # -- enrollment -----------------------------------------------------

    async def reserve(self, tenant_id: str, key_id: str, label: str, count: int) -> Reservation:
        view = await self.key(tenant_id, key_id)
        check_label(label)
        if count < 1:
            raise InvalidArgument("reserve at least one slot")
        limit = min(self.settings.max_reserve, view.layout.capacity)
        if count > limit:
            raise ResourceExhausted(f"at most {limit} slots per reservation; use BulkEnroll")
        return await asyncio.to_thread(
            self.store.reserve,
            tenant_id,
            key_id,
            label,
            count,
            view.layout.capacity,
            self.settings.reservation_ttl_s,
        )

    async def enroll(
        self,
        tenant_id: str,
        key_id: str,
        reservation_id: str,
        handles: Sequence[str],
        chunks: AsyncIterator[Sequence[bytes]],
        staged_id: int = 0,
    ) -> tuple[Reservation, int]:
        """Validate a contribution as its ciphertexts stream in, then make it durable.

        With ``staged_id`` the contribution is the fold of that staged
        template (one handle): the bin delta is written and the staged row
        removed in one transaction.
        """
        view = await self.key(tenant_id, key_id)
        res = await asyncio.to_thread(self.store.get_reservation, tenant_id, reservation_id)
        if res.key_id != key_id:
            raise InvalidArgument("the reservation was made for another key")
        check_handles(handles)
        if len(handles) != len(res.slots):
            raise InvalidArgument(f"the reservation holds {len(res.slots)} slots; send as many handles")
        if staged_id and len(handles) != 1:
            raise InvalidArgument("a fold of a staged template carries exactly one handle")
        expected = view.layout.n_ciphertexts
        blobs: list[bytes] = []
        checks: list[asyncio.Future[None]] = []
        try:
            async for chunk in chunks:
                if len(blobs) + len(chunk) > expected:
                    raise InvalidArgument(f"a contribution is {expected} ciphertexts for this key")
                blobs.extend(chunk)
                # Each chunk is checked by the next worker while more arrive.
                worker_idx = len(checks) % self.pool.n
                checks.append(
                    asyncio.ensure_future(
                        self.pool.call(worker_idx, worker.check_part, tenant_id, key_id, list(chunk))
                    )
                )
            self._check_count(blobs, expected, "contribution")
            await asyncio.gather(*checks)
        except BaseException:
            for c in checks:
                c.cancel()
            await asyncio.gather(*checks, return_exceptions=True)
            raise
        version = await asyncio.to_thread(
            self.store.commit_enroll, res, list(handles), pack_blobs(blobs), staged_id
        )
        # Durable now: acknowledge. The owner folds the new delta into its
        # in-memory bin when the bin is next scored or compacted (whichever
        # comes first), so a burst of enrollments never waits for it.
        self._schedule_compaction(res.bin_id)
        return res, version

    async def enroll_staged(
        self, tenant_id: str, key_id: str, label: str, handle: str, ciphertext: bytes
    ) -> int:
        """Keep one template in the key's staging area; acknowledged once durable."""
        await self.key(tenant_id, key_id)
        check_label(label)
        check_handles([handle])
        if not ciphertext:
            raise InvalidArgument("a staged template is one ciphertext; got none")
        # Any worker can check it; alternate so two kiosks enrolling at once use both cores.
        self._staged_turn = (self._staged_turn + 1) % self.pool.n
        ok = await self.pool.call(self._staged_turn, worker.check_staged, tenant_id, key_id, ciphertext)
        if not ok:
            raise FailedPrecondition(
                "this key's public context has no staged-scoring rotations; "
                "register a new key (or enroll straight into a bin)"
            )
        return await asyncio.to_thread(
            self.store.stage_template,
            tenant_id,
            key_id,
            label,
            handle,
            ciphertext,
            self.settings.max_staged,
        )

    async def fetch_staged(self, tenant_id: str, key_id: str, limit: int) -> list[StagedRecord]:
        await self.key(tenant_id, key_id)
        cap = self.settings.max_staged
        return await asyncio.to_thread(
            self.store.staged_templates, tenant_id, key_id, None, limit=min(limit or cap, cap)
        )

    async def bulk_enroll(self, chunks: AsyncIterator[BulkChunk], tenant_of_call: str) -> tuple[list[int], int]:
        """Stage every chunk as a new bin; activate them all only at the end.

        A stream whose first chunk names bins it ``replaces`` is a re-pack
        (routing retrained, key rotation): at the end the named bins go and
        the new ones take over their handles, in one transaction.
        """
        stream_id = secrets.token_hex(12)
        staged: list[tuple[int, int, str]] = []  # (bin_id, owner, token)
        replaces: list[tuple[int, int]] = []
        try:
            async for chunk in chunks:
                if chunk.replaces:
                    if staged or replaces:
                        raise InvalidArgument("only the first chunk of a stream names the bins it replaces")
                    if len(chunk.replaces) > self.settings.max_bins_per_request:
                        raise ResourceExhausted(
                            f"a re-pack replaces at most {self.settings.max_bins_per_request} bins"
                        )
                    replaces = [(int(b), int(v)) for b, v in chunk.replaces]
                if chunk.tenant_id != tenant_of_call:
                    from veilface.errors import PermissionDenied

                    raise PermissionDenied("a bulk stream may only write to its own tenant")
                view = await self.key(chunk.tenant_id, chunk.key_id)
                check_label(chunk.label)
                check_handles(chunk.handles)
                if not chunk.handles or len(chunk.handles) != len(chunk.slots):
                    raise InvalidArgument("each bulk chunk needs one slot per handle, and at least one")
                view.layout.check_slots(chunk.slots)
                self._check_count(chunk.ciphertexts, view.layout.n_ciphertexts, "bin")
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
                owner = self.pool.owner(bin_id)
                try:
                    token = await self._validate_bin(
                        chunk.tenant_id, chunk.key_id, list(chunk.ciphertexts), bin_id
                    )
                except BaseException:
                    staged.append((bin_id, owner, ""))
                    raise
                staged.append((bin_id, owner, token))
            if not staged:
                raise InvalidArgument("empty bulk stream")
            bins, subjects = await asyncio.to_thread(
                self.store.activate_stream, stream_id, tenant_of_call, replaces
            )
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.store.abort_stream, stream_id))
            for _, owner, token in staged:
                if token:
                    await self.pool.call(owner, worker.discard, token)
            raise
        if replaces:
            gone = [b for b, _ in replaces]
            await self.pool.broadcast(worker.forget, gone)
            for b in gone:
                self._occupancy.pop(b, None)
            log.info("tenant %s re-packed %d bins into %d", tenant_of_call, len(gone), len(bins))
        for _, owner, token in staged:  # queued on the owners before any later request
            self._background(self.pool.call(owner, worker.commit, token, 1), "bin fold-in")
        self._warm_centers(tenant_of_call, [b for b, _, _ in staged])
        return bins, subjects

    async def _validate_bin(self, tenant_id: str, key_id: str, blobs: list[bytes], bin_id: int) -> str:
        """Validate a bin's ciphertexts on two workers at once; the owner keeps its half."""
        owner = self.pool.owner(bin_id)
        if self.pool.n == 1:
            return await self.pool.call(owner, worker.validate, tenant_id, key_id, blobs, bin_id)
        half = len(blobs) // 2
        results = await asyncio.gather(
            self.pool.call(owner, worker.validate, tenant_id, key_id, blobs, bin_id, (0, half)),
            self.pool.call((owner + 1) % self.pool.n, worker.check_part, tenant_id, key_id, blobs[half:]),
            return_exceptions=True,
        )
        token, other = results
        if isinstance(token, BaseException):
            raise token
        if isinstance(other, BaseException):
            await self.pool.call(owner, worker.discard, token)
            raise other
        return str(token)

    def _warm_centers(self, tenant_id: str, bin_ids: Sequence[int]) -> None:
        """Precompute the bins' scores against the key's center, off the query path."""
        by_owner: dict[int, list[int]] = {}
        for b in bin_ids:
            by_owner.setdefault(self.pool.owner(b), []).append(b)
        for owner, group in by_owner.items():
            self._background(self._warm(owner, tenant_id, group), "center precompute")

    async def _warm(self, owner: int, tenant_id: str, bin_ids: list[int]) -> None:
        _, key_id = await asyncio.to_thread(self.store.bin_owner, bin_ids[0])
        await self.pool.call(owner, worker.precompute_centers, tenant_id, key_id, bin_ids)

    async def list_key_bins(self, tenant_id: str, key_id: str) -> list[tuple[int, str, int, int]]:
        """(bin id, label, version, subjects) of every active bin of a key."""
        await self.key(tenant_id, key_id)
        return await asyncio.to_thread(self.store.key_bins, tenant_id, key_id)

    async def fetch_bin(
        self, tenant_id: str, bin_id: int
    ) -> tuple[str, BinInfo, list[tuple[int, str]], bytes]:
        """A bin whole: (key id, info, (slot, handle) pairs, packed ciphertexts)."""
        info = await asyncio.to_thread(self.store.bin_info, tenant_id, bin_id, with_occupancy=False)
        key_id = (await asyncio.to_thread(self.store.bin_owner, bin_id))[1]
        current = await self.pool.call(self.pool.owner(bin_id), worker.current, bin_id)
        if current is None:
            raise NotFound("the bin holds no ciphertext")
        version, blob = current
        subjects = await asyncio.to_thread(self.store.bin_subjects, bin_id)
        if version != info.version:
            raise FailedPrecondition("the bin is changing; try again")
        return key_id, info, subjects, blob

    async def fetch_subject_bin(
        self, tenant_id: str, handle: str
    ) -> tuple[str, BinInfo, int, bytes] | StagedRecord:
        """The subject's bin (key id, bin, slot, packed ciphertexts), or its staged record."""
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
        return ref.key_id, info, ref.slot, blob

    async def delete_subject(
        self, tenant_id: str, handle: str, bin_id: int, version: int, ciphertexts: Sequence[bytes]
    ) -> int:
        check_handles([handle])
        if bin_id == 0 and not ciphertexts:  # a staged subject: nothing to re-pack
            await asyncio.to_thread(self.store.delete_staged, tenant_id, handle)
            log.info("tenant %s deleted a staged subject", tenant_id)
            return 0
        ref = await asyncio.to_thread(self.store.subject, tenant_id, handle)
        view = await self.key(tenant_id, ref.key_id)
        self._check_count(ciphertexts, view.layout.n_ciphertexts, "bin")
        owner = self.pool.owner(bin_id)
        token = await self.pool.call(owner, worker.validate, tenant_id, ref.key_id, list(ciphertexts), bin_id)
        await self.pool.call(owner, worker.discard, token)
        new_version = await asyncio.to_thread(
            self.store.repack_delete, tenant_id, handle, bin_id, version, pack_blobs(ciphertexts)
        )
        await self.pool.call(owner, worker.forget, [bin_id])
        log.info("tenant %s deleted a subject; bin %d re-packed", tenant_id, bin_id)
        return new_version

    # -- photos -----------------------------------------------------------

    async def upload_photo(self, tenant_id: str, handle: str, sealed: bytes, protection: str) -> str:
        check_handles([handle])
        if not sealed:
            raise InvalidArgument("empty photo")
        if len(sealed) > self.settings.max_photo_bytes:
            raise ResourceExhausted(f"photos are at most {self.settings.max_photo_bytes} bytes")
        if protection not in PROTECTIONS:
            raise InvalidArgument(f"protection must be one of {sorted(PROTECTIONS)}")
        return await asyncio.to_thread(self.store.add_photo, tenant_id, handle, sealed, protection)

    async def list_photos(self, tenant_id: str, handle: str) -> list[str]:
        check_handles([handle])
        return await asyncio.to_thread(self.store.list_photos, tenant_id, handle)

    async def fetch_photo(self, tenant_id: str, photo_id: str) -> tuple[str, bytes, str]:
        if not photo_id or len(photo_id) > 64:
            raise InvalidArgument("bad photo id")
        return await asyncio.to_thread(self.store.get_photo, tenant_id, photo_id)

    # -- identification -------------------------------------------------

    async def preselect(
        self,
        tenant_id: str,
        key_id: str,
        mode: str,
        labels: Sequence[str],
        probe: Sequence[bytes],
    ) -> tuple[list[BinScore], int, str, list[StagedScore]]:
        view = await self.key(tenant_id, key_id)
        self._check_count(probe, view.layout.g1, "probe")
        if mode == "strict":
            if labels:
                raise InvalidArgument("strict mode searches every bin; send no labels")
            bins, staged = await asyncio.to_thread(self.store.search_view, tenant_id, key_id, None)
        elif mode == "routed":
            if not labels:
                raise InvalidArgument("routed mode needs at least one bin label")
            if len(labels) > MAX_LABELS:
                raise ResourceExhausted(f"at most {MAX_LABELS} labels per query")
            for lab in labels:
                check_label(lab)
            bins, staged = await asyncio.to_thread(
                self.store.search_view, tenant_id, key_id, sorted(set(labels))
            )
        else:
            raise InvalidArgument("search mode must be strict or routed")
        if len(bins) > self.settings.max_bins_per_request:
            raise ResourceExhausted(
                f"the query would score {len(bins)} bins; the limit is "
                f"{self.settings.max_bins_per_request} (use routed mode)"
            )
        bins = await self._with_occupancy(bins)
        query_id = secrets.token_urlsafe(12)
        scored, staged_scores = await asyncio.gather(
            self._score(tenant_id, key_id, view, bins, probe, "presel", query_id),
            self._score_staged(tenant_id, key_id, staged, probe, query_id, add_center=True),
        )
        self._remember_probe(query_id, tenant_id, key_id, list(probe))
        return scored, sum(len(b.occupied) for b in bins) + len(staged), query_id, staged_scores

    async def _score_staged(
        self,
        tenant_id: str,
        key_id: str,
        staged: Sequence[StagedRecord],
        probe: Sequence[bytes],
        query_id: str = "",
        *,
        add_center: bool,
    ) -> list[StagedScore]:
        """Score staged templates, spread over the workers after the bins' share."""
        if not staged:
            return []
        n = self.pool.n if len(staged) >= 4 else 1
        groups = [list(staged[i::n]) for i in range(n)]
        results = await asyncio.gather(
            *(
                self.pool.call(
                    (i + 1) % self.pool.n,
                    worker.score_staged,
                    tenant_id,
                    key_id,
                    [r.blob for r in g],
                    list(probe),
                    query_id,
                    add_center,
                )
                for i, g in enumerate(groups)
                if g
            )
        )
        return [
            StagedScore(r.staged_id, r.handle, blob)
            for g, res in zip([g for g in groups if g], results, strict=True)
            for r, blob in zip(g, res, strict=True)
        ]

    async def _with_occupancy(self, bins: Sequence[BinInfo]) -> list[BinInfo]:
        missing = [
            b.bin_id
            for b in bins
            if (hit := self._occupancy.get(b.bin_id)) is None or hit[0] != b.version
        ]
        if missing:
            fresh = await asyncio.to_thread(self.store.occupancy, missing)
            versions = {b.bin_id: b.version for b in bins}
            for bin_id, slots in fresh.items():
                self._occupancy[bin_id] = (versions[bin_id], slots)
        return [BinInfo(b.bin_id, b.version, b.label, self._occupancy[b.bin_id][1]) for b in bins]

    def _remember_probe(self, query_id: str, tenant_id: str, key_id: str, probe: list[bytes]) -> None:
        now = time.monotonic()
        self._probes[query_id] = (tenant_id, key_id, probe, now + self.settings.query_ttl_s)
        while self._probes and (
            len(self._probes) > self.settings.max_cached_queries
            or next(iter(self._probes.values()))[3] < now
        ):
            self._probes.popitem(last=False)

    def _recall_probe(self, query_id: str, tenant_id: str, key_id: str) -> list[bytes]:
        entry = self._probes.get(query_id)
        if entry is None or entry[3] < time.monotonic() or entry[:2] != (tenant_id, key_id):
            raise NotFound("unknown or expired query id; send the probe again")
        return entry[2]

    async def score_candidates(
        self,
        tenant_id: str,
        key_id: str,
        candidates: Sequence[tuple[int, Sequence[int]]],
        probe: Sequence[bytes],
        query_id: str = "",
    ) -> list[BinScore]:
        view = await self.key(tenant_id, key_id)
        if not probe and query_id:
            probe = self._recall_probe(query_id, tenant_id, key_id)
        self._check_count(probe, view.layout.g1, "probe")
        if not candidates:
            raise InvalidArgument("no candidates given")
        if len(candidates) > self.settings.max_candidate_bins:
            raise ResourceExhausted(
                f"candidates span {len(candidates)} bins; at most {self.settings.max_candidate_bins}"
            )
        wanted: dict[int, list[int]] = {}
        for bin_id, slots in candidates:
            view.layout.check_slots(slots)
            wanted[int(bin_id)] = [int(s) for s in slots]
        infos = await self._with_occupancy(
            await asyncio.to_thread(self.store.bin_infos, tenant_id, list(wanted))
        )
        scored = await self._score(
            tenant_id, key_id, view, infos, probe, "rest", query_id, add_center=True
        )
        out = []
        for bs in scored:
            slots = wanted[bs.bin_id]
            handles = await asyncio.to_thread(self.store.handles_for, bs.bin_id, slots)
            out.append(
                BinScore(bs.bin_id, bs.version, bs.occupancy, bs.parts, tuple(slots), tuple(handles))
            )
        return out

    async def resolve_handles(
        self, tenant_id: str, slots: Sequence[tuple[int, Sequence[int]]]
    ) -> list[tuple[int, list[int], list[str]]]:
        if len(slots) > self.settings.max_candidate_bins:
            raise ResourceExhausted(f"at most {self.settings.max_candidate_bins} bins per call")
        out = []
        for bin_id, wanted in slots:
            info = await asyncio.to_thread(
                self.store.bin_info, tenant_id, int(bin_id), with_occupancy=False
            )
            if len(wanted) > 4096:
                raise ResourceExhausted("at most 4096 slots per bin")
            ws = [int(s) for s in wanted]
            handles = await asyncio.to_thread(self.store.handles_for, info.bin_id, ws)
            out.append((info.bin_id, ws, handles))
        return out

    async def verify(
        self, tenant_id: str, key_id: str, handle: str, probe: Sequence[bytes]
    ) -> tuple[int, bytes]:
        check_handles([handle])
        staged = await asyncio.to_thread(self.store.staged_subject, tenant_id, handle)
        if staged is not None:
            if staged.key_id != key_id:
                raise FailedPrecondition(f"the subject is enrolled under key {staged.key_id!r}")
            view = await self.key(tenant_id, key_id)
            self._check_count(probe, view.layout.g1, "probe")
            (one,) = await self._score_staged(tenant_id, key_id, [staged], probe, add_center=False)
            return 0, one.scores
        ref = await asyncio.to_thread(self.store.subject, tenant_id, handle)
        if ref.key_id != key_id:
            raise FailedPrecondition(f"the subject is enrolled under key {ref.key_id!r}")
        view = await self.key(tenant_id, key_id)
        self._check_count(probe, view.layout.g1, "probe")
        info = await asyncio.to_thread(self.store.bin_info, tenant_id, ref.bin_id, with_occupancy=False)
        scored = await self._score(tenant_id, key_id, view, [info], probe, "full", split=False)
        if not scored:
            raise NotFound("the subject's bin holds no ciphertext")
        return ref.slot, scored[0].parts[0]

    # -- helpers ----------------------------------------------------------

    async def _score(
        self,
        tenant_id: str,
        key_id: str,
        view: KeyView,
        bins: Sequence[BinInfo],
        probe: Sequence[bytes],
        stage: str,
        query_id: str = "",
        *,
        split: bool = True,
        add_center: bool = False,
    ) -> list[BinScore]:
        if not bins:
            return []
        results = await self.pool.score(
            tenant_id,
            key_id,
            [(b.bin_id, b.version) for b in bins],
            probe,
            view.layout.giants(stage),
            query_id=query_id,
            split=split,
            add_center=add_center,
        )
        cap = view.layout.capacity
        return [
            BinScore(b.bin_id, b.version, occupancy_bitmap(b.occupied, cap), tuple(parts))
            for b in bins
            if (parts := results.get(b.bin_id))
        ]

    @staticmethod
    def _check_count(items: Sequence[bytes], expected: int, what: str) -> None:
        if len(items) != expected:
            raise InvalidArgument(f"a {what} is {expected} ciphertexts for this key, got {len(items)}")

    def _background(self, fut: Awaitable[object], what: str) -> None:
        async def run() -> None:
            try:
                await fut
            except Exception:
                log.exception("background %s failed", what)

        task = asyncio.get_running_loop().create_task(run())
        self._compactions.tasks.add(task)
        task.add_done_callback(self._compactions.tasks.discard)

    def _schedule_compaction(self, bin_id: int) -> None:
        self._compactions.last_write[bin_id] = time.monotonic()
        if bin_id in self._compactions.scheduled:
            return
        self._compactions.scheduled.add(bin_id)
        task = asyncio.get_running_loop().create_task(self._compact(bin_id))
        self._compactions.tasks.add(task)
        task.add_done_callback(self._compactions.tasks.discard)

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

    async def close(self) -> None:
        for task in list(self._compactions.tasks):
            task.cancel()
