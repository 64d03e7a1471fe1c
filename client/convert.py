"""Protobuf <-> the SDK's own records, for the client side (its one converter).

The SDK's public methods return these records, never ``pb.*`` messages;
:mod:`veilface.client.search` and :mod:`veilface.client.sdk` build requests
and read answers only through the functions here. The occupancy bitmap codec
is here too (the server's encoder is ``veilface.server.convert``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from veilface.errors import InvalidArgument
from veilface.proto.v1 import veilface_pb2 as pb

IntArray = npt.NDArray[np.int64]

_MODES = {"strict": pb.SEARCH_MODE_STRICT, "routed": pb.SEARCH_MODE_ROUTED}


# -- occupancy bitmaps ---------------------------------------------------------------


def occupied_slots(bitmap: bytes, capacity: int) -> IntArray:
    """The occupied slots of a bin, ascending: int64 [n], each in ``[0, capacity)``.

    Bit ``s`` of the bitmap (little-endian within each byte) is set when slot
    ``s`` holds a subject; a bitmap shorter than the capacity ends with zeros.

    Raises
    ------
    InvalidArgument
        A bit is set at or past ``capacity``.
    """
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    slots = np.flatnonzero(bits).astype(np.int64)
    if slots.size and slots[-1] >= capacity:
        raise InvalidArgument(f"an occupancy bitmap names slot {int(slots[-1])} of a {capacity}-slot bin")
    return slots


def occupancy_bitmap(slots: Iterable[int]) -> bytes:
    """The inverse of :func:`occupied_slots` (tests and tools; the server has its own)."""
    s = sorted(int(x) for x in slots)
    if not s:
        return b""
    bits = np.zeros(s[-1] + 1, dtype=np.uint8)
    bits[s] = 1
    return np.packbits(bits, bitorder="little").tobytes()


# -- keys and tenants ----------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """One tenant key as the server holds it: its parameters and, from DescribeTenant, its counts."""

    key_id: str
    param_set: str
    dim: int
    presel_dims: int
    n_ciphertexts: int
    probe_ciphertexts: int
    capacity: int
    fingerprint: str
    has_center: bool
    subjects: int = 0
    bins: int = 0
    stored_bytes: int = 0
    staged: int = 0


@dataclass(frozen=True)
class TenantInfo:
    """What DescribeTenant says: the tenant's keys."""

    tenant_id: str
    keys: tuple[KeyInfo, ...]

    def key(self, key_id: str) -> KeyInfo | None:
        """The key named ``key_id``, or None."""
        return next((k for k in self.keys if k.key_id == key_id), None)


def key_info_from_proto(msg: pb.KeyInfo) -> KeyInfo:
    return KeyInfo(
        key_id=msg.key_id,
        param_set=msg.param_set,
        dim=int(msg.dim),
        presel_dims=int(msg.presel_dims),
        n_ciphertexts=int(msg.n_ciphertexts),
        probe_ciphertexts=int(msg.probe_ciphertexts),
        capacity=int(msg.capacity),
        fingerprint=msg.fingerprint,
        has_center=bool(msg.has_center),
        subjects=int(msg.subjects),
        bins=int(msg.bins),
        stored_bytes=int(msg.stored_bytes),
        staged=int(msg.staged),
    )


def tenant_info_from_proto(msg: pb.DescribeTenantResponse) -> TenantInfo:
    return TenantInfo(msg.tenant_id, tuple(key_info_from_proto(k) for k in msg.keys))


# -- identification ------------------------------------------------------------------


@dataclass(frozen=True)
class EncryptedBinScores:
    """Score ciphertexts of one bin, as a Preselect or ScoreCandidates answer carries them.

    The bin's scores are the sum of the decryptions of ``parts`` (one per
    server worker that scored it). ``occupied``: its occupied slots, int64
    ascending.
    """

    bin_id: int
    version: int
    label: str
    occupied: IntArray
    parts: tuple[bytes, ...]


@dataclass(frozen=True)
class EncryptedStagedScore:
    """A staged template's full score: every slot of ``scores`` holds it."""

    staged_id: int
    handle: str
    scores: bytes


@dataclass(frozen=True)
class ScoresReply:
    """A Preselect or ScoreCandidates answer; ``wire_bytes``: its serialized size."""

    bins: tuple[EncryptedBinScores, ...]
    staged: tuple[EncryptedStagedScore, ...]
    query_id: str
    searched_templates: int
    wire_bytes: int
    exhaustive: bool = False  # Preselect: the bins' scores are full scores


