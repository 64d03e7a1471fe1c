"""The insightface backend on small ONNX models built here with SCRFD's and ArcFace's shapes.

The tiny detector has det_10g's interface (input ``1x3x?x?``, 9 outputs:
scores, boxes and landmarks for strides 8, 16, 32 with 2 anchors) and a real
computation: its stride-32 score is high exactly where a 32x32 canvas cell
is bright in the *red* channel, so a red square planted in a photo must be
found where it is, after letterboxing, RGB ordering, normalisation, anchor
decoding, NMS and un-letterboxing. Its boxes and landmarks are fixed offsets
from the anchor point. The tiny recogniser has w600k_r50's interface (input
``Nx3x112x112``, output ``Nx512``): an 8x8 average pool and a fixed random
projection, so its output can be recomputed in numpy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from veilface.client.face import (
    FaceBackend,
    FaceBox,
    FaceModelInvalid,
    FaceModelsNotFound,
    FacePipeline,
    FaceTooSmall,
    InsightFaceBackend,
    MultipleFaces,
    NoFaceFound,
)
from veilface.client.face.arcface_align import (
    ARCFACE_DST,
    estimate_norm,
    norm_crop,
    umeyama,
    warp_affine,
)
from veilface.client.face.insightface_models import find_insightface_pack
from veilface.client.face.scrfd import letterbox, nms, resize_bilinear
from veilface.errors import FailedPrecondition

STRIDES = (8, 16, 32)
#: Box distances (left, top, right, bottom) from the anchor, in canvas px.
BOX_DIST = np.array([64.0, 64.0, 96.0, 96.0])
#: Landmark offsets from the anchor, in canvas px: eyes, nose, mouth corners.
KPS_OFF = np.array([[-16, -24], [48, -24], [16, 8], [-8, 40], [40, 40]], dtype=np.float64)
EMB_DIM = 512
PROJECTION = np.random.default_rng(5).normal(size=(3 * 14 * 14, EMB_DIM)).astype(np.float32)

# --- tiny ONNX models -------------------------------------------------------


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def build_detector(
    path: Path, *, batched: bool = False, with_kps: bool = True, wrong_stride: bool = False
) -> None:
    """SCRFD-shaped detector: outputs scores x3, boxes x3, (landmarks x3)."""
    nodes, inits = [], []
    inits += [
        _const("starts", np.array([0], np.int64)),
        _const("ends", np.array([1], np.int64)),
        _const("axes", np.array([1], np.int64)),
        _const("thr", np.array(0.8, np.float32)),
        _const("gain", np.array(20.0, np.float32)),
        _const("zero", np.array(0.0, np.float32)),
        _const("one", np.array(1.0, np.float32)),
    ]
    nodes.append(helper.make_node("Slice", ["input.1", "starts", "ends", "axes"], ["red"]))
    lead = [1] if batched else []
    scores, boxes, kpss = [], [], []
    for s in STRIDES:
        pool = 16 if (wrong_stride and s == 32) else s
        inits += [
            _const(f"bias{s}", np.array(0.0 if s == 32 else -1000.0, np.float32)),
            _const(f"shape1_{s}", np.array([*lead, -1, 1], np.int64)),
            _const(f"shape4_{s}", np.array([*lead, -1, 4], np.int64)),
            _const(f"shape10_{s}", np.array([*lead, -1, 10], np.int64)),
            _const(f"box{s}", np.tile(BOX_DIST / s, 2).reshape(1, 8, 1, 1).astype(np.float32)),
            _const(
                f"kps{s}",
                np.tile(KPS_OFF.reshape(-1) / s, 2).reshape(1, 20, 1, 1).astype(np.float32),
            ),
        ]
        nodes += [
            helper.make_node(
                "AveragePool", ["red"], [f"p{s}"], kernel_shape=[pool, pool], strides=[pool, pool]
            ),
            helper.make_node("Sub", [f"p{s}", "thr"], [f"a{s}"]),
            helper.make_node("Mul", [f"a{s}", "gain"], [f"b{s}"]),
            helper.make_node("Add", [f"b{s}", f"bias{s}"], [f"c{s}"]),
            helper.make_node("Sigmoid", [f"c{s}"], [f"sig{s}"]),
            helper.make_node("Concat", [f"sig{s}", f"sig{s}"], [f"s2{s}"], axis=1),
            helper.make_node("Transpose", [f"s2{s}"], [f"st{s}"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"st{s}", f"shape1_{s}"], [f"score{s}"]),
            helper.make_node("Mul", [f"p{s}", "zero"], [f"z{s}"]),
            helper.make_node("Add", [f"z{s}", "one"], [f"ones{s}"]),
            helper.make_node("Mul", [f"ones{s}", f"box{s}"], [f"bm{s}"]),
            helper.make_node("Transpose", [f"bm{s}"], [f"bt{s}"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"bt{s}", f"shape4_{s}"], [f"bbox{s}"]),
            helper.make_node("Mul", [f"ones{s}", f"kps{s}"], [f"km{s}"]),
            helper.make_node("Transpose", [f"km{s}"], [f"kt{s}"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"kt{s}", f"shape10_{s}"], [f"kps_out{s}"]),
        ]
        dims: list[object] = [*lead, None]
        scores.append(helper.make_tensor_value_info(f"score{s}", TensorProto.FLOAT, [*dims, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox{s}", TensorProto.FLOAT, [*dims, 4]))
        kpss.append(helper.make_tensor_value_info(f"kps_out{s}", TensorProto.FLOAT, [*dims, 10]))
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    outputs = scores + boxes + (kpss if with_kps else [])
    graph = helper.make_graph(nodes, "tiny_scrfd", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_recognizer(path: Path, *, mxnet_style: bool = False) -> None:
    """ArcFace-shaped recogniser: (N, 3, 112, 112) -> (N, 512)."""
    nodes, inits = [], [_const("proj", PROJECTION)]
    src = "input.1"
    if mxnet_style:  # MXNet conversions normalise inside the graph
        inits += [
            _const("mean", np.array(127.5, np.float32)),
            _const("scale", np.array(0.0078125, np.float32)),
        ]
        nodes += [
            helper.make_node("Sub", [src, "mean"], ["centred"], name="Sub_0"),
            helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="Mul_1"),
        ]
        src = "scaled"
    nodes += [
        helper.make_node("AveragePool", [src], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["683"]),
    ]
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    y = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", EMB_DIM])
    graph = helper.make_graph(nodes, "tiny_arcface", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_landmark(path: Path) -> None:
    """A 2d106det-shaped model (192x192 input), which the backend must skip."""
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 192, 192])
    y = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3, 1, 1])
    node = helper.make_node("GlobalAveragePool", ["data"], ["fc1"])
    model = helper.make_model(
        helper.make_graph([node], "lmk", [x], [y]), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))


def make_pack(root: Path, name: str = "buffalo_l", **det_kw: bool) -> Path:
    pack = root / "models" / name
    pack.mkdir(parents=True)
    build_landmark(pack / "2d106det.onnx")
    build_detector(pack / "det_10g.onnx", **det_kw)
    build_recognizer(pack / "w600k_r50.onnx")
    return pack


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("insightface")
    make_pack(base)
    return base


@pytest.fixture(scope="module")
def backend(root: Path) -> InsightFaceBackend:
    b = InsightFaceBackend(root, threads=1)
    b.load()
    return b


# --- synthetic photos ---------------------------------------------------------

TEXTURE = np.random.default_rng(11).integers(0, 256, (400, 500, 2), dtype=np.uint8)


def scene(
    size: tuple[int, int] = (320, 160),
    squares: tuple[tuple[int, int], ...] = ((112, 48),),
    side: int = 16,
    shift: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """``(H, W, 3)`` photo: textured green/blue, red only in ``side`` px squares at ``(x, y)``.

    ``shift`` moves the texture along with the squares.
    """
    w, h = size
    dx, dy = shift
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :, 1:] = TEXTURE[40 - dy : 40 - dy + h, 40 - dx : 40 - dx + w]
    for x, y in squares:
        img[y + dy : y + dy + side, x + dx : x + dx + side, 0] = 255
    return img


def expected_face(square: tuple[int, int], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Box ``(x1, y1, x2, y2)`` and landmarks the tiny detector gives for a square at ``square``."""
    anchor = np.array(square, np.float64) * scale  # the square fills one stride-32 cell
    box = np.concatenate([anchor - BOX_DIST[:2], anchor + BOX_DIST[2:]]) / scale
    return box, (anchor + KPS_OFF) / scale


