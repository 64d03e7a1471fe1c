"""Load images into the one pixel format the face pipeline uses.

Everything becomes a C-contiguous ``uint8`` RGB array of shape ``(H, W, 3)``:
grey, grey+alpha, RGBA, palette, CMYK, 16-bit and float inputs are converted;
transparent pixels are composited over white; the EXIF orientation of a file
is applied. Size limits are checked from the file header *before* any pixel is
decoded, so a decompression bomb costs nothing. Only the formats in
:data:`ALLOWED_FORMATS` are decoded.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from veilface.client.face.errors import ImageDecodeError, ImageNotFound, ImageSizeError
from veilface.errors import FaceError

#: Smallest accepted side, in pixels.
MIN_SIDE = 32
#: Largest accepted side, in pixels.
MAX_SIDE = 8000
#: Largest accepted image, in pixels (40 megapixels).
MAX_PIXELS = 40_000_000
#: Pillow formats that are decoded; anything else is refused before decoding.
#: An allowlist keeps Pillow's rarer plugins (and EPS, which runs Ghostscript)
#: away from untrusted bytes. Pillow's JPEG reader also opens the multi-picture
#: (MPO) JPEGs of many phones.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, npt.NDArray[np.generic]]
"""What :func:`load_image` accepts: a file path, encoded bytes, or a pixel array."""


def check_size(width: int, height: int) -> None:
    """Raise :class:`ImageSizeError` unless ``width`` x ``height`` is a sane image size."""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageSizeError(
            f"image is {width}x{height} pixels; each side must be at least {MIN_SIDE} px "
            "(use a larger photo in which the face is clearly visible)"
        )
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageSizeError(
            f"image is {width}x{height} pixels; the limit is {MAX_SIDE} px a side and "
            f"{MAX_PIXELS // 1_000_000} megapixels (downscale the photo before submitting it)"
        )


def load_image(src: ImageSource) -> npt.NDArray[np.uint8]:
    """Load an image as RGB pixels.

    Parameters
    ----------
    src
        A path (``str`` or ``os.PathLike``), the encoded bytes of a JPEG, PNG,
        WebP, BMP, TIFF or GIF file (only the first frame is used), or a
        numpy array of shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
        ``(H, W, 4)`` (RGB order) of dtype ``uint8``, ``uint16`` (full 16-bit
        range), or float (range ``[0, 1]``).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(H, W, 3)``, C-contiguous, RGB.

    Raises
    ------
    ImageDecodeError
        The data is not an image Pillow can decode (corrupt, truncated,
        unsupported), or the array has an unsupported shape or dtype.
    ImageSizeError
        A side is below :data:`MIN_SIDE` or above :data:`MAX_SIDE` px, or the
        image exceeds :data:`MAX_PIXELS` (checked before decoding).
    ImageNotFound
        ``src`` is a path that does not exist, is a folder, or cannot be read
        (also a ``FileNotFoundError``).
    TypeError
        ``src`` is of none of the accepted types.
    """
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(src)), what="the image data")
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        name = os.path.basename(path) or path
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below; open errors are mapped
        except FileNotFoundError as exc:
            raise ImageNotFound(f"image file {name!r} does not exist (check the path)") from exc
        except IsADirectoryError as exc:
            raise ImageNotFound(f"{name!r} is a folder, not an image file") from exc
        except OSError as exc:
            raise ImageNotFound(
                f"image file {name!r} cannot be read ({exc.strerror or type(exc).__name__}; "
                "check its permissions)"
            ) from exc
        with fh:
            return _decode(fh, what=f"file {name!r}")
    raise TypeError(f"load_image() takes a path, bytes or a numpy array, not {type(src).__name__}")


def _decode(fh: BinaryIO, *, what: str) -> npt.NDArray[np.uint8]:
    try:
        with Image.open(fh, formats=ALLOWED_FORMATS) as im:
            # Only the header is read so far: enforce our limits before decoding.
            # They are far below Pillow's MAX_IMAGE_PIXELS and hold even if an
            # application disabled that global guard.
            check_size(*im.size)
            im.load()
            return _from_pil(ImageOps.exif_transpose(im))
    except FaceError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageSizeError(
            f"{what} declares an enormous image (decompression bomb guard); "
            f"the limit is {MAX_PIXELS // 1_000_000} megapixels"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"{what} is not in a supported image format "
            "(submit a JPEG, PNG, WebP, BMP, TIFF or GIF photo)"
        ) from exc
    except Exception as exc:
        # Pillow reports truncated or corrupt data mostly as OSError ("image
        # file is truncated", "broken data stream"), but malformed headers or
        # EXIF blocks can surface as SyntaxError, ValueError, EOFError,
        # struct.error, IndexError... Whatever the cause, untrusted bytes that
        # do not decode are a decode error.
        raise ImageDecodeError(
            f"{what} is corrupt or truncated and cannot be decoded "
            "(re-export or re-transfer the photo)"
        ) from exc


def _from_pil(im: Image.Image) -> npt.NDArray[np.uint8]:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG, TIFF): map the full 16-bit range to 8 bits.
        grey = np.asarray(im).astype(np.int64)
        return _grey_to_rgb(np.clip(grey >> 8, 0, 255).astype(np.uint8))
    if mode == "F":
        values = np.asarray(im, dtype=np.float32)
        finite = values[np.isfinite(values)]
        if finite.size and float(finite.max()) > 1.0:  # 0..255 floats
            values = values / 255.0
        return _from_array(values)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _from_array(arr: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageDecodeError(
            f"pixel array has shape {arr.shape}; expected (H, W), (H, W, 1), (H, W, 3) "
            "or (H, W, 4) in RGB order"
        )
    check_size(int(arr.shape[1]), int(arr.shape[0]))
    pixels = _to_uint8(arr)
    if pixels.ndim == 2:
        return _grey_to_rgb(pixels)
    if pixels.shape[2] == 4:
        rgb = pixels[:, :, :3].astype(np.float32)
        alpha = pixels[:, :, 3:4].astype(np.float32) / 255.0
        composited = rgb * alpha + 255.0 * (1.0 - alpha)
        return np.ascontiguousarray(np.clip(np.rint(composited), 0, 255).astype(np.uint8))
    return np.ascontiguousarray(pixels)


def _to_uint8(arr: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    if arr.dtype == np.uint8:
        return arr.astype(np.uint8, copy=False)
    if arr.dtype == np.uint16:
        return (arr.astype(np.uint16, copy=False) >> 8).astype(np.uint8)
    if arr.dtype == np.bool_:
        return np.where(arr, np.uint8(255), np.uint8(0)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        values = arr.astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise ImageDecodeError("pixel array contains NaN or infinite values")
        scaled: npt.NDArray[np.uint8] = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        return scaled
    raise ImageDecodeError(
        f"pixel array has dtype {arr.dtype}; expected uint8, uint16, bool or float in [0, 1]"
    )


def _grey_to_rgb(grey: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


__all__ = [
    "ALLOWED_FORMATS",
    "MAX_PIXELS",
    "MAX_SIDE",
    "MIN_SIDE",
    "ImageSource",
    "check_size",
    "load_image",
]
