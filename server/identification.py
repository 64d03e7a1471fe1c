"""Identification: preselection, re-ranking of candidates, verification.

Stage 1 (:meth:`IdentificationService.preselect`) scores the preselection
window over the searched bins and the staged templates; stage 2
(:meth:`IdentificationService.score_candidates`) scores the rest of the
template over the bins of the tenant's candidates; :meth:`verify` scores the
claimed subject's bin. Only summed scores ever leave the server, and of
those only the ones a response needs: every other slot of a score
ciphertext is drowned under fresh random masks in the worker
(:meth:`veilface.crypto.kernel.BinKernel.mask`): a verification carries the
claimed slot, a re-ranking the requested slots, a preselection the occupied
slots of the searched bins, a staged template the mean over its slots.
:meth:`IdentificationService.slot_maps` hands the tenant the slot -> handle
map of the bins it searched, so that no request names the winner's slot.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from veilface.crypto.params import get_param_set
from veilface.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from veilface.server import worker
from veilface.server.probes import ProbeCache, ProbeLimits
from veilface.server.store.records import BinInfo, StagedRecord
from veilface.server.validation import (
    MAX_LABELS,
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


class SearchMode(Enum):
    """Which bins a preselection searches: ``STRICT`` every bin, ``ROUTED`` the named labels.

    Converted once, in the servicer, from the protocol's enum
    (:func:`veilface.server.convert.search_mode_from_proto`, which refuses any
    other value); :meth:`IdentificationService.preselect` takes only this.
    """

    STRICT = "strict"
    ROUTED = "routed"


@dataclass(frozen=True)
class BinScore:
    """Encrypted scores of one bin: the sum of ``parts`` (one per worker that scored it).

    ``occupied``: the bin's occupied slots; ``slots``: the slots a
    re-ranking asked for; ``label``: the bin's routing label.
    """

    bin_id: int
    version: int
    occupied: tuple[int, ...]
    parts: tuple[bytes, ...]
    slots: tuple[int, ...] = ()
    label: str = ""


@dataclass(frozen=True)
class SlotMap:
    """A bin's occupied slots and the handle in each, read at ``version`` (or later)."""

    bin_id: int
    version: int
    slots: tuple[int, ...]
    handles: tuple[str, ...]


#: Bins per FetchSlotMaps call (a full bin's map is about 140 KB).
MAX_SLOT_MAPS = 64


@dataclass(frozen=True)
class StagedScore:
    """Encrypted full score of one staged template: the mean over its slots (the rest masked)."""

    staged_id: int
    handle: str
    scores: bytes


@dataclass(frozen=True)
class PreselectResult:
    """Stage 1's answer: the searched bins' scores, the staged templates' scores, the query id.

    ``searched_templates``: occupied slots of the searched bins plus staged
    templates; ``query_id`` names the cached probe for the re-ranking.
    """

    bins: tuple[BinScore, ...]
    searched_templates: int
    query_id: str
    staged: tuple[StagedScore, ...]
    exhaustive: bool = False  # the bins' scores are full scores (no re-ranking follows)


@dataclass(frozen=True)
class VerifyResult:
    """A verification's encrypted scores; only ``slot`` carries one (the rest is masked)."""

    slot: int
    scores: bytes