def reference_embedding(crop: np.ndarray) -> np.ndarray:
    x = (crop.astype(np.float32) - 127.5) / 127.5
    pooled = x.reshape(14, 8, 14, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1).reshape(-1)
    v = pooled @ PROJECTION
    return v / np.linalg.norm(v)


# --- detection ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "square"),
    [((320, 160), (112, 48)), ((160, 320), (48, 112)), ((320, 320), (64, 144))],
)
def test_planted_face_is_found_where_it_is(
    backend: InsightFaceBackend, size: tuple[int, int], square: tuple[int, int]
) -> None:
    img = scene(size, (square,))
    _, scale = letterbox(img, (640, 640))
    assert scale == 640 / max(size)
    found = backend.detect_faces(img)
    assert len(found) == 1  # two anchors per cell: NMS keeps one
    box, kps = expected_face(square, scale)
    np.testing.assert_allclose(found.boxes[0], box, atol=1e-3)
    np.testing.assert_allclose(found.landmarks[0], kps, atol=1e-3)
    assert 0.5 < found.scores[0] < 1.0
    faces = backend.detect(img)
    assert [(f.left, f.top, f.right, f.bottom) for f in faces] == [tuple(np.round(box).astype(int))]
    assert faces[0].landmarks is not None
    np.testing.assert_allclose(faces[0].landmarks, kps, atol=1e-3)


