"""Boundary checks on identifiers, labels, handles and counts (no I/O here)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from veilface.errors import InvalidArgument, ResourceExhausted

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_HANDLE = 512
MAX_LABEL = 128
MAX_LABELS = 4096
# The store keeps ids and versions in signed 64-bit columns (SQLite INTEGER, PostgreSQL BIGINT).
MAX_INT64 = 2**63 - 1


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
        if not h or len(h) > MAX_HANDLE or "\x00" in h:
            raise InvalidArgument(f"subject handles must be 1-{MAX_HANDLE} characters, none of them NUL")
    if len(set(handles)) != len(handles):
        raise InvalidArgument("subject handles in one request must be distinct")


def check_label(label: str) -> str:
    if len(label) > MAX_LABEL or "\x00" in label:
        raise InvalidArgument(f"bin labels are at most {MAX_LABEL} characters, none of them NUL")
    return label


def check_count(items: Sequence[bytes], expected: int, what: str) -> None:
    if len(items) != expected:
        raise InvalidArgument(f"a {what} is {expected} ciphertexts for this key, got {len(items)}")


def check_blob_sizes(blobs: Sequence[bytes], max_each: int, what: str) -> None:
    """Refuse any blob over ``max_each`` bytes before it is parsed or kept."""
    for i, b in enumerate(blobs):
        if len(b) > max_each:
            raise ResourceExhausted(
                f"{what} ciphertext {i} is {len(b)} bytes; at most {max_each} for this key"
            )


def check_id(value: int, what: str) -> int:
    """An id the store assigned (bin, staged template): 1 .. 2^63 - 1.

    A uint64 field of the protocol can carry 2^64 - 1; refusing here keeps
    such a value from reaching SQLite (which would overflow).
    """
    if not 1 <= int(value) <= MAX_INT64:
        raise InvalidArgument(f"{what} must be between 1 and {MAX_INT64}, got {value}")
    return int(value)


def check_int64(value: int, what: str) -> int:
    """A count or version that may be 0 (unset) but must fit the store: 0 .. 2^63 - 1."""
    if not 0 <= int(value) <= MAX_INT64:
        raise InvalidArgument(f"{what} must be between 0 and {MAX_INT64}, got {value}")
    return int(value)
