"""Opaque subject handles: what the server stores in place of subject ids.

A handle is the AES-SIV encryption (RFC 5297, deterministic authenticated
encryption) of the subject id under the tenant's 64-byte handle key, in
URL-safe base64 without padding. Only the tenant can turn a handle back into
a subject id, and nobody without the key can forge one.

What a handle hides and what it does not:

- it hides the subject id, and (the id being padded to a multiple of 32
  bytes before encryption) its exact length: ids of 1-31 bytes all give
  64-character handles;
- it is deterministic by design (the same id always gives the same handle,
  so the tenant can find, verify and delete a subject by id): the server
  sees when two requests name the same subject, and a handle from one
  tenant key never matches one from another key.

Each tenant key has its own handle key, and key rotation draws a new one
(:meth:`veilface.client.tenant_state.TenantState.rotated`): the re-pack
gives every subject a new handle, unlinkable to the old one without both
keys, so handles are renewable (ISO/IEC 24745). A handle decodes only under
the key that made it; use the old key's codec to read old handles.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

KEY_BYTES = 64
MAX_SUBJECT_ID_BYTES = 256
_BLOCK = 32
_AAD = b"veilface-handle/1"
_TAG_BYTES = 16


def _pad(data: bytes) -> bytes:
    # ISO/IEC 7816-4: 0x80 then zeros up to a multiple of _BLOCK (always >= 1 byte).
    padded = data + b"\x80"
    return padded + b"\x00" * (-len(padded) % _BLOCK)


def _unpad(data: bytes) -> bytes:
    stripped = data.rstrip(b"\x00")
    if not stripped.endswith(b"\x80") or len(data) % _BLOCK:
        raise ValueError("bad padding")
    return stripped[:-1]


class HandleCodec:
    """Encode subject ids to opaque handles and back.

    Parameters
    ----------
    key
        The tenant's 64-byte AES-SIV handle key (:meth:`new_key`).

    Raises
    ------
    InvalidArgument
        The key is not 64 bytes.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise InvalidArgument(
                f"a handle key is {KEY_BYTES} bytes; make one with HandleCodec.new_key()"
            )
        self._siv = AESSIV(key)

    def __repr__(self) -> str:
        return "HandleCodec(<key hidden>)"

    @staticmethod
    def new_key() -> bytes:
        """A fresh random 64-byte handle key."""
        return secrets.token_bytes(KEY_BYTES)

    def encode(self, subject_id: str) -> str:
        """The handle of ``subject_id``; the same id always gives the same handle.

        Parameters
        ----------
        subject_id
            1 to 256 bytes once encoded as UTF-8.

        Returns
        -------
        str
            URL-safe base64 without padding (64 characters for ids under 32 bytes).

        Raises
        ------
        InvalidArgument
            Empty, too long, or not encodable as UTF-8.
        """
        if not isinstance(subject_id, str):
            raise InvalidArgument("a subject id must be a string")
        try:
            raw = subject_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                "a subject id must be valid Unicode text (it contains a lone surrogate)"
            ) from exc
        if not 1 <= len(raw) <= MAX_SUBJECT_ID_BYTES:
            raise InvalidArgument(
                f"a subject id must be 1 to {MAX_SUBJECT_ID_BYTES} bytes in UTF-8, got {len(raw)}"
            )
        token = self._siv.encrypt(_pad(raw), [_AAD])
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")

    def decode(self, handle: str) -> str:
        """The subject id behind ``handle``.

        Parameters
        ----------
        handle
            A string made by :meth:`encode` under the same key.

        Returns
        -------
        str
            The subject id.

        Raises
        ------
        InvalidArgument
            Not a handle, a modified handle, or a handle made under another key.
        """
        fail = "not a subject handle of this tenant key (malformed, modified, or another key)"
        if not isinstance(handle, str) or not handle or len(handle) % 4 == 1:
            raise InvalidArgument(fail)
        try:
            token = base64.b64decode(
                handle.encode("ascii") + b"=" * (-len(handle) % 4), altchars=b"-_", validate=True
            )
        except (UnicodeEncodeError, binascii.Error) as exc:
            raise InvalidArgument(fail) from exc
        canonical = base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")
        if canonical != handle or len(token) < _TAG_BYTES + _BLOCK:
            raise InvalidArgument(fail)  # one handle string per subject, no aliases
        try:
            return _unpad(self._siv.decrypt(token, [_AAD])).decode("utf-8")
        except (InvalidTag, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidArgument(fail) from exc


__all__ = ["KEY_BYTES", "MAX_SUBJECT_ID_BYTES", "HandleCodec"]