def test_channel_order_and_nothing_to_find(backend: InsightFaceBackend) -> None:
    img = scene()
    assert len(backend.detect(img)) == 1
    bgr = np.ascontiguousarray(img[:, :, ::-1])  # red square becomes blue: no face for SCRFD
    assert backend.detect(bgr) == []
    assert backend.detect(np.zeros((100, 100, 3), np.uint8)) == []


def test_nms_merges_overlaps_and_keeps_separate_faces(backend: InsightFaceBackend) -> None:
    # a 32 px square lights two neighbouring cells: overlapping boxes, one face
    wide = scene((320, 320), ((96, 64),), side=32)
    assert len(backend.detect(wide)) == 1
    two = scene((320, 320), ((16, 16), (176, 208)))
    faces = backend.detect(two)
    assert len(faces) == 2
    assert {(f.left, f.top) for f in faces} == {(16 - 32, 16 - 32), (176 - 32, 208 - 32)}


def test_non_integer_letterbox_scale(backend: InsightFaceBackend) -> None:
    img = scene((300, 200), ((120, 60),), side=40)  # scale 640/300
    faces = backend.detect(img)
    assert len(faces) == 1
    f = faces[0]
    assert f.left < 140 < f.right and f.top < 80 < f.bottom
    assert f.landmarks is not None
    # landmarks keep their offsets from the box, divided by the scale
    offs = np.array(f.landmarks) - np.array([f.left, f.top])
    np.testing.assert_allclose(offs, (KPS_OFF + BOX_DIST[:2]) * 300 / 640, atol=0.6)


def test_batched_outputs(tmp_path: Path) -> None:
    make_pack(tmp_path, batched=True)
    b = InsightFaceBackend(tmp_path, threads=1)
    found = b.detect_faces(scene())
    assert len(found) == 1
    np.testing.assert_allclose(found.boxes[0], expected_face((112, 48), 2.0)[0], atol=1e-3)


