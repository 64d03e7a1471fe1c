"""Loading images: formats and modes, size limits, and hostile inputs (no LFW needed)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from veilface.client.face import ImageDecodeError, ImageNotFound, ImageSizeError, load_image
from veilface.client.face.image_io import ALLOWED_FORMATS, MAX_PIXELS
from veilface.errors import FaceError


def _encode(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


def _check_rgb(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert out.dtype == np.uint8
    assert out.shape == (*shape, 3)
    assert out.flags.c_contiguous


def test_path_bytes_and_array_agree(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    for src in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), rgb):
        out = load_image(src)
        _check_rgb(out, (48, 64))
        np.testing.assert_array_equal(out, rgb)


def test_grey_is_replicated_to_three_channels(rgb: np.ndarray) -> None:
    grey = rgb[:, :, 0]
    for src in (_encode(Image.fromarray(grey)), grey, grey[:, :, None]):
        out = load_image(src)
        _check_rgb(out, (48, 64))
        for c in range(3):
            np.testing.assert_array_equal(out[:, :, c], grey)


def test_rgba_is_composited_over_white(rgb: np.ndarray) -> None:
    alpha = np.full((48, 64, 1), 255, np.uint8)
    alpha[:, :32] = 0  # left half fully transparent
    rgba = np.concatenate([rgb, alpha], axis=2)
    for src in (_encode(Image.fromarray(rgba, "RGBA")), rgba):
        out = load_image(src)
        _check_rgb(out, (48, 64))
        assert (out[:, :32] == 255).all()
        np.testing.assert_array_equal(out[:, 32:], rgb[:, 32:])


def test_grey_alpha_and_palette_images(rgb: np.ndarray) -> None:
    la = Image.fromarray(rgb[:, :, 0]).convert("LA")
    _check_rgb(load_image(_encode(la)), (48, 64))
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    for fmt in ("PNG", "GIF"):
        out = load_image(_encode(palette, fmt))
        _check_rgb(out, (48, 64))
        np.testing.assert_array_equal(out, np.asarray(palette.convert("RGB")))
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    _check_rgb(load_image(_encode(transparent)), (48, 64))


def test_cmyk_jpeg() -> None:
    im = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # red
    out = load_image(_encode(im, "JPEG", quality=95))
    _check_rgb(out, (40, 40))
    r, g, b = (int(v) for v in out[20, 20])
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_uses_the_full_range() -> None:
    grey16 = np.zeros((40, 40), np.uint16)
    grey16[:, :20] = 65535
    grey16[:, 20:] = 100 * 256
    for src in (_encode(Image.fromarray(grey16)), grey16):
        out = load_image(src)
        _check_rgb(out, (40, 40))
        assert (out[:, :20] == 255).all() and (out[:, 20:] == 100).all()


def test_float_and_bool_arrays() -> None:
    f = np.full((40, 40, 3), 0.5, np.float32)
    assert (load_image(f) == 128).all()
    mask = np.zeros((40, 40), bool)
    mask[:, :10] = True
    out = load_image(mask)
    assert (out[:, :10] == 255).all() and (out[:, 10:] == 0).all()


def test_exif_orientation_is_applied(rgb: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes(), quality=95)
    assert load_image(data).shape == (64, 48, 3)


@pytest.mark.parametrize(
    ("array", "what"),
    [
        (np.zeros((40, 40, 2), np.uint8), "shape"),
        (np.zeros((40, 40, 3, 1), np.uint8), "shape"),
        (np.zeros((40, 40, 3), np.complex64), "dtype"),
        (np.zeros((40, 40, 3), np.int64), "dtype"),
        (np.full((40, 40), np.nan, np.float32), "NaN"),
    ],
)
def test_unsupported_arrays(array: np.ndarray, what: str) -> None:
    with pytest.raises(ImageDecodeError, match=what):
        load_image(array)


def test_random_bytes_are_not_an_image() -> None:
    junk = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="supported image format") as info:
        load_image(junk)
    assert isinstance(info.value, FaceError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_corrupt_body(fmt: str) -> None:
    rng = np.random.default_rng(2)
    data = bytearray(_encode(Image.fromarray(rng.integers(0, 256, (100, 100, 3), np.uint8)), fmt))
    start = data.index(b"IDAT") + 100 if fmt == "PNG" else 300
    data[start : start + 400] = bytes(400)  # headers intact, compressed data zeroed
    with pytest.raises(ImageDecodeError, match="corrupt"):
        load_image(bytes(data))


def test_truncated_jpeg() -> None:
    rng = np.random.default_rng(3)
    data = _encode(Image.fromarray(rng.integers(0, 256, (200, 200, 3), np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n" * 20)
    with pytest.raises(ImageDecodeError, match=r"notes\.jpg"):
        load_image(path)


def test_empty_bytes() -> None:
    with pytest.raises(ImageDecodeError):
        load_image(b"")


@pytest.mark.parametrize("size", [(1, 1), (31, 200), (200, 31)])
def test_too_small(size: tuple[int, int]) -> None:
    with pytest.raises(ImageSizeError, match="at least 32"):
        load_image(_encode(Image.new("RGB", size)))
    with pytest.raises(ImageSizeError):
        load_image(np.zeros((size[1], size[0], 3), np.uint8))


@pytest.mark.parametrize("size", [(8001, 100), (100, 8001), (7000, 7000)])
def test_too_large_is_refused_from_the_header(size: tuple[int, int]) -> None:
    with pytest.raises(ImageSizeError, match="downscale"):
        load_image(_png_header(*size))


def test_decompression_bomb_header() -> None:
    # 100k x 100k declared in a 57-byte file: Pillow's own bomb guard fires in open().
    with pytest.raises(ImageSizeError, match=r"bomb|megapixels"):
        load_image(_png_header(100_000, 100_000))


def test_size_limit_holds_without_pillows_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageSizeError):
        load_image(_png_header(30_000, 30_000))
    assert MAX_PIXELS < 30_000 * 30_000


def test_messages_hold_no_pixel_data(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "PNG")
    for bad in (data[: len(data) // 3], b"GIF89a" + data[6:200]):
        with pytest.raises(ImageDecodeError) as info:
            load_image(bad)
        message = str(info.value)
        assert len(message) < 200
        assert "\\x" not in message and "b'" not in message


def test_missing_file_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.jpg")
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


# --- the bad-input audit: paths, formats, modes, headers ---------------------


def test_unreadable_paths_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match=r"'absent\.jpg' does not exist") as info:
        load_image(tmp_path / "absent.jpg")
    assert isinstance(info.value, FaceError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(ImageNotFound, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_allowed_formats_decode(rgb: np.ndarray, fmt: str) -> None:
    assert fmt in ALLOWED_FORMATS
    out = load_image(_encode(Image.fromarray(rgb), fmt))
    _check_rgb(out, (48, 64))
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless
        np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "TGA", "PCX", "PDF"])
def test_other_formats_are_refused_before_decoding(rgb: np.ndarray, fmt: str) -> None:
    # EPS would run Ghostscript; the others are rarely used Pillow plugins
    with pytest.raises(ImageDecodeError, match="supported image format"):
        load_image(_encode(Image.fromarray(rgb), fmt))


def test_svg_and_heic_like_data_are_refused() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"></svg>'
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)
    for data in (svg, heic):
        with pytest.raises(ImageDecodeError, match="supported image format"):
            load_image(data)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "I;16", "I", "F", "LAB", "YCbCr", "CMYK"])
def test_every_tiff_mode_becomes_rgb(rgb: np.ndarray, mode: str) -> None:
    im = Image.fromarray(rgb)
    converted = im.convert("I;16" if mode == "I;16" else mode) if mode != "F" else im.convert("F")
    out = load_image(_encode(converted, "TIFF"))
    _check_rgb(out, (48, 64))


def test_float_image_of_nans_is_refused_without_warnings() -> None:
    data = _encode(Image.fromarray(np.full((40, 40), np.nan, np.float32)), "TIFF")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError, match="NaN"):
            load_image(data)


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info


def _gif_header(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x00"
    return b"GIF89a" + screen + frame + b";"


@pytest.mark.parametrize("make", [_png_header, _bmp_header, _gif_header])
@pytest.mark.parametrize("size", [(40_000, 40_000), (1, 1), (65_000, 60)])
def test_absurd_sizes_declared_in_headers(make: object, size: tuple[int, int]) -> None:
    with pytest.raises(ImageSizeError, match=r"px|megapixels|bomb"):
        load_image(make(*size))  # type: ignore[operator]


def test_absurd_arrays() -> None:
    with pytest.raises(ImageSizeError):
        load_image(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ImageSizeError):
        load_image(np.broadcast_to(np.uint8(0), (9000, 9000, 3)))  # no memory behind it
    with pytest.raises(ImageDecodeError, match="dtype"):
        load_image(np.zeros((40, 40, 3), object))
