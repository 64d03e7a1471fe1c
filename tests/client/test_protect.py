"""Protected images, de-identification and the upload gate.

Tests marked ``data`` run real dlib on LFW photos and skip without
``../shared/data/lfw``; the others use synthetic images and a fake detector.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import FakeDetector
from veilface.client.face import (
    FaceBox,
    FacePipeline,
    ImageDecodeError,
    ImageSizeError,
    NoFaceFound,
    load_image,
)
from veilface.client.protect import (
    PRESETS,
    ProtectedImage,
    TamperedImageError,
    UnprotectedImageError,
    deidentify,
    require_protected,
    upload_payload,
)
from veilface.errors import InvalidArgument

SAME_PERSON = 0.6  # dlib's standard decision threshold on Euclidean distance
BOX = FaceBox(left=40, top=50, right=100, bottom=110)


def scene(seed: int = 0, shape: tuple[int, int] = (160, 140)) -> np.ndarray:
    """Seeded noisy ``uint8 (H, W, 3)`` image: every pixel differs from its neighbours."""
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def outside(mask_shape: tuple[int, int], regions: tuple[FaceBox, ...]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels outside every region."""
    keep = np.ones(mask_shape, dtype=bool)
    for r in regions:
        keep[r.top : r.bottom, r.left : r.right] = False
    return keep


@pytest.fixture
def protected() -> ProtectedImage:
    return deidentify(scene(), method="mask", faces=[BOX])


# --- de-identification on synthetic images ----------------------------------


@pytest.mark.parametrize("method", ["blur", "pixelate", "mask"])
@pytest.mark.parametrize("strength", ["low", "medium", "high"])
def test_only_the_face_regions_change(method: str, strength: str) -> None:
    src = scene()
    img = deidentify(src, method=method, faces=[BOX], strength=strength)  # type: ignore[arg-type]
    out = img.pixels
    assert out.dtype == np.uint8 and out.shape == src.shape and not out.flags.writeable
    (region,) = img.faces
    m = PRESETS[strength].margin  # type: ignore[index]
    # The box grew by the margin (twice at the top) and nothing outside it changed.
    assert region.left <= BOX.left - m * BOX.width + 1 and region.right >= BOX.right + m * 60 - 1
    assert region.top <= BOX.top - 2 * m * BOX.height + 1
    keep = outside(src.shape[:2], img.faces)
    np.testing.assert_array_equal(out[keep], src[keep])
    inside = out[region.top : region.bottom, region.left : region.right].astype(float)
    original = src[region.top : region.bottom, region.left : region.right].astype(float)
    assert np.mean(np.abs(inside - original)) > 30  # noise is destroyed, not nudged
    assert img.method == method and img.params["strength"] == strength
    img.verify()


def test_mask_fills_and_pixelate_makes_blocks() -> None:
    src = scene(1)
    masked = deidentify(src, method="mask", faces=[BOX], strength="high")
    (r,) = masked.faces
    assert np.all(masked.pixels[r.top : r.bottom, r.left : r.right] == PRESETS["high"].fill)
    pix = deidentify(src, method="pixelate", faces=[BOX], strength="high")
    (r,) = pix.faces
    crop = pix.pixels[r.top : r.bottom, r.left : r.right].reshape(-1, 3)
    assert len(np.unique(crop, axis=0)) <= PRESETS["high"].blocks ** 2


def test_several_faces_and_boxes_past_the_border() -> None:
    src = scene(2)
    boxes = [FaceBox(-10, -10, 30, 30), FaceBox(90, 100, 150, 170)]
    img = deidentify(src, method="blur", faces=boxes)
    assert len(img.faces) == 2
    for r in img.faces:  # clipped to the image
        assert 0 <= r.left < r.right <= 140 and 0 <= r.top < r.bottom <= 160
    keep = outside(src.shape[:2], img.faces)
    np.testing.assert_array_equal(img.pixels[keep], src[keep])


def test_input_is_copied() -> None:
    src = scene(3)
    img = deidentify(src, method="mask", faces=[BOX])
    before = img.pixels.copy()
    src[:] = 7
    np.testing.assert_array_equal(img.pixels, before)
    img.verify()


def test_grey_and_rgba_inputs_become_rgb() -> None:
    grey = scene(4)[:, :, 0]
    rgba = np.dstack([scene(5), np.full((160, 140), 255, np.uint8)])
    for src in (grey, rgba):
        assert deidentify(src, method="mask", faces=[BOX]).shape == (160, 140, 3)