@dataclass(frozen=True)
class SlotMapUpdate:
    """A bin's slot -> handle map at ``version`` (FetchSlotMaps)."""

    bin_id: int
    version: int
    slots: tuple[int, ...]
    handles: tuple[str, ...]


def preselect_request(
    tenant_id: str,
    key_id: str,
    mode: str,
    labels: Sequence[str],
    probe: Sequence[bytes],
    *,
    exhaustive: bool = False,
) -> pb.PreselectRequest:
    """``mode``: ``"strict"`` or ``"routed"`` (a :class:`~veilface.client.search.SearchMode`);
    ``exhaustive``: full scores in one stage (no re-ranking)."""
    if mode not in _MODES:
        raise InvalidArgument("mode must be 'strict' or 'routed'")
    return pb.PreselectRequest(
        tenant_id=tenant_id,
        key_id=key_id,
        mode=_MODES[mode],
        labels=list(labels),
        probe_ciphertexts=list(probe),
        exhaustive=exhaustive,
    )


def score_candidates_request(
    tenant_id: str,
    key_id: str,
    slots: Mapping[int, Sequence[int]],
    *,
    query_id: str = "",
    probe: Sequence[bytes] = (),
) -> pb.ScoreCandidatesRequest:
    """Candidates in the order of ``slots`` (the caller shuffles it), each bin's slots ascending."""
    return pb.ScoreCandidatesRequest(
        tenant_id=tenant_id,
        key_id=key_id,
        candidates=[
            pb.CandidateSlots(bin_id=b, slots=np.sort(np.asarray(ss, dtype=np.int64)).tolist())
            for b, ss in slots.items()
        ],
        query_id=query_id,
        probe_ciphertexts=list(probe),
    )


def scores_from_proto(msg: pb.ScoresResponse, capacity: int) -> ScoresReply:
    bins = tuple(
        EncryptedBinScores(
            bin_id=int(b.bin_id),
            version=int(b.bin_version),
            label=b.label,
            occupied=occupied_slots(b.occupancy, capacity),
            parts=tuple(b.score_parts) if b.score_parts else (b.scores,),
        )
        for b in msg.bins
    )
    staged = tuple(
        EncryptedStagedScore(int(t.staged_id), t.handle, t.scores) for t in msg.staged
    )
    return ScoresReply(
        bins, staged, msg.query_id, int(msg.searched_templates), msg.ByteSize(), msg.exhaustive
    )


def fetch_slot_maps_request(
    tenant_id: str, key_id: str, known: Sequence[tuple[int, int]]
) -> pb.FetchSlotMapsRequest:
    """``known``: (bin id, version held, 0 for none) of each bin to bring up to date."""
    return pb.FetchSlotMapsRequest(
        tenant_id=tenant_id,
        key_id=key_id,
        known=[pb.BinVersion(bin_id=b, version=v) for b, v in known],
    )


def slot_maps_from_proto(msg: pb.FetchSlotMapsResponse) -> list[SlotMapUpdate]:
    out = []
    for m in msg.maps:
        if len(m.slots) != len(m.handles):
            raise InvalidArgument("a slot map must name one handle per slot")
        out.append(SlotMapUpdate(int(m.bin_id), int(m.version), tuple(m.slots), tuple(m.handles)))
    return out


@dataclass(frozen=True)
class VerifyReply:
    """A Verify answer: read slot ``slot`` of ``scores``."""

    key_id: str
    slot: int
    scores: bytes


def verify_request(
    tenant_id: str, key_id: str, handle: str, probe: Sequence[bytes]
) -> pb.VerifyRequest:
    return pb.VerifyRequest(
        tenant_id=tenant_id, handle=handle, key_id=key_id, probe_ciphertexts=list(probe)
    )


def verify_from_proto(msg: pb.VerifyResponse) -> VerifyReply:
    return VerifyReply(msg.key_id, int(msg.slot), msg.scores)


__all__ = [
    "EncryptedBinScores",
    "EncryptedStagedScore",
    "KeyInfo",
    "ScoresReply",
    "SlotMapUpdate",
    "TenantInfo",
    "VerifyReply",
    "fetch_slot_maps_request",
    "key_info_from_proto",
    "occupancy_bitmap",
    "occupied_slots",
    "preselect_request",
    "score_candidates_request",
    "scores_from_proto",
    "slot_maps_from_proto",
    "tenant_info_from_proto",
    "verify_from_proto",
    "verify_request",
]