def test_resize_matches_opencv_inter_linear() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(6)
    for h, w, nh, nw in [(480, 1280, 240, 640), (160, 320, 320, 640), (333, 517, 411, 640)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = resize_bilinear(img, nw, nh).astype(int)
        assert np.abs(ours - cv2.resize(img, (nw, nh))).max() <= 1


def test_nms_function() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    assert nms(boxes, np.array([0.9, 0.95, 0.5], np.float32), 0.4) == [1, 2]
    assert nms(boxes, np.array([0.9, 0.95, 0.5], np.float32), 0.9) == [1, 0, 2]


# --- alignment and embedding ----------------------------------------------------


def test_umeyama_recovers_a_similarity() -> None:
    th, s, t = 0.4, 1.7, np.array([12.0, -5.0])
    rot = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    src = np.random.default_rng(0).normal(size=(5, 2)) * 30
    m = umeyama(src, src @ rot.T + t)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)
    with pytest.raises(ValueError, match="coincide"):
        umeyama(np.ones((5, 2)), ARCFACE_DST)


def test_warp_uses_pixel_centres_like_opencv() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
    shifted = warp_affine(img, np.array([[1.0, 0, -5], [0, 1.0, -7]]), 40)
    np.testing.assert_array_equal(shifted, img[7:47, 5:45])
    halved = warp_affine(img, np.array([[0.5, 0, 0], [0, 0.5, 0]]), 25)
    np.testing.assert_array_equal(halved, img[0:50:2, 0:50:2])


def test_warp_matches_opencv_inside_the_image() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (200, 180, 3), dtype=np.uint8)
    th = 0.3
    lm = (ARCFACE_DST * 1.3) @ np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]).T
    lm = lm + [40, 30]
    m = estimate_norm(lm)
    ours = norm_crop(img, lm).astype(int)
    theirs = cv2.warpAffine(img, m, (112, 112), borderValue=0.0).astype(int)
    inv = cv2.invertAffineTransform(m)
    ys, xs = np.mgrid[:112, :112]
    src = np.stack([xs, ys, np.ones_like(xs)], -1) @ inv.T
    inside = (src[..., 0] >= 0) & (src[..., 0] <= 178) & (src[..., 1] >= 0) & (src[..., 1] <= 198)
    assert inside.mean() > 0.9
    assert np.abs(ours - theirs)[inside].max() <= 1


def test_alignment_puts_landmarks_on_the_template() -> None:
    th, s = -0.25, 1.6
    rot = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    lm = ARCFACE_DST @ rot.T + [50, 40]
    ys, xs = np.mgrid[:240, :240]
    for (x, y), (tx, ty) in zip(lm, ARCFACE_DST, strict=True):
        # one soft dot at this landmark; it must land on the template point
        dot = 250 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 3.0**2))
        img = np.repeat(dot[:, :, None], 3, axis=2).astype(np.uint8)
        crop = norm_crop(img, lm)[:, :, 0].astype(np.float64)
        cy, cx = (np.argwhere(crop >= 0) * crop.reshape(-1, 1)).sum(axis=0) / crop.sum()
        assert abs(cx - tx) < 0.3 and abs(cy - ty) < 0.3, (cx, cy, tx, ty)


def test_embedding_is_the_model_output_on_the_aligned_crop(backend: InsightFaceBackend) -> None:
    img = scene()
    (face,) = backend.detect(img)
    vec = backend.align_and_embed(img, face)
    assert vec.dtype == np.float32 and vec.shape == (EMB_DIM,)
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    crop = norm_crop(img, face.landmarks)
    np.testing.assert_allclose(vec, reference_embedding(crop), atol=1e-4)
    assert backend.embedding_dim == EMB_DIM


def test_same_face_moved_gives_the_same_embedding(backend: InsightFaceBackend) -> None:
    # the face and the texture around it move by 16 px (one stride-32 cell on the canvas)
    here = scene((320, 240), ((112, 80),))
    there = scene((320, 240), ((112, 80),), shift=(16, 16))
    a, b = backend.detect(here)[0], backend.detect(there)[0]
    assert (b.left - a.left, b.top - a.top) == (16, 16)
    va, vb = backend.align_and_embed(here, a), backend.align_and_embed(there, b)
    assert float(va @ vb) > 0.9999
    other = here.copy()
    other[:, :, 1] = 255 - other[:, :, 1]  # a different face texture
    vo = backend.align_and_embed(other, backend.detect(other)[0])
    assert float(va @ vo) < 0.99


