"""The only kind of image the SDK sends off the device: :class:`ProtectedImage`.

A :class:`ProtectedImage` can be created only by a protector of this package
(:func:`~veilface.client.protect.deidentify` and
:func:`~veilface.client.protect.cloak`), through :func:`mint_protected`:

- the constructor demands a capability token that no module attribute holds
  (it lives in the closure of :func:`mint_protected`), so
  ``ProtectedImage(pixels, ...)`` raises ``TypeError``;
- :func:`mint_protected` refuses every caller but the code of the two
  protector modules (it checks the calling frame's module), and only for the
  methods each protector implements;
- it demands the **original** image next to the result and refuses a result
  below the change floor (:mod:`veilface.client.protect.change_floor`): an
  unchanged or barely changed protected region, or, for ``cloak``,
  surrogates that still see the same face. What it measured is added to the
  image's params (``region_linf``, ``region_ssim``,
  ``surrogate_similarity_final``) and sealed with them.

The object is immutable, its pixels live in an immutable
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
that sets out to forge an object (reading the private key or the closure,
patching this module, faking a protector module) can do so; such code could
equally send raw pixels over its own socket. The guarantee is against
mistakes, not against a developer set on bypassing it or a hostile host app.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import secrets
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol, cast, final

import numpy as np
import numpy.typing as npt
from PIL import Image

from veilface.client.face.backend import FaceBox
from veilface.client.protect.change_floor import require_change
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

ParamValue = str | int | float | bool
"""A protection parameter: JSON scalars only, so metadata serialises as-is."""

#: The modules allowed to mint, and the methods each may record.
_PROTECTORS: Final[Mapping[str, frozenset[str]]] = types.MappingProxyType(
    {
        "veilface.client.protect.deidentify": frozenset({"blur", "pixelate", "mask"}),
        "veilface.client.protect.adversarial": frozenset({"adversarial"}),
    }
)
#: Params the mint adds (what the change floor measured); a protector may not set them.
_FLOOR_PARAMS: Final = ("region_linf", "region_ssim", "surrogate_similarity_final")
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
        if not _is_token(token):
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


class MintFunction(Protocol):
    """The signature of :func:`mint_protected`."""

    def __call__(
        self,
        original: npt.NDArray[np.uint8],
        result: npt.NDArray[np.uint8],
        *,
        method: str,
        params: Mapping[str, ParamValue],
        faces: Sequence[FaceBox],
        surrogate_similarity: float | None = None,
    ) -> ProtectedImage: ...


def _build_mint() -> tuple[Callable[[object], bool], MintFunction]:
    """The token check and the mint; the token itself lives only in their closure."""
    token = object()

    def is_token(candidate: object) -> bool:
        return candidate is token

    def mint_protected(
        original: npt.NDArray[np.uint8],
        result: npt.NDArray[np.uint8],
        *,
        method: str,
        params: Mapping[str, ParamValue],
        faces: Sequence[FaceBox],
        surrogate_similarity: float | None = None,
    ) -> ProtectedImage:
        """Create a :class:`ProtectedImage` from a protector's result (protector modules only).

        Parameters
        ----------
        original
            ``uint8 (H, W, 3)``: the image the protector was given (loaded).
        result
            ``uint8 (H, W, 3)``: what the protector made of it.
        method, params, faces
            As recorded on the image (``faces``: the protected regions).
        surrogate_similarity
            ``cloak`` only (required there): the surrogates' cosine
            similarity between the original and the protected face.

        Raises
        ------
        UnprotectedImageError
            The caller is not a protector module, or not one allowed to
            record ``method``.
        InsufficientChange
            The result is below the change floor (see
            :mod:`veilface.client.protect.change_floor`).
        """
        frame_globals = sys._getframe(1).f_globals
        name = frame_globals.get("__name__")
        allowed = _PROTECTORS.get(name) if isinstance(name, str) else None
        module = sys.modules.get(name) if isinstance(name, str) else None
        if allowed is None or module is None or vars(module) is not frame_globals:
            logger.warning("refused to mint a ProtectedImage outside the protectors (%s)", name)
            raise UnprotectedImageError(
                "only the protectors deidentify() and cloak() of veilface.client.protect create "
                "protected images; protect the original image with one of them"
            )
        if method not in allowed:
            raise UnprotectedImageError(f"{name} may not record protection method {method!r}")
        if method == "adversarial" and surrogate_similarity is None:
            raise InvalidArgument("an adversarial result needs its surrogate similarity")
        orig, res = np.asarray(original), np.asarray(result)
        for label, arr in (("original", orig), ("protected", res)):
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise InvalidArgument(
                    f"{label} pixels must be uint8 of shape (H, W, 3), got {arr.dtype} {arr.shape}"
                )
        clash = sorted(set(params) & set(_FLOOR_PARAMS))
        if clash:
            raise InvalidArgument(f"protection params {clash} are set by the change floor")
        report = require_change(
            orig, res, faces, method=method, surrogate_similarity=surrogate_similarity
        )
        recorded: dict[str, ParamValue] = dict(params)
        recorded["region_linf"] = report.min_linf
        recorded["region_ssim"] = round(report.max_ssim, 4)
        if report.surrogate_similarity is not None:
            recorded["surrogate_similarity_final"] = round(report.surrogate_similarity, 4)
        return ProtectedImage(token, res, method=method, params=recorded, faces=faces)

    return is_token, mint_protected


_is_token, mint_protected = _build_mint()
del _build_mint


__all__ = [
    "ParamValue",
    "ProtectedImage",
    "TamperedImageError",
    "UnprotectedImageError",
    "mint_protected",
]
