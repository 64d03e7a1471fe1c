"""The face pipeline: real dlib on real LFW photos, the quality gate, the LFW embedder.

Tests marked ``data`` need ``../shared/data/lfw`` (or ``$VEILFACE_DATA/lfw``)
and skip without it; the others run anywhere.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from veilface.bench.lfw_embeddings import build_embeddings, list_people, save_npz
from veilface.cli import embed as embed_cli
from veilface.client.face import (
    DEFAULT_MIN_SHARPNESS,
    DlibBackend,
    FaceBackend,
    FaceBox,
    FaceEmbedding,
    FaceModelsNotFound,
    FacePipeline,
    FaceTooBlurry,
    FaceTooSmall,
    ImageDecodeError,
    ImageNotFound,
    ImageSizeError,
    MultipleFaces,
    NoFaceFound,
    face_sharpness,
    find_dlib_models,
)
from veilface.errors import InvalidArgument

# People with many LFW photos; their first two photos are used.
PEOPLE = ("Tony_Blair", "Gerhard_Schroeder", "Serena_Williams", "Hugo_Chavez")
SAME_PERSON = 0.6  # dlib's usual decision threshold on Euclidean distance


def photo(lfw: Path, name: str, n: int = 1) -> Path:
    return lfw / name / f"{name}_{n:04d}.jpg"


def rgb_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


@pytest.fixture(scope="module")
def pipeline() -> FacePipeline:
    pipe = FacePipeline(liveness=None)
    pipe.backend.load()
    return pipe


@pytest.fixture(scope="module")
def reference(lfw_dir: Path, pipeline: FacePipeline) -> dict[tuple[str, int], np.ndarray]:
    """Embeddings of the first two photos of each of PEOPLE."""
    return {(p, n): pipeline.embed(photo(lfw_dir, p, n)).vector for p in PEOPLE for n in (1, 2)}


# --- real dlib on LFW -------------------------------------------------------


@pytest.mark.data
def test_embedding_fields(lfw_dir: Path, pipeline: FacePipeline) -> None:
    emb = pipeline.embed(photo(lfw_dir, "Tony_Blair"))
    assert isinstance(emb, FaceEmbedding)
    assert emb.vector.dtype == np.float32 and emb.vector.shape == (128,)
    assert emb.backend == "dlib"
    assert emb.sharpness >= DEFAULT_MIN_SHARPNESS
    assert 60 <= emb.box.width <= 200 and 0 <= emb.box.left < 125 < emb.box.right <= 250


@pytest.mark.data
def test_same_person_close_different_people_far(
    reference: dict[tuple[str, int], np.ndarray],
) -> None:
    for p in PEOPLE:
        assert dist(reference[p, 1], reference[p, 2]) < SAME_PERSON, p
    for i, p in enumerate(PEOPLE):
        for q in PEOPLE[i + 1 :]:
            for a in (1, 2):
                for b in (1, 2):
                    assert dist(reference[p, a], reference[q, b]) > SAME_PERSON, (p, a, q, b)


@pytest.mark.data
def test_grey_and_rgba_versions(
    lfw_dir: Path, pipeline: FacePipeline, reference: dict[tuple[str, int], np.ndarray]
) -> None:
    for person in PEOPLE[:2]:
        colour = reference[person, 1]
        im = Image.open(photo(lfw_dir, person))
        rgba = pipeline.embed(np.asarray(im.convert("RGBA"))).vector
        assert dist(rgba, colour) < 0.1
        # dlib's network sees colour, so a grey copy moves by ~0.1-0.25 on LFW
        # (measured 0.11-0.23 over 15 photos); it must stay with its owner.
        grey = pipeline.embed(np.asarray(im.convert("L"))).vector
        assert dist(grey, colour) < 0.3
        nearest = min(reference, key=lambda key: dist(grey, reference[key]))
        assert nearest[0] == person


@pytest.mark.data
def test_blank_image_has_no_face(pipeline: FacePipeline) -> None:
    with pytest.raises(NoFaceFound, match="no face"):
        pipeline.embed(np.full((250, 250, 3), 200, np.uint8))


@pytest.mark.data
def test_two_face_collage(
    lfw_dir: Path, pipeline: FacePipeline, reference: dict[tuple[str, int], np.ndarray]
) -> None:
    left = Image.open(photo(lfw_dir, "Tony_Blair"))
    right = Image.open(photo(lfw_dir, "Gerhard_Schroeder")).resize((180, 180), Image.LANCZOS)
    canvas = Image.new("RGB", (430, 250), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (250, 35))
    collage = np.asarray(canvas)

    assert len(pipeline.detect(collage)) == 2
    with pytest.raises(MultipleFaces, match="largest"):
        pipeline.embed(collage)

    largest = FacePipeline(pipeline.backend, on_multiple="largest", liveness=None).embed(collage)
    assert largest.box.right <= 250  # the full-size face on the left
    assert dist(largest.vector, reference["Tony_Blair", 1]) < 0.1


@pytest.mark.data
def test_tiny_face(lfw_dir: Path) -> None:
    small = Image.open(photo(lfw_dir, "Tony_Blair")).resize((80, 80), Image.LANCZOS)
    canvas = Image.new("RGB", (320, 320), (128, 128, 128))
    canvas.paste(small, (120, 120))
    # upsample=2 finds faces down to ~20 px, so the gate (not the detector) decides.
    pipe = FacePipeline(upsample=2, liveness=None)
    faces = pipe.detect(np.asarray(canvas))
    assert len(faces) == 1 and faces[0].width < 40
    with pytest.raises(FaceTooSmall, match="minimum of 40 px"):
        pipe.embed(np.asarray(canvas))


@pytest.mark.data
def test_heavy_blur(lfw_dir: Path, pipeline: FacePipeline) -> None:
    blurred = Image.open(photo(lfw_dir, "Tony_Blair")).filter(ImageFilter.GaussianBlur(4))
    with pytest.raises(FaceTooBlurry, match="blurry") as info:
        pipeline.embed(np.asarray(blurred))
    assert len(str(info.value)) < 200
    # the gate can be switched off explicitly
    lenient = FacePipeline(pipeline.backend, min_sharpness=0, liveness=None)
    assert lenient.embed(np.asarray(blurred)).sharpness < DEFAULT_MIN_SHARPNESS


@pytest.mark.data
def test_bad_inputs_through_the_pipeline(lfw_dir: Path, pipeline: FacePipeline) -> None:
    data = photo(lfw_dir, "Tony_Blair").read_bytes()
    with pytest.raises(ImageDecodeError):
        pipeline.embed(b"hello, not a jpeg")
    with pytest.raises(ImageDecodeError):
        pipeline.embed(data[: len(data) // 2])
    with pytest.raises(ImageSizeError):
        pipeline.embed(np.zeros((1, 1, 3), np.uint8))
    # a PNG header declaring 40000 x 40000 pixels: refused before decoding
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(ImageSizeError):
        iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
        pipeline.embed(b"\x89PNG\r\n\x1a\n" + chunk + iend)
    eps = io.BytesIO()
    Image.open(photo(lfw_dir, "Tony_Blair")).save(eps, "EPS")
    with pytest.raises(ImageDecodeError, match="supported image format"):
        pipeline.embed(eps.getvalue())
    with pytest.raises(ImageNotFound, match="is a folder"):
        pipeline.embed(lfw_dir)
    # a 16-bit copy of the photo gives the same template
    sixteen = rgb_of(photo(lfw_dir, "Tony_Blair")).astype(np.uint16) * 257
    assert dist(pipeline.embed(sixteen).vector, pipeline.embed(data).vector) < 1e-5


@pytest.mark.data
def test_embed_many_keeps_going(
    lfw_dir: Path, pipeline: FacePipeline, reference: dict[tuple[str, int], np.ndarray]
) -> None:
    blank = np.full((100, 100, 3), 255, np.uint8)
    out = pipeline.embed_many([photo(lfw_dir, "Hugo_Chavez"), blank, b"junk"], progress=False)
    assert isinstance(out[0], FaceEmbedding)
    assert dist(out[0].vector, reference["Hugo_Chavez", 1]) < 1e-5
    assert isinstance(out[1], NoFaceFound) and isinstance(out[2], ImageDecodeError)


# --- the LFW embeddings builder ---------------------------------------------


@pytest.mark.data
def test_build_embeddings_on_a_small_tree(lfw_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "lfw"
    blank = Image.new("RGB", (250, 250), (90, 90, 90))

    def add(person: str, sources: list[Path | None]) -> None:
        (root / person).mkdir(parents=True)
        for i, src in enumerate(sources, 1):
            dst = root / person / f"{person}_{i:04d}.jpg"
            if src is None:
                blank.save(dst)
            else:
                dst.symlink_to(src)

    add("Ann_A", [photo(lfw_dir, "Serena_Williams", n) for n in (1, 2, 3)])
    add("Bob_B", [photo(lfw_dir, "Tony_Blair", n) for n in (1, 2)])
    add("Cid_C", [photo(lfw_dir, "Hugo_Chavez"), None])  # one good image: dropped
    add("Dan_D", [photo(lfw_dir, "Gerhard_Schroeder")])  # one file: not read

    result = build_embeddings(root, min_images=2, progress=False)
    assert result["images_read"] == 7
    assert result["skipped"] == {"NoFaceFound": 1}
    assert (result["dropped_people"], result["dropped_rows"]) == (1, 1)
    assert (result["people"], result["rows"]) == (2, 5)
    assert result["emb"].dtype == np.float32 and result["emb"].shape == (5, 128)
    assert list(result["labels"]) == ["Ann_A"] * 3 + ["Bob_B"] * 2
    assert result["paths"][3] == "Bob_B/Bob_B_0001.jpg"

    out = save_npz(tmp_path / "out" / "emb.npz", result)
    with np.load(out, allow_pickle=False) as d:
        np.testing.assert_array_equal(d["emb"], result["emb"])
        assert list(d["labels"]) == list(result["labels"])
        assert list(d["paths"]) == list(result["paths"])
        assert json.loads(str(d["meta"]))["skipped"] == {"NoFaceFound": 1}

    # the command, limited to the first person and two photos each
    parser = argparse.ArgumentParser()
    embed_cli.register(parser.add_subparsers())
    npz = tmp_path / "cli.npz"
    args = parser.parse_args(
        [
            "embed", str(root), "--out", str(npz), "--max-people", "1",
            "--max-per-person", "2", "--json", "--no-progress",
        ]
    )
    assert args.func(args) == 0
    with np.load(npz, allow_pickle=False) as d:
        assert list(d["labels"]) == ["Ann_A", "Ann_A"]
        np.testing.assert_allclose(d["emb"], result["emb"][:2], atol=1e-6)


def test_list_people_options(tmp_path: Path) -> None:
    for person, n in (("B_b", 3), ("A_a", 2), ("C_c", 1)):
        (tmp_path / person).mkdir()
        for i in range(n, 0, -1):
            (tmp_path / person / f"{person}_{i:04d}.jpg").write_bytes(b"")
    (tmp_path / "A_a" / "notes.txt").write_text("not an image")
    assert [(p, len(fs)) for p, fs in list_people(tmp_path)] == [("A_a", 2), ("B_b", 3)]
    assert [p for p, _ in list_people(tmp_path, max_people=1)] == ["A_a"]
    people = list_people(tmp_path, min_images=1, max_per_person=2)
    assert [(p, [f.name for f in fs]) for p, fs in people][1:] == [
        ("B_b", ["B_b_0001.jpg", "B_b_0002.jpg"]),
        ("C_c", ["C_c_0001.jpg"]),
    ]
    with pytest.raises(InvalidArgument):
        list_people(tmp_path / "absent")


# --- the gate and the sharpness measure, without dlib -----------------------


class FakeBackend:
    """A backend that 'finds' given boxes and embeds a box as its geometry."""

    name = "fake"
    embedding_dim = 4

    def __init__(self, boxes: list[FaceBox]) -> None:
        self.boxes = boxes

    def load(self) -> None:
        pass

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        return list(self.boxes)

    def align_and_embed(self, rgb: np.ndarray, box: FaceBox) -> np.ndarray:
        return np.array([box.left, box.top, box.width, box.height], np.float32)


NOISE = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)


def test_fake_backend_satisfies_the_protocol() -> None:
    assert isinstance(FakeBackend([]), FaceBackend)
    assert isinstance(DlibBackend(), FaceBackend)


def test_gate_policies() -> None:
    big, small = FaceBox(10, 10, 110, 120), FaceBox(150, 150, 200, 200)
    with pytest.raises(MultipleFaces, match="2 faces"):
        FacePipeline(FakeBackend([small, big]), liveness=None).embed(NOISE)
    emb = FacePipeline(FakeBackend([small, big]), on_multiple="largest", liveness=None).embed(NOISE)
    assert emb.box == big and emb.backend == "fake"
    np.testing.assert_array_equal(emb.vector, [10, 10, 100, 110])
    with pytest.raises(NoFaceFound):
        FacePipeline(FakeBackend([]), liveness=None).embed(NOISE)
    with pytest.raises(FaceTooSmall):
        FacePipeline(FakeBackend([FaceBox(0, 0, 39, 80)]), liveness=None).embed(NOISE)
    FacePipeline(FakeBackend([FaceBox(0, 0, 40, 80)]), liveness=None).embed(NOISE)
    with pytest.raises(FaceTooBlurry):
        FacePipeline(FakeBackend([big]), liveness=None).embed(np.full((300, 300, 3), 77, np.uint8))


def test_pipeline_arguments() -> None:
    with pytest.raises(ValueError, match="on_multiple"):
        FacePipeline(FakeBackend([]), on_multiple="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown face backend"):
        FacePipeline("opencv")
    with pytest.raises(FaceModelsNotFound, match="model_dir"):
        FacePipeline("insightface")
    with pytest.raises(ValueError, match="model_dir"):
        FacePipeline(FakeBackend([]), model_dir="/tmp")
    with pytest.raises(ValueError, match="min_face_px"):
        FacePipeline(FakeBackend([]), min_face_px=0)


def test_sharpness_is_resolution_independent_and_drops_with_blur() -> None:
    img = NOISE[:128, :128]
    box = FaceBox(0, 0, 128, 128)
    sharp = face_sharpness(img, box)
    # the same picture at 4x resolution is area-averaged back to 128 px
    big = np.kron(img, np.ones((4, 4, 1), np.uint8))
    assert face_sharpness(big, FaceBox(0, 0, 512, 512)) == pytest.approx(sharp, rel=1e-9)
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(4)))
    assert face_sharpness(blurred, box) < DEFAULT_MIN_SHARPNESS < sharp
    assert face_sharpness(img, FaceBox(-50, -50, -10, -10)) == 0.0  # outside the image


def test_models_are_found_without_importing_the_package() -> None:
    import sys

    paths = find_dlib_models()
    assert paths.shape_predictor.is_file() and paths.recognition.is_file()
    assert "face_recognition_models" not in sys.modules


def test_missing_model_dir_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FaceModelsNotFound, match="pip install face_recognition_models"):
        find_dlib_models(tmp_path)
    with pytest.raises(FaceModelsNotFound):
        DlibBackend(model_dir=tmp_path).detect(NOISE)


# --- large photos stay bounded -------------------------------------------------


@pytest.mark.data
@pytest.mark.slow
def test_large_photo_is_scanned_shrunk(lfw_dir: Path, pipeline: FacePipeline) -> None:
    face = Image.open(photo(lfw_dir, "Tony_Blair")).resize((400, 400), Image.LANCZOS)
    canvas = Image.new("RGB", (700, 700), (128, 128, 128))
    canvas.paste(face, (200, 250))
    img = np.asarray(canvas)
    full = pipeline.embed(img)  # 700*700*4 pixels scanned: below the default cap
    shrunk = DlibBackend(max_detect_pixels=250_000)  # shrinks by 0.36 for detection
    (b,) = shrunk.detect(img)
    a = full.box
    for x, y in ((a.left, b.left), (a.top, b.top), (a.right, b.right), (a.bottom, b.bottom)):
        assert abs(x - y) <= 0.1 * a.width  # HOG cells are 8 px of the shrunk copy
    assert 200 <= b.left < b.right <= 600 and 250 <= b.top < b.bottom <= 650
    assert dist(FacePipeline(shrunk, liveness=None).embed(img).vector, full.vector) < 0.1
    with pytest.raises(ValueError, match="max_detect_pixels"):
        DlibBackend(max_detect_pixels=10)


def test_sharpness_of_a_large_crop_matches_the_direct_formula() -> None:
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (700, 1100, 3), dtype=np.uint8)
    box = FaceBox(10, 20, 1090, 690)
    # the formula without the column bands
    grey = img[20:690, 10:1090].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    from veilface.client.face.pipeline import _resample_matrix

    small = _resample_matrix(670, 128) @ grey @ _resample_matrix(1080, 128).T
    lap = small[:-2, 1:-1] + small[2:, 1:-1] + small[1:-1, :-2] + small[1:-1, 2:] - 4 * small[1:-1, 1:-1]
    assert face_sharpness(img, box) == pytest.approx(float(lap.var()), rel=1e-9)