def test_box_without_landmarks_is_matched_to_a_detection(backend: InsightFaceBackend) -> None:
    img = scene()
    (face,) = backend.detect(img)
    bare = FaceBox(face.left + 3, face.top - 2, face.right, face.bottom)
    np.testing.assert_allclose(
        backend.align_and_embed(img, bare), backend.align_and_embed(img, face), atol=1e-6
    )
    with pytest.raises(NoFaceFound, match="no face in the given box"):
        backend.align_and_embed(img, FaceBox(240, 100, 300, 160))


def test_mxnet_style_model_is_fed_raw_pixels(tmp_path: Path) -> None:
    pack = make_pack(tmp_path)
    build_recognizer(pack / "w600k_r50.onnx", mxnet_style=True)
    b = InsightFaceBackend(tmp_path, threads=1)
    img = scene()
    (face,) = b.detect(img)
    # the graph normalises with (x - 127.5) / 128 itself; the backend must not do it again
    crop = norm_crop(img, face.landmarks)
    x = (crop.astype(np.float32) - 127.5) / 128.0
    ref = x.reshape(14, 8, 14, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1).reshape(-1) @ PROJECTION
    np.testing.assert_allclose(b.align_and_embed(img, face), ref / np.linalg.norm(ref), atol=1e-4)


# --- through the pipeline and its quality gate -----------------------------------


def test_pipeline_with_the_insightface_backend(root: Path, backend: InsightFaceBackend) -> None:
    assert isinstance(backend, FaceBackend)
    pipe = FacePipeline(backend, liveness=None)
    emb = pipe.embed(scene())
    assert emb.backend == "insightface:buffalo_l"
    assert emb.vector.shape == (EMB_DIM,)
    assert (emb.box.left, emb.box.top, emb.box.right, emb.box.bottom) == (80, 16, 160, 96)
    by_name = FacePipeline("insightface", model_dir=root, liveness=None)
    np.testing.assert_allclose(by_name.embed(scene()).vector, emb.vector, atol=1e-6)
    # grey and RGBA inputs go through load_image first
    rgba = np.dstack([scene(), np.full((160, 320), 255, np.uint8)])
    np.testing.assert_allclose(pipe.embed(rgba).vector, emb.vector, atol=1e-6)


def test_quality_gate_with_the_insightface_backend(backend: InsightFaceBackend) -> None:
    pipe = FacePipeline(backend, liveness=None)
    with pytest.raises(NoFaceFound):
        pipe.embed(np.full((160, 320, 3), 90, np.uint8))
    two = scene((320, 320), ((16, 16), (176, 208)))
    with pytest.raises(MultipleFaces, match="2 faces"):
        pipe.embed(two)
    chosen = FacePipeline(backend, on_multiple="largest", liveness=None).embed(two)
    assert (chosen.box.left, chosen.box.top) == (-16, -16)  # equal sizes: topmost first
    with pytest.raises(FaceTooSmall, match="minimum of 100 px"):
        FacePipeline(backend, min_face_px=100, liveness=None).embed(scene())


# --- model directories and broken models ------------------------------------------


def test_model_directory_layouts(root: Path, tmp_path: Path) -> None:
    pack = root / "models" / "buffalo_l"
    assert find_insightface_pack(root) == pack
    assert find_insightface_pack(root / "models") == pack
    assert find_insightface_pack(pack) == pack
    assert find_insightface_pack(root, "buffalo_l") == pack
    with pytest.raises(FaceModelsNotFound, match="antelopev2.*packs present: buffalo_l"):
        find_insightface_pack(root, "antelopev2")
    two = tmp_path / "two"
    for name in ("antelopev2", "buffalo_s"):
        shutil.copytree(pack, two / "models" / name)
    with pytest.raises(FaceModelsNotFound, match="several.*pack=<name>"):
        InsightFaceBackend(two)
    assert InsightFaceBackend(two, pack="buffalo_s").name == "insightface:buffalo_s"


