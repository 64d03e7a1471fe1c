"""Sealing protected photos for the service (tenant side).

Only a :class:`~veilface.client.protect.ProtectedImage` can be sealed: the
upload path calls :func:`veilface.client.protect.require_protected` first,
so an unprotected array, file or byte string cannot reach the network. The
JPEG and its protection record are then encrypted with AES-256-GCM under the
tenant key's photo key, bound to the tenant and the subject handle as
associated data: the server stores a blob it cannot read, and a blob moved
to another subject or tenant fails to open.

The photo key is a random 32-byte key of its own, drawn with every tenant
key and renewed by key rotation (:meth:`TenantState.rotated`), when the
photos are re-sealed under it (:func:`reseal_photo`). States written before
it existed have none: theirs is derived from the handle key as it always
was (:func:`legacy_photo_key`), so their photos still open.

:func:`upload_photo`, :func:`list_photos` and :func:`fetch_photo` are the
bodies of the ``VeilClient`` methods of the same names (the client keeps
the public methods and their kiosk guard).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veilface.errors import InvalidArgument
from veilface.proto.v1 import veilface_pb2 as pb

if TYPE_CHECKING:
    from veilface.client.protect import ProtectedImage
    from veilface.client.sdk import VeilClient

PHOTO_KEY_BYTES = 32
_MAGIC = b"VFPH1"
_NONCE = 12
_TAG = 16


def new_photo_key() -> bytes:
    """A fresh random 32-byte photo key (AES-256-GCM)."""
    return secrets.token_bytes(PHOTO_KEY_BYTES)


def legacy_photo_key(handle_key: bytes) -> bytes:
    """The photo key of a state saved before photo keys were stored: HKDF-SHA256 of the handle key."""
    return HKDF(
        algorithm=hashes.SHA256(), length=PHOTO_KEY_BYTES, salt=None, info=b"veilface photo key v1"
    ).derive(handle_key)


def _aad(tenant_id: str, handle: str) -> bytes:
    return json.dumps([tenant_id, handle]).encode()


def _seal(plain: bytes, *, key: bytes, tenant_id: str, handle: str) -> bytes:
    nonce = os.urandom(_NONCE)
    return _MAGIC + nonce + AESGCM(key).encrypt(nonce, plain, _aad(tenant_id, handle))


def _open(blob: bytes, *, key: bytes, tenant_id: str, handle: str) -> bytes:
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE + _TAG:
        raise InvalidArgument("not a sealed veilface photo")
    nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(_MAGIC) + _NONCE :], _aad(tenant_id, handle))
    except InvalidTag:
        raise InvalidArgument("the photo does not open with this tenant's key for this subject") from None


def seal_photo(image: object, *, key: bytes, tenant_id: str, handle: str) -> tuple[bytes, str]:
    """Seal a protected image: (blob, declared protection method)."""
    from veilface.client.protect import require_protected, upload_payload

    protected = require_protected(image)  # refuses anything a protector did not make
    jpeg, meta = upload_payload(protected)
    header = json.dumps(dict(meta), sort_keys=True).encode()
    plain = len(header).to_bytes(4, "big") + header + jpeg
    return _seal(plain, key=key, tenant_id=tenant_id, handle=handle), str(meta["method"])


def open_photo(blob: bytes, *, key: bytes, tenant_id: str, handle: str) -> tuple[bytes, dict[str, Any]]:
    """Decrypt a sealed photo: (JPEG bytes, protection record)."""
    plain = _open(blob, key=key, tenant_id=tenant_id, handle=handle)
    n = int.from_bytes(plain[:4], "big")
    meta = json.loads(plain[4 : 4 + n])
    return plain[4 + n :], meta


def reseal_photo(
    blob: bytes, *, old_key: bytes, old_handle: str, new_key: bytes, new_handle: str, tenant_id: str
) -> bytes:
    """A sealed photo opened under the old key and handle, sealed again under the new ones.

    Key rotation: the content (already protected when it was first sealed)
    is unchanged; the new blob has a fresh nonce and opens only with the new
    photo key for the new handle.

    Raises
    ------
    InvalidArgument
        ``blob`` does not open with ``old_key`` for ``old_handle``.
    """
    plain = _open(blob, key=old_key, tenant_id=tenant_id, handle=old_handle)
    return _seal(plain, key=new_key, tenant_id=tenant_id, handle=new_handle)


# -- the SDK's photo methods --------------------------------------------------------


def upload_photo(client: VeilClient, subject_id: str, image: ProtectedImage) -> str:
    """Seal a protected photo of an enrolled subject and keep it on the server; its photo id."""
    state = client.state
    handle = client._handles.encode(subject_id)
    sealed, method = seal_photo(image, key=state.photo_key, tenant_id=state.tenant_id, handle=handle)
    resp = client.transport.call(
        client.transport.photos.UploadPhoto,
        pb.UploadPhotoRequest(
            tenant_id=state.tenant_id, handle=handle, sealed_photo=sealed, protection=method
        ),
    )
    return str(resp.photo_id)


def list_photos(client: VeilClient, subject_id: str) -> list[str]:
    """The photo ids kept for a subject."""
    resp = client.transport.call(
        client.transport.photos.ListPhotos,
        pb.ListPhotosRequest(
            tenant_id=client.state.tenant_id, handle=client._handles.encode(subject_id)
        ),
    )
    return list(resp.photo_ids)


def fetch_photo(client: VeilClient, photo_id: str) -> tuple[str, bytes, dict[str, object]]:
    """(subject id, JPEG bytes, protection record) of a kept photo, opened with the tenant's key."""
    state = client.state
    resp = client.transport.call(
        client.transport.photos.FetchPhoto,
        pb.FetchPhotoRequest(tenant_id=state.tenant_id, photo_id=photo_id),
    )
    jpeg, meta = open_photo(
        resp.sealed_photo, key=state.photo_key, tenant_id=state.tenant_id, handle=resp.handle
    )
    return client._handles.decode(resp.handle), jpeg, meta


__all__ = [
    "PHOTO_KEY_BYTES",
    "fetch_photo",
    "legacy_photo_key",
    "list_photos",
    "new_photo_key",
    "open_photo",
    "reseal_photo",
    "seal_photo",
    "upload_photo",
]