def test_detect_uses_the_pipeline_and_refuses_faceless_images() -> None:
    found = FacePipeline(FakeDetector([BOX]))
    img = deidentify(scene(), method="pixelate", pipeline=found)
    assert len(img.faces) == 1 and img.faces[0].left < BOX.left
    with pytest.raises(NoFaceFound, match="cannot be de-identified"):
        deidentify(scene(), pipeline=FacePipeline(FakeDetector([])))


def test_bad_arguments_and_inputs() -> None:
    src = scene()
    with pytest.raises(InvalidArgument, match="method"):
        deidentify(src, method="swirl", faces=[BOX])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="strength"):
        deidentify(src, faces=[BOX], strength="max")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="nothing to protect"):
        deidentify(src, faces=[])
    with pytest.raises(InvalidArgument, match="FaceBox"):
        deidentify(src, faces=[(1, 2, 3, 4)])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="does not overlap"):
        deidentify(src, faces=[FaceBox(500, 500, 600, 600)])
    with pytest.raises(InvalidArgument, match="'detect'"):
        deidentify(src, faces="auto")  # type: ignore[arg-type]
    with pytest.raises(ImageDecodeError):
        deidentify(b"\xff\xd8\xff\xe0 not really a jpeg", faces=[BOX])
    with pytest.raises(ImageSizeError):
        deidentify(np.zeros((8, 8, 3), np.uint8), faces=[BOX])


# --- the ProtectedImage object ----------------------------------------------


def test_only_a_protector_can_create_one() -> None:
    pixels = scene()
    with pytest.raises(TypeError, match="created by a protector"):
        ProtectedImage(object(), pixels, method="mask", params={}, faces=[BOX])
    with pytest.raises(TypeError, match="created by a protector"):
        ProtectedImage(None, pixels, method="mask", params={}, faces=[BOX])
    with pytest.raises(TypeError):
        ProtectedImage(pixels)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="subclassed"):
        type("Fake", (ProtectedImage,), {})
    # An instance made without __init__ is refused at use.
    bare = ProtectedImage.__new__(ProtectedImage)
    with pytest.raises(TamperedImageError):
        require_protected(bare)
    with pytest.raises(TamperedImageError):
        bare.encode_png()


def test_immutable_and_read_only(protected: ProtectedImage) -> None:
    with pytest.raises(AttributeError):
        protected.method = "none"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        protected._data = b""  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del protected._sha256
    arr = protected.pixels
    with pytest.raises(ValueError):
        arr[0, 0] = 1
    with pytest.raises(ValueError):
        arr.setflags(write=True)
    # The buffer behind the array is an immutable bytes object: a new array on it is read-only too.
    assert isinstance(arr.base, bytes)
    alias = np.ndarray(arr.shape, dtype=np.uint8, buffer=arr.base)
    with pytest.raises(ValueError):
        np.ndarray.__setitem__(alias, (0, 0), 1)
    with pytest.raises(TypeError):
        protected.params["strength"] = "low"  # type: ignore[index]
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(protected)
    assert copy.copy(protected) is protected and copy.deepcopy(protected) is protected
    assert hashlib.sha256(arr.tobytes()).hexdigest() == protected.sha256
    protected.verify()


def test_pixels_written_in_place_are_detected(protected: ProtectedImage) -> None:
    # Bypass numpy's read-only flag and write straight into the pixel buffer.
    arr = protected.pixels
    address = arr.ctypes.data + (100 * arr.shape[1] + 3) * 3  # pixel (100, 3), outside the mask
    old = int(arr[100, 3, 0])
    ctypes.memset(address, (old + 1) % 256, 1)
    assert int(protected.pixels[100, 3, 0]) != old
    with pytest.raises(TamperedImageError, match="deidentify"):
        protected.verify()
    with pytest.raises(TamperedImageError):
        protected.encode_jpeg()
    with pytest.raises(TamperedImageError):
        require_protected(protected)
    with pytest.raises(UnprotectedImageError):  # the parent class catches it too
        upload_payload(protected)


def test_attributes_swapped_with_object_setattr_are_detected() -> None:
    def fresh() -> ProtectedImage:
        return deidentify(scene(), method="mask", faces=[BOX])

    original = scene().tobytes()  # the unprotected pixels
    view = np.ndarray((160, 140, 3), dtype=np.uint8, buffer=original)  # read-only, on it
    digest = hashlib.sha256(original).hexdigest()
    swaps: list[dict[str, object]] = [
        {"_data": original},
        {"_data": original, "_pixels": view},
        # Hash recomputed too: the seal over the hash still gives it away.
        {"_data": original, "_pixels": view, "_sha256": digest},
        {"_pixels": scene().copy()},  # a writable array
        {"_method": "adversarial"},
        {"_faces": ()},
        {"_params": (("strength", "high"),)},
    ]
    for swap in swaps:
        img = fresh()
        img.verify()
        for name, value in swap.items():
            object.__setattr__(img, name, value)
        with pytest.raises(TamperedImageError):
            img.verify()