def test_missing_directories_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FaceModelsNotFound, match="does not exist.*never downloaded"):
        InsightFaceBackend(tmp_path / "absent")
    with pytest.raises(FaceModelsNotFound, match="no insightface model pack.*det_10g"):
        InsightFaceBackend(tmp_path)
    with pytest.raises(FaceModelsNotFound, match="needs model_dir"):
        FacePipeline("insightface")
    with pytest.raises(ValueError, match="upsample"):
        FacePipeline("insightface", model_dir=tmp_path, upsample=2)


def test_pack_without_recogniser(tmp_path: Path) -> None:
    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    build_detector(pack / "det_10g.onnx")
    build_landmark(pack / "2d106det.onnx")
    b = InsightFaceBackend(tmp_path)
    with pytest.raises(FaceModelsNotFound, match="no ArcFace recogniser") as info:
        FacePipeline(b, liveness=None).embed(scene())
    assert "det_10g.onnx: detection" in str(info.value)
    assert "2d106det.onnx: landmark" in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_model_file(tmp_path: Path, damage: str) -> None:
    pack = make_pack(tmp_path)
    target = pack / "w600k_r50.onnx"
    data = target.read_bytes()
    bad = {
        "garbage": np.random.default_rng(3).integers(0, 256, 5000, np.uint8).tobytes(),
        "truncated": data[: len(data) // 2],
        "empty": b"",
    }[damage]
    target.write_bytes(bad)
    with pytest.raises(FaceModelInvalid, match=r"w600k_r50\.onnx.*corrupt") as info:
        FacePipeline(InsightFaceBackend(tmp_path), liveness=None).embed(scene())
    assert isinstance(info.value, FailedPrecondition)


def test_detector_without_landmarks(tmp_path: Path) -> None:
    make_pack(tmp_path, with_kps=False)
    with pytest.raises(FaceModelInvalid, match="without landmark"):
        InsightFaceBackend(tmp_path).load()


def test_detector_with_wrong_output_sizes(tmp_path: Path) -> None:
    make_pack(tmp_path, wrong_stride=True)
    with pytest.raises(FaceModelInvalid, match="stride-32 score output"):
        InsightFaceBackend(tmp_path).detect(scene())


def test_backend_arguments(root: Path) -> None:
    with pytest.raises(ValueError, match="det_size"):
        InsightFaceBackend(root, det_size=(600, 640))
    with pytest.raises(ValueError, match="det_size"):
        InsightFaceBackend(root, det_size=(64_000, 64_000))
    with pytest.raises(ValueError, match="det_thresh"):
        InsightFaceBackend(root, det_thresh=1.5)
    with pytest.raises(ValueError, match="pack"):
        InsightFaceBackend(root, pack="../x")


# --- bad input through the pipeline with this backend ------------------------------


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_bad_inputs_through_the_pipeline(backend: InsightFaceBackend, tmp_path: Path) -> None:
    from veilface.client.face import ImageDecodeError, ImageNotFound, ImageSizeError

    pipe = FacePipeline(backend, liveness=None)
    good = _png(scene())
    with pytest.raises(ImageDecodeError, match="truncated"):
        pipe.embed(good[: len(good) // 2])
    with pytest.raises(ImageDecodeError, match="supported image format"):
        pipe.embed(b"%PDF-1.4 not a photo")
    with pytest.raises(ImageSizeError):
        pipe.embed(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ImageNotFound):
        pipe.embed(tmp_path / "absent.png")
    # extreme aspect ratios still letterbox (to a 640 x 2 canvas strip) without error
    with pytest.raises(NoFaceFound):
        pipe.embed(np.zeros((32, 8000, 3), np.uint8))
    # 16-bit and grey+alpha versions of the photo are converted, then found
    sixteen = scene().astype(np.uint16) * 257
    assert pipe.embed(sixteen).box == pipe.embed(good).box
    grey = scene()[:, :, 0]  # the red channel as grey: the square stays bright
    grey_alpha = np.dstack([grey, np.full_like(grey, 255)])
    assert pipe.embed(_png(grey_alpha)).box == pipe.embed(good).box