class IdentificationService:
    """1:N and 1:1 searches over a tenant key's encrypted bins."""

    def __init__(self, core: GalleryService) -> None:
        self.core = core
        self.store = core.store
        self.pool = core.pool
        self.settings = core.settings
        # Probes of recent queries, so that re-ranking need not resend them.
        self.probes = ProbeCache(
            ProbeLimits(
                max_entries=self.settings.max_cached_queries,
                max_bytes=self.settings.max_cached_probe_bytes,
                max_bytes_per_tenant=self.settings.max_cached_probe_bytes_per_tenant,
                ttl_s=self.settings.query_ttl_s,
            )
        )

    @staticmethod
    def _check_probe(view: KeyView, probe: Sequence[bytes]) -> None:
        """Count and size of a probe, checked on arrival (before any worker sees it)."""
        check_count(probe, view.layout.g1, "probe")
        limit = get_param_set(view.record.param_set).max_ciphertext_bytes
        check_blob_sizes(probe, limit, "probe")

    async def preselect(
        self,
        tenant_id: str,
        key_id: str,
        mode: SearchMode,
        labels: Sequence[str],
        probe: Sequence[bytes],
        *,
        exhaustive: bool = False,
    ) -> PreselectResult:
        """Score the searched bins' preselection window (or, ``exhaustive``, the whole template).

        ``exhaustive`` returns, for every occupied slot, the full score a
        re-ranking would (the centering added back), in one round trip: an
        exhaustive search then needs no second stage, and saves the second
        stage's key switches, masks, re-randomizations and decryptions.
        """
        view = await self.core.scoring_key(tenant_id, key_id)
        self._check_probe(view, probe)
        if mode is SearchMode.STRICT:
            if labels:
                raise InvalidArgument("strict mode searches every bin; send no labels")
            bins, staged = await asyncio.to_thread(self.store.search_view, tenant_id, key_id, None)
        else:
            if not labels:
                raise InvalidArgument("routed mode needs at least one bin label")
            if len(labels) > MAX_LABELS:
                raise ResourceExhausted(f"at most {MAX_LABELS} labels per query")
            for lab in labels:
                check_label(lab)
            bins, staged = await asyncio.to_thread(
                self.store.search_view, tenant_id, key_id, sorted(set(labels))
            )
        if len(bins) > self.settings.max_bins_per_request:
            raise ResourceExhausted(
                f"the query would score {len(bins)} bins; the limit is "
                f"{self.settings.max_bins_per_request} (use routed mode)"
            )
        bins = await self.core.with_occupancy(bins)
        # Every occupied slot is needed (the tenant ranks them all); the rest is masked.
        query_id = secrets.token_urlsafe(12)
        scored, staged_scores = await asyncio.gather(
            self.core.score_bins(
                tenant_id,
                key_id,
                view,
                bins,
                probe,
                "full" if exhaustive else "presel",
                add_center=exhaustive,
                query_id=query_id,
            ),
            self._score_staged(tenant_id, key_id, staged, probe, add_center=True),
        )
        if not bins and not staged:  # nothing loaded the probe: a worker validates it
            await self.pool.call(0, worker.validate_probe, tenant_id, key_id, list(probe))
        self.probes.put(query_id, tenant_id, key_id, probe)
        return PreselectResult(
            bins=tuple(scored),
            searched_templates=sum(len(b.occupied) for b in bins) + len(staged),
            query_id=query_id,
            staged=tuple(staged_scores),
            exhaustive=exhaustive,
        )

    async def _score_staged(
        self,
        tenant_id: str,
        key_id: str,
        staged: Sequence[StagedRecord],
        probe: Sequence[bytes],
        *,
        add_center: bool,
        keep: tuple[int, ...] | None = None,
    ) -> list[StagedScore]:
        """Score staged templates, spread over the workers after the bins' share.

        ``keep=None``: only the mean over the slots is left unmasked
        (identification reads the mean); else only those slots (verification).
        """
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
                    add_center,
                    keep,
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

    async def score_candidates(
        self,
        tenant_id: str,
        key_id: str,
        candidates: Sequence[tuple[int, Sequence[int]]],
        probe: Sequence[bytes],
        query_id: str = "",
    ) -> list[BinScore]:
        """Rest-of-template scores of the candidates' bins; only the named slots unmasked.

        ``query_id`` (the probe cached by :meth:`preselect`) or ``probe``,
        never both: a request carrying both is refused rather than one of
        them silently ignored. Every candidate bin must be an active bin of
        this tenant *and key* (a bin of another key would be scored under the
        wrong key's context): NotFound otherwise.
        """
        view = await self.core.scoring_key(tenant_id, key_id)
        if query_id and probe:
            raise InvalidArgument("send either a query id or the probe ciphertexts, not both")
        if query_id:
            probe = self.probes.get(query_id, tenant_id, key_id)
        elif not probe:
            raise InvalidArgument("send a query id (from Preselect) or the probe ciphertexts")
        else:
            self._check_probe(view, probe)  # a worker loads (validates) it when scoring
        if not candidates:
            raise InvalidArgument("no candidates given")
        if len(candidates) > self.settings.max_candidate_bins:
            raise ResourceExhausted(
                f"candidates span {len(candidates)} bins; at most {self.settings.max_candidate_bins}"
            )
        wanted: dict[int, list[int]] = {}
        for bin_id, slots in candidates:
            view.layout.check_slots(slots)
            wanted[check_id(bin_id, "candidate bin id")] = list(map(int, slots))
        infos = await self.core.with_occupancy(
            await asyncio.to_thread(self._key_bins, tenant_id, key_id, list(wanted))
        )
        scored = await self.core.score_bins(
            tenant_id,
            key_id,
            view,
            infos,
            probe,
            "rest",
            keep={b: tuple(s) for b, s in wanted.items()},
            add_center=True,
            query_id=query_id,  # "" when the probe came with the request
        )
        # No handles: the tenant keeps its own slot -> handle maps (slot_maps).
        return [
            BinScore(bs.bin_id, bs.version, bs.occupied, bs.parts, tuple(wanted[bs.bin_id]), bs.label)
            for bs in scored
        ]

    def _key_bins(self, tenant_id: str, key_id: str, bin_ids: Sequence[int]) -> list[BinInfo]:
        """The named bins, each an active bin of this tenant's key; NotFound otherwise.

        Matched in Python against the key's bin list (one query), so an id
        past 2**63 is simply not found.
        """
        current = {b.bin_id: b for b in self.store.list_bins(tenant_id, key_id, None)}
        for b in bin_ids:
            if b not in current:
                raise NotFound(f"key {key_id!r} has no bin {b}")
        return [current[b] for b in bin_ids]

    async def slot_maps(
        self, tenant_id: str, key_id: str, known: Sequence[tuple[int, int]]
    ) -> list[SlotMap]:
        """The slot -> handle maps of the named bins whose version differs from ``known``.

        ``known``: (bin id, version the tenant holds, 0 for none), at most
        :data:`MAX_SLOT_MAPS`. Bins that are gone, or not active bins of this
        tenant and key, are left out (no oracle on other tenants' bin ids).
        The SDK names every bin of a Preselect answer whose version it does
        not hold, so this tells the server nothing beyond that Preselect.
        """
        await self.core.key(tenant_id, key_id)
        if len(known) > MAX_SLOT_MAPS:
            raise ResourceExhausted(f"at most {MAX_SLOT_MAPS} bins per call")
        held = {
            check_id(bin_id, "bin id"): check_int64(version, "bin version") for bin_id, version in known
        }
        if not held:
            return []
        # Matched in Python, not in SQL: a uint64 id past 2**63 is simply absent.
        current = {
            b.bin_id: b
            for b in await asyncio.to_thread(self.store.list_bins, tenant_id, key_id, None)
            if b.bin_id in held
        }
        out = []
        for bin_id, version in held.items():
            info = current.get(bin_id)
            if info is None or info.version == version:
                continue
            # The version was read before the subjects, so the map is at least
            # as new as the version it is sent with: a change in between shows
            # as a newer version in the next Preselect, and the tenant asks again.
            subjects = await asyncio.to_thread(self.store.bin_subjects, bin_id)
            out.append(
                SlotMap(
                    bin_id,
                    info.version,
                    tuple(s for s, _ in subjects),
                    tuple(h for _, h in subjects),
                )
            )
        return out

    async def verify(
        self, tenant_id: str, key_id: str, handle: str, probe: Sequence[bytes]
    ) -> VerifyResult:
        check_handles([handle])
        staged = await asyncio.to_thread(self.store.staged_subject, tenant_id, handle)
        if staged is not None:
            if staged.key_id != key_id:
                raise FailedPrecondition(f"the subject is enrolled under key {staged.key_id!r}")
            view = await self.core.scoring_key(tenant_id, key_id)
            self._check_probe(view, probe)
            (one,) = await self._score_staged(
                tenant_id, key_id, [staged], probe, add_center=False, keep=(0,)
            )
            return VerifyResult(slot=0, scores=one.scores)
        ref = await asyncio.to_thread(self.store.subject, tenant_id, handle)
        if ref.key_id != key_id:
            raise FailedPrecondition(f"the subject is enrolled under key {ref.key_id!r}")
        view = await self.core.scoring_key(tenant_id, key_id)
        self._check_probe(view, probe)
        info = await asyncio.to_thread(self.store.bin_info, tenant_id, ref.bin_id, with_occupancy=False)
        # Only the claimed subject's slot is left unmasked.
        scored = await self.core.score_bins(
            tenant_id, key_id, view, [info], probe, "full", keep={ref.bin_id: (ref.slot,)}, split=False
        )
        if not scored:
            raise NotFound("the subject's bin holds no ciphertext")
        return VerifyResult(slot=ref.slot, scores=scored[0].parts[0])
