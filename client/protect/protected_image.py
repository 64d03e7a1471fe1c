"""The only kind of image the SDK sends off the device: :class:`ProtectedImage`.

A :class:`ProtectedImage` can be created only by a protector of this package
(today :func:`veilface.client.protect.deidentify`): its constructor demands a
private capability token, so ``ProtectedImage(pixels, ...)`` raises
``TypeError``. The object is immutable, its pixels live in an immutable
``bytes`` buffer exposed as a read-only array that cannot be made writable,
and it carries the SHA-256 of those pixels plus a seal (an HMAC under a
per-process random key) over the hash, the shape, the method, its parameters
and the protected face boxes. :meth:`ProtectedImage.verify` recomputes both,
and every encoder calls it, so pixels or metadata swapped after creation
(``object.__setattr__``, writes through ``ctypes``...) are detected at use.

What this guarantees: an SDK caller cannot pass a raw array, file or byte
string where a protected image is expected (refused by type checkers and at
run time), and casual or accidental tampering is caught. What it cannot
guarantee: Python has no real access control, so code in the same process
that sets out to forge an object (reading the private key, patching this
module) can do so; such code could equally send raw pixels over its own
socket. The guarantee is against mistakes, not against a hostile host app.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import secrets
import types
from collections.abc import Mapping, Sequence
from typing import Final, cast, final

import numpy as np
import numpy.typing as npt
from PIL import Image

from veilface.client.face.backend import FaceBox
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

ParamValue = str | int | float | bool
"""A protection parameter: JSON scalars only, so metadata serialises as-is."""

#: Capability token: only code of this package holds it, so only a protector
#: can create a :class:`ProtectedImage`.
_MINT: Final = object()
#: Key of the seal over hash and metadata; random per process, never stored.
_SEAL_KEY: Final = secrets.token_bytes(32)

_NOT_MINTED = "ProtectedImage objects are created by a protector, e.g. deidentify(...)"


class UnprotectedImageError(InvalidArgument):
    """An image that did not go through a protector was about to leave the device."""


class TamperedImageError(UnprotectedImageError):
    """A :class:`ProtectedImage` no longer matches what its protector produced."""


@final
class ProtectedImage:
    """An image that went through a protector, ready to leave the device.

    Create one with a protector such as
    :func:`veilface.client.protect.deidentify`; calling the constructor
    directly raises ``TypeError``. Instances are immutable and cannot be
    subclassed, copied into a new object, or pickled.

    Attributes
    ----------
    pixels
        ``uint8`` array of shape ``(H, W, 3)``, RGB, read-only (its buffer is
        an immutable ``bytes`` object, so ``setflags(write=True)`` fails).
    method
        The protection applied (``"blur"``, ``"pixelate"`` or ``"mask"``).
    params
        Read-only mapping of the parameters used (JSON scalars).
    faces
        The regions that were protected, in pixels of ``pixels``, already
        expanded by the margin and clipped to the image.
    sha256
        Hex SHA-256 of the C-order pixel bytes at creation.
    """

    __slots__ = ("_data", "_faces", "_method", "_params", "_pixels", "_seal", "_sha256", "_shape")

    _data: bytes
    _shape: tuple[int, int, int]
    _pixels: npt.NDArray[np.uint8]
    _method: str
    _params: tuple[tuple[str, ParamValue], ...]
    _faces: tuple[FaceBox, ...]
    _sha256: str
    _seal: bytes

    def __init__(
        self,
        token: object,
        pixels: npt.NDArray[np.uint8],
        /,
        *,
        method: str,
        params: Mapping[str, ParamValue],
        faces: Sequence[FaceBox],
    ) -> None:
        if token is not _MINT:
            raise TypeError(_NOT_MINTED)
        arr = np.asarray(pixels)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise InvalidArgument(
                f"protected pixels must be uint8 of shape (H, W, 3), got {arr.dtype} {arr.shape}"
            )
        if not faces:
            raise InvalidArgument("a protected image must record at least one protected region")
        for key, value in params.items():
            if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
                raise InvalidArgument(f"protection parameter {key!r} is not a JSON scalar")
        data = np.ascontiguousarray(arr).tobytes()  # a copy the caller cannot reach
        shape = (int(arr.shape[0]), int(arr.shape[1]), 3)
        view: npt.NDArray[np.uint8] = np.ndarray(shape, dtype=np.uint8, buffer=data)
        view.setflags(write=False)
        ordered = tuple(sorted(params.items()))
        boxes = tuple(faces)
        digest = hashlib.sha256(data).hexdigest()
        init = object.__setattr__
        init(self, "_data", data)
        init(self, "_shape", shape)
        init(self, "_pixels", view)
        init(self, "_method", str(method))
        init(self, "_params", ordered)
        init(self, "_faces", boxes)
        init(self, "_sha256", digest)
        init(self, "_seal", _seal(digest, shape, str(method), ordered, boxes))

    # --- immutability --------------------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ProtectedImage is immutable; protect the image again instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("ProtectedImage is immutable")

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("ProtectedImage cannot be subclassed")

    def __copy__(self) -> ProtectedImage:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> ProtectedImage:
        return self

    def __reduce_ex__(self, protocol: object) -> str | tuple[object, ...]:
        raise TypeError("ProtectedImage cannot be pickled; send upload_payload(img) bytes instead")

    # --- read access ---------------------------------------------------------

    @property
    def pixels(self) -> npt.NDArray[np.uint8]:
        """``uint8 (H, W, 3)`` RGB, read-only."""
        return self._pixels

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(H, W, 3)``."""
        return self._shape

    @property
    def method(self) -> str:
        return self._method

    @property
    def params(self) -> Mapping[str, ParamValue]:
        return types.MappingProxyType(dict(self._params))

    @property
    def faces(self) -> tuple[FaceBox, ...]:
        return self._faces

    @property
    def sha256(self) -> str:
        return self._sha256

    def __repr__(self) -> str:
        shape = getattr(self, "_shape", None)
        if shape is None:
            return "<ProtectedImage (not minted)>"
        faces = len(self._faces)
        return (
            f"<ProtectedImage {shape[1]}x{shape[0]} method={self._method!r} "
            f"faces={faces} sha256={self._sha256[:12]}...>"
        )

    # --- validation and encoding ----------------------------------------------

    def verify(self) -> None:
        """Check that pixels and metadata are still what the protector produced.

        Recomputes the SHA-256 of the pixel buffer and the seal over hash,
        shape, method, parameters and faces.

        Raises
        ------
        TamperedImageError
            The object was not created by a protector, or anything in it
            changed after creation.
        """
        try:
            data, shape, view = self._data, self._shape, self._pixels
            method, params, faces = self._method, self._params, self._faces
            digest, seal = self._sha256, self._seal
        except AttributeError:
            raise TamperedImageError(_NOT_MINTED) from None
        ok = (
            isinstance(data, bytes)
            and isinstance(view, np.ndarray)
            and view.dtype == np.uint8
            and view.shape == shape
            and not view.flags.writeable
            and len(data) == shape[0] * shape[1] * shape[2]
            # numpy's stubs type .base as ndarray | None; here it is the bytes buffer
            and cast(object, view.base) is data
        )
        if ok:
            actual = hashlib.sha256(data).hexdigest()
            ok = hmac.compare_digest(actual, digest) and hmac.compare_digest(
                _seal(actual, shape, method, params, faces), seal
            )
        if not ok:
            logger.warning("a ProtectedImage failed verification (modified after protection)")
            raise TamperedImageError(
                "the protected image was modified after protection and can no longer be "
                "sent; protect the original image again with deidentify()"
            )

    def encode_jpeg(self, *, quality: int = 95) -> bytes:
        """Verify, then encode as baseline JPEG (no EXIF or other metadata).

        Parameters
        ----------
        quality
            JPEG quality, 1..95 (Pillow advises against higher values).
        """
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise InvalidArgument(f"JPEG quality must be an int in 1..95, got {quality!r}")
        return self._encode("JPEG", quality=quality)

    def encode_png(self) -> bytes:
        """Verify, then encode losslessly as PNG (no metadata chunks)."""
        return self._encode("PNG")

    def _encode(self, fmt: str, **options: int) -> bytes:
        self.verify()
        buf = io.BytesIO()
        Image.fromarray(self._pixels).save(buf, format=fmt, **options)
        return buf.getvalue()


def _seal(
    digest: str,
    shape: tuple[int, int, int],
    method: str,
    params: tuple[tuple[str, ParamValue], ...],
    faces: tuple[FaceBox, ...],
) -> bytes:
    record = json.dumps(
        {
            "sha256": digest,
            "shape": list(shape),
            "method": method,
            "params": [[k, v] for k, v in params],
            "faces": [[f.left, f.top, f.right, f.bottom] for f in faces],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return hmac.new(_SEAL_KEY, record, hashlib.sha256).digest()


def _mint(
    pixels: npt.NDArray[np.uint8],
    *,
    method: str,
    params: Mapping[str, ParamValue],
    faces: Sequence[FaceBox],
) -> ProtectedImage:
    """Create a :class:`ProtectedImage` (for protectors of this package only)."""
    return ProtectedImage(_MINT, pixels, method=method, params=params, faces=faces)


__all__ = ["ParamValue", "ProtectedImage", "TamperedImageError", "UnprotectedImageError"]
