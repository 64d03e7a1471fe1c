"""Identification: preselection, re-ranking of candidates, verification.

Stage 1 (:meth:`IdentificationService.preselect`) scores the preselection
window over the searched bins and the staged templates; stage 2
(:meth:`IdentificationService.score_candidates`) scores the rest of the
template over the bins of the tenant's candidates; :meth:`verify` scores the
claimed subject's bin. Only summed scores ever leave the server.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from veilface.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from veilface.server import worker
from veilface.server.store.records import StagedRecord
from veilface.server.validation import MAX_LABELS, check_count, check_handles, check_label

if TYPE_CHECKING:
    from veilface.server.service import GalleryService

log = logging.getLogger(__name__)


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


class IdentificationService:
    """1:N and 1:1 searches over a tenant key's encrypted bins."""

    def __init__(self, core: GalleryService) -> None:
        self.core = core
        self.store = core.store
        self.pool = core.pool
        self.settings = core.settings
        # Probes of recent queries, so that re-ranking need not resend them.
        self._probes: OrderedDict[str, tuple[str, str, list[bytes], float]] = OrderedDict()

    async def preselect(
        self,
        tenant_id: str,
        key_id: str,
        mode: str,
        labels: Sequence[str],
        probe: Sequence[bytes],
    ) -> tuple[list[BinScore], int, str, list[StagedScore]]:
        view = await self.core.key(tenant_id, key_id)
        check_count(probe, view.layout.g1, "probe")
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
        bins = await self.core.with_occupancy(bins)
        query_id = secrets.token_urlsafe(12)
        scored, staged_scores = await asyncio.gather(
            self.core.score_bins(tenant_id, key_id, view, bins, probe, "presel", query_id),
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
        view = await self.core.key(tenant_id, key_id)
        if not probe and query_id:
            probe = self._recall_probe(query_id, tenant_id, key_id)
        check_count(probe, view.layout.g1, "probe")
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
        infos = await self.core.with_occupancy(
            await asyncio.to_thread(self.store.bin_infos, tenant_id, list(wanted))
        )
        scored = await self.core.score_bins(
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
            view = await self.core.key(tenant_id, key_id)
            check_count(probe, view.layout.g1, "probe")
            (one,) = await self._score_staged(tenant_id, key_id, [staged], probe, add_center=False)
            return 0, one.scores
        ref = await asyncio.to_thread(self.store.subject, tenant_id, handle)
        if ref.key_id != key_id:
            raise FailedPrecondition(f"the subject is enrolled under key {ref.key_id!r}")
        view = await self.core.key(tenant_id, key_id)
        check_count(probe, view.layout.g1, "probe")
        info = await asyncio.to_thread(self.store.bin_info, tenant_id, ref.bin_id, with_occupancy=False)
        scored = await self.core.score_bins(tenant_id, key_id, view, [info], probe, "full", split=False)
        if not scored:
            raise NotFound("the subject's bin holds no ciphertext")
        return ref.slot, scored[0].parts[0]
