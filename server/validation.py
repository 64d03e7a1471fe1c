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
