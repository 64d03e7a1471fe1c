"""Sealing protected photos for the service (tenant side).

Only a :class:`~veilface.client.protect.ProtectedImage` can be sealed: the
upload path calls :func:`veilface.client.protect.require_protected` first,
so an unprotected array, file or byte string cannot reach the network. The
JPEG and its protection record are then encrypted with AES-256-GCM under a
key derived (HKDF-SHA256) from the tenant's handle key, bound to the tenant
and the subject handle as associated data: the server stores a blob it
cannot read, and a blob moved to another subject or tenant fails to open.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veilface.client.protect import require_protected, upload_payload
from veilface.errors import InvalidArgument

_MAGIC = b"VFPH1"


def photo_key(handle_key: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"veilface photo key v1"
    ).derive(handle_key)


def _aad(tenant_id: str, handle: str) -> bytes:
    return json.dumps([tenant_id, handle]).encode()


def seal_photo(image: object, *, key: bytes, tenant_id: str, handle: str) -> tuple[bytes, str]:
    """Seal a protected image: (blob, declared protection method)."""
    protected = require_protected(image)  # refuses anything a protector did not make
    jpeg, meta = upload_payload(protected)
    header = json.dumps(dict(meta), sort_keys=True).encode()
    plain = len(header).to_bytes(4, "big") + header + jpeg
    nonce = os.urandom(12)
    sealed = _MAGIC + nonce + AESGCM(key).encrypt(nonce, plain, _aad(tenant_id, handle))
    return sealed, str(meta["method"])


def open_photo(blob: bytes, *, key: bytes, tenant_id: str, handle: str) -> tuple[bytes, dict[str, Any]]:
    """Decrypt a sealed photo: (JPEG bytes, protection record)."""
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 12 + 16:
        raise InvalidArgument("not a sealed veilface photo")
    nonce = blob[len(_MAGIC) : len(_MAGIC) + 12]
    try:
        plain = AESGCM(key).decrypt(nonce, blob[len(_MAGIC) + 12 :], _aad(tenant_id, handle))
    except InvalidTag:
        raise InvalidArgument("the photo does not open with this tenant's key for this subject") from None
    n = int.from_bytes(plain[:4], "big")
    meta = json.loads(plain[4 : 4 + n])
    return plain[4 + n :], meta