def test_encoders(protected: ProtectedImage) -> None:
    png = Image.open(io.BytesIO(protected.encode_png()))
    assert png.format == "PNG"
    np.testing.assert_array_equal(np.asarray(png), protected.pixels)
    jpeg = Image.open(io.BytesIO(protected.encode_jpeg(quality=80)))
    assert jpeg.format == "JPEG" and jpeg.size == (140, 160) and not jpeg.info.get("exif")
    for bad in (0, 96, 90.0, True):
        with pytest.raises(InvalidArgument, match="quality"):
            protected.encode_jpeg(quality=bad)  # type: ignore[arg-type]
    assert "sha256=" in repr(protected) and "method='mask'" in repr(protected)


# --- the upload gate ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("numpy array", lambda p: scene()),
        ("read-only array", lambda p: p.pixels),
        ("PIL image", lambda p: Image.fromarray(scene())),
        ("bytes", lambda p: p.encode_png()),
        ("bytearray", lambda p: bytearray(p.encode_png())),
        ("memoryview", lambda p: memoryview(p.encode_png())),
        ("file path", lambda p: "photo.jpg"),
        ("pathlib path", lambda p: Path("photo.jpg")),
        ("None", lambda p: None),
    ],
)
def test_unprotected_kinds_are_refused(kind: str, make: object, protected: ProtectedImage) -> None:
    obj = make(protected)  # type: ignore[operator]
    with pytest.raises(UnprotectedImageError, match=r"deidentify\(\)") as info:
        require_protected(obj)
    assert isinstance(info.value, InvalidArgument) and info.value.status == "INVALID_ARGUMENT"
    assert not isinstance(info.value, TamperedImageError)
    with pytest.raises(UnprotectedImageError):
        upload_payload(obj)


def test_upload_payload(protected: ProtectedImage) -> None:
    assert require_protected(protected) is protected
    data, meta = upload_payload(protected)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG" and decoded.size == (140, 160)
    assert meta == {
        "method": "mask",
        "params": dict(protected.params),
        "sha256": protected.sha256,
        "payload_sha256": hashlib.sha256(data).hexdigest(),
        "content_type": "image/jpeg",
        "width": 140,
        "height": 160,
        "faces": 1,
    }
    assert meta["params"]["strength"] == "medium"


# --- real dlib on LFW -----------------------------------------------------------

PEOPLE = ("Tony_Blair", "Serena_Williams", "Gerhard_Schroeder")


@pytest.fixture(scope="module")
def dlib_pipeline() -> FacePipeline:
    pipe = FacePipeline(liveness=None)  # LFW originals to compare with, not captures
    pipe.backend.load()
    return pipe


@pytest.mark.data
@pytest.mark.parametrize("method", ["blur", "pixelate", "mask"])
def test_deidentified_lfw_faces_no_longer_match(
    lfw_dir: Path, dlib_pipeline: FacePipeline, method: str
) -> None:
    backend = dlib_pipeline.backend
    for person in PEOPLE:
        path = lfw_dir / person / f"{person}_0001.jpg"
        original = dlib_pipeline.embed(path)
        img = deidentify(path, method=method, pipeline=dlib_pipeline)  # type: ignore[arg-type]
        # Everything outside the protected regions is the loaded photo, bit for bit.
        src = load_image(path)
        keep = outside(src.shape[:2], img.faces)
        np.testing.assert_array_equal(img.pixels[keep], src[keep])
        assert keep.mean() > 0.3  # LFW crops are mostly face
        # Re-detection: any face still found must not match the original.
        pixels = np.array(img.pixels)
        for box in backend.detect(pixels):
            d = np.linalg.norm(backend.align_and_embed(pixels, box) - original.vector)
            assert d > SAME_PERSON, (person, method, "re-detected", d)
        # Stricter: embed at the original face box, on the pixels and on the uploaded JPEG.
        uploaded = np.asarray(Image.open(io.BytesIO(upload_payload(img)[0])).convert("RGB"))
        for candidate in (pixels, np.ascontiguousarray(uploaded)):
            d = np.linalg.norm(backend.align_and_embed(candidate, original.box) - original.vector)
            assert d > SAME_PERSON, (person, method, "at the original box", d)


@pytest.mark.data
def test_default_detector_refuses_a_faceless_photo(lfw_dir: Path) -> None:
    sky = np.zeros((200, 200, 3), np.uint8)
    sky[:] = (110, 160, 230)
    with pytest.raises(NoFaceFound):
        deidentify(sky)  # the default (dlib) pipeline
