"""Domain records -> protobuf messages, for the servicers (the server's one converter).

Nothing below the servicers imports protobuf: the service layer returns the
plain records of :mod:`veilface.server.identification` and
:mod:`veilface.server.service`, and these functions turn them into
messages. The occupancy bitmap codec lives here too (its decoder is
:func:`veilface.client.convert.occupied_slots`).
"""

from __future__ import annotations

from collections.abc import Sequence

from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.identification import BinScore, SlotMap
from veilface.server.service import KeyView


def occupancy_bitmap(occupied: Sequence[int]) -> bytes:
    """Bit ``s`` (little-endian within each byte) set for every occupied slot ``s``.

    The bitmap ends with the byte of the last occupied slot: a reader pads
    it with zeros to the bin's capacity (an empty bin gives ``b""``).
    """
    if not occupied:
        return b""
    bits = bytearray(max(occupied) // 8 + 1)
    for s in occupied:
        bits[s // 8] |= 1 << (s % 8)
    return bytes(bits)


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


__all__ = ["bin_scores_to_proto", "key_info_to_proto", "occupancy_bitmap", "slot_map_to_proto"]
