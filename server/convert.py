"""Domain records <-> protobuf messages, for the servicers (the server's one converter).

Nothing below the servicers imports protobuf: the service layer returns the
plain records of :mod:`veilface.server.identification`,
:mod:`veilface.server.enrollment` and :mod:`veilface.server.service`, and
these functions turn them into messages (and the protocol's search mode
into :class:`~veilface.server.identification.SearchMode`). The occupancy
bitmap codec lives here too (its decoder is
:func:`veilface.client.convert.occupied_slots`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from veilface.errors import InvalidArgument
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.enrollment import BulkResult, EnrollResult, FetchedBin, SubjectBin
from veilface.server.identification import (
    BinScore,
    PreselectResult,
    SearchMode,
    SlotMap,
    StagedScore,
    VerifyResult,
)
from veilface.server.service import KeyView
from veilface.server.store.blobs import unpack_blobs
from veilface.server.store.records import BinSummary, Reservation, StagedRecord

_SEARCH_MODES: dict[int, SearchMode] = {
    pb.SEARCH_MODE_STRICT: SearchMode.STRICT,
    pb.SEARCH_MODE_ROUTED: SearchMode.ROUTED,
}


def occupancy_bitmap(occupied: Sequence[int]) -> bytes:
    """Bit ``s`` (little-endian within each byte) set for every occupied slot ``s``.

    The bitmap ends with the byte of the last occupied slot: a reader pads
    it with zeros to the bin's capacity (an empty bin gives ``b""``).
    """
    if not len(occupied):
        return b""
    idx = np.asarray(occupied, dtype=np.int64)
    bits = np.zeros(int(idx.max()) + 1, dtype=bool)  # numpy: a full bin is 4,096 slots
    bits[idx] = True
    return bytes(np.packbits(bits, bitorder="little").tobytes())


def key_info_to_proto(view: KeyView) -> pb.KeyInfo:
    rec, lay = view.record, view.layout
    info = pb.KeyInfo(
        key_id=rec.key_id,
        param_set=rec.param_set,
        dim=rec.dim,
        presel_dims=lay.m,
        n_ciphertexts=lay.n_ciphertexts,
        probe_ciphertexts=lay.g1,
        capacity=lay.capacity,
        fingerprint=rec.fingerprint,
        has_center=rec.center_probe is not None,
    )
    if view.stats is not None:
        info.subjects, info.bins, info.stored_bytes, info.staged = (
            view.stats.subjects,
            view.stats.bins,
            view.stats.stored_bytes,
            view.stats.staged,
        )
    return info


def bin_scores_to_proto(bs: BinScore) -> pb.BinScores:
    msg = pb.BinScores(
        bin_id=bs.bin_id,
        bin_version=bs.version,
        occupancy=occupancy_bitmap(bs.occupied),
        slots=list(bs.slots),
        label=bs.label,
    )
    if len(bs.parts) == 1:
        msg.scores = bs.parts[0]
    else:
        msg.score_parts.extend(bs.parts)
    return msg


def slot_map_to_proto(m: SlotMap) -> pb.SlotMap:
    return pb.SlotMap(bin_id=m.bin_id, version=m.version, slots=list(m.slots), handles=list(m.handles))


# -- identification ------------------------------------------------------------------


def search_mode_from_proto(mode: int) -> SearchMode:
    """The request's search mode; InvalidArgument for unset or unknown values."""
    found = _SEARCH_MODES.get(mode)
    if found is None:
        raise InvalidArgument("search mode must be SEARCH_MODE_STRICT or SEARCH_MODE_ROUTED")
    return found


def staged_score_to_proto(t: StagedScore) -> pb.StagedScore:
    return pb.StagedScore(staged_id=t.staged_id, handle=t.handle, scores=t.scores)


def preselect_to_proto(res: PreselectResult) -> pb.ScoresResponse:
    return pb.ScoresResponse(
        bins=[bin_scores_to_proto(b) for b in res.bins],
        searched_templates=res.searched_templates,
        query_id=res.query_id,
        staged=[staged_score_to_proto(t) for t in res.staged],
        exhaustive=res.exhaustive,
    )


def verify_to_proto(key_id: str, res: VerifyResult) -> pb.VerifyResponse:
    return pb.VerifyResponse(key_id=key_id, slot=res.slot, scores=res.scores)


# -- enrollment ------------------------------------------------------------------------


def reservation_to_proto(res: Reservation, expires_in_s: float) -> pb.ReserveSlotsResponse:
    return pb.ReserveSlotsResponse(
        reservation_id=res.reservation_id,
        bin_id=res.bin_id,
        slots=list(res.slots),
        expires_in_s=expires_in_s,
    )


def enroll_to_proto(res: EnrollResult) -> pb.EnrollResponse:
    return pb.EnrollResponse(bin_id=res.bin_id, slots=list(res.slots), bin_version=res.version)


def bulk_to_proto(res: BulkResult) -> pb.BulkEnrollResponse:
    return pb.BulkEnrollResponse(bins=len(res.bin_ids), subjects=res.subjects, bin_ids=list(res.bin_ids))


def subject_bin_to_proto(found: SubjectBin | StagedRecord) -> pb.FetchSubjectBinResponse:
    """A subject's bin, or for a staged subject only its key and ``staged``."""
    if isinstance(found, StagedRecord):
        return pb.FetchSubjectBinResponse(key_id=found.key_id, staged=True)
    return pb.FetchSubjectBinResponse(
        key_id=found.key_id,
        bin_id=found.info.bin_id,
        bin_version=found.info.version,
        slot=found.slot,
        occupied_slots=list(found.info.occupied),
        ciphertexts=unpack_blobs(found.blob),
    )


def fetched_bin_to_proto(found: FetchedBin) -> pb.FetchBinResponse:
    return pb.FetchBinResponse(
        key_id=found.key_id,
        bin_id=found.info.bin_id,
        version=found.info.version,
        label=found.info.label,
        slots=list(found.slots),
        handles=list(found.handles),
        ciphertexts=unpack_blobs(found.blob),
    )


def bin_summary_to_proto(b: BinSummary) -> pb.BinRef:
    return pb.BinRef(bin_id=b.bin_id, label=b.label, version=b.version, subjects=b.subjects)


def staged_template_to_proto(r: StagedRecord) -> pb.StagedTemplate:
    return pb.StagedTemplate(staged_id=r.staged_id, handle=r.handle, label=r.label, ciphertext=r.blob)


__all__ = [
    "bin_scores_to_proto",
    "bin_summary_to_proto",
    "bulk_to_proto",
    "enroll_to_proto",
    "fetched_bin_to_proto",
    "key_info_to_proto",
    "occupancy_bitmap",
    "preselect_to_proto",
    "reservation_to_proto",
    "search_mode_from_proto",
    "slot_map_to_proto",
    "staged_score_to_proto",
    "staged_template_to_proto",
    "subject_bin_to_proto",
    "verify_to_proto",
]
