"""The gate every SDK call that sends an image off the device goes through.

An upload call takes a :class:`~veilface.client.protect.ProtectedImage` in its
signature (so a type checker refuses a raw array, file or byte string) and
calls :func:`require_protected` or :func:`upload_payload` first (so the same
mistake is refused at run time, with :class:`UnprotectedImageError`):

>>> img = deidentify("photo.jpg", method="mask")          # doctest: +SKIP
>>> data, meta = upload_payload(img)                       # doctest: +SKIP
>>> meta["method"], meta["content_type"]                   # doctest: +SKIP
('mask', 'image/jpeg')
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TypedDict

import numpy as np

from veilface.client.protect.protected_image import (
    ParamValue,
    ProtectedImage,
    UnprotectedImageError,
)

logger = logging.getLogger(__name__)

#: JPEG quality of upload payloads.
UPLOAD_JPEG_QUALITY = 95


class UploadMetadata(TypedDict):
    """What the server is told about an uploaded protected image.

    ``sha256`` is the hash of the protected *pixels* (``uint8 (H, W, 3)``,
    C order), as recorded by the protector; ``payload_sha256`` is the hash of
    the JPEG bytes actually sent (JPEG is lossy, so the two differ).
    """

    method: str
    params: dict[str, ParamValue]
    sha256: str
    payload_sha256: str
    content_type: str
    width: int
    height: int
    faces: int


def _describe(obj: object) -> str:
    if isinstance(obj, np.ndarray):
        return "a raw numpy array"
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return "raw image bytes"
    if isinstance(obj, (str, os.PathLike)):
        return "a file path"
    module = type(obj).__module__
    if module.startswith("PIL."):
        return "a PIL image"
    return f"an object of type {type(obj).__name__}"


def require_protected(obj: object) -> ProtectedImage:
    """Return ``obj`` if it is an intact :class:`ProtectedImage`, else refuse it.

    Parameters
    ----------
    obj
        What a caller wants to send off the device.

    Returns
    -------
    ProtectedImage
        ``obj`` itself, after :meth:`ProtectedImage.verify`.

    Raises
    ------
    UnprotectedImageError
        ``obj`` is anything else: an array, a PIL image, bytes, a path...
    TamperedImageError
        ``obj`` is a ``ProtectedImage`` that was modified after protection
        (a subclass of :class:`UnprotectedImageError`).
    """
    if not isinstance(obj, ProtectedImage) or type(obj) is not ProtectedImage:
        logger.warning("refused to send an unprotected image (%s)", type(obj).__name__)
        raise UnprotectedImageError(
            f"only protected images may leave the device, but this is {_describe(obj)}; "
            "protect it first with veilface.client.protect.cloak() or deidentify() and pass the "
            "ProtectedImage it returns"
        )
    obj.verify()
    return obj


def upload_payload(img: ProtectedImage) -> tuple[bytes, UploadMetadata]:
    """The bytes and metadata an SDK upload call sends for ``img``.

    Parameters
    ----------
    img
        A protected image; anything else raises (see :func:`require_protected`).

    Returns
    -------
    tuple of (bytes, UploadMetadata)
        JPEG bytes (quality :data:`UPLOAD_JPEG_QUALITY`, no EXIF), and the
        protection method, its parameters, the pixel and payload hashes, the
        size and the number of protected regions. No face boxes, no pixels.

    Raises
    ------
    UnprotectedImageError, TamperedImageError
        As :func:`require_protected`.
    """
    checked = require_protected(img)
    data = checked.encode_jpeg(quality=UPLOAD_JPEG_QUALITY)
    height, width, _ = checked.shape
    meta: UploadMetadata = {
        "method": checked.method,
        "params": dict(checked.params),
        "sha256": checked.sha256,
        "payload_sha256": hashlib.sha256(data).hexdigest(),
        "content_type": "image/jpeg",
        "width": width,
        "height": height,
        "faces": len(checked.faces),
    }
    return data, meta


__all__ = ["UPLOAD_JPEG_QUALITY", "UploadMetadata", "require_protected", "upload_payload"]
