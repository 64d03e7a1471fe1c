"""Packing a list of ciphertext byte strings into one blob and back."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from veilface.errors import InvalidArgument

_MAGIC = b"VFB1"


def pack_blobs(items: Sequence[bytes]) -> bytes:
    parts = [_MAGIC, struct.pack(">I", len(items))]
    parts += [struct.pack(">I", len(b)) for b in items]
    parts += list(items)
    return b"".join(parts)


def unpack_blobs(blob: bytes) -> list[bytes]:
    if not blob.startswith(_MAGIC) or len(blob) < 8:
        raise InvalidArgument("stored bin blob is corrupt (bad magic)")
    (n,) = struct.unpack(">I", blob[4:8])
    head = 8 + 4 * n
    if head > len(blob):
        raise InvalidArgument("stored bin blob is corrupt (truncated header)")
    sizes = struct.unpack(f">{n}I", blob[8:head])
    out, offset = [], head
    for size in sizes:
        out.append(blob[offset : offset + size])
        offset += size
    if offset != len(blob):
        raise InvalidArgument("stored bin blob is corrupt (length mismatch)")
    return out
