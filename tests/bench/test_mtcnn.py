"""Our MTCNN (``veilface.bench.mtcnn``) on facenet-pytorch's weights: faces found, none invented.

The tests that run the detector need the weights (``python -m pip install
--no-deps facenet-pytorch==2.6.0``, which CI does) and skip with that
command as the reason otherwise; the error-path tests need nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from veilface.bench.mtcnn import INSTALL_HINT, MTCNN, find_mtcnn_weights, nms
from veilface.bench.protect_judges import iou
from veilface.client.face.errors import FaceModelInvalid, FaceModelsNotFound
from veilface.errors import VeilfaceError

#: People with a single, frontal face in their first LFW photo.
PEOPLE = ("Tony_Blair", "Serena_Williams", "George_W_Bush", "Gerhard_Schroeder")


@pytest.fixture(scope="module")
def mtcnn() -> MTCNN:
    try:
        find_mtcnn_weights()
    except FaceModelsNotFound:
        pytest.skip(f"MTCNN weights not installed: {INSTALL_HINT}")
    detector = MTCNN()
    detector.load()
    return detector


def test_weights_are_located_without_importing_facenet_pytorch(mtcnn: MTCNN) -> None:
    paths = find_mtcnn_weights()
    assert [p.name for p in (paths.pnet, paths.rnet, paths.onet)] == ["pnet.pt", "rnet.pt", "onet.pt"]
    assert "facenet_pytorch" not in sys.modules  # its __init__ imports torchvision


@pytest.mark.data
def test_finds_the_one_face_of_lfw_photos_where_dlib_does(mtcnn: MTCNN, data_dir: Path) -> None:
    from veilface.client.face import load_image
    from veilface.client.face.dlib_backend import DlibBackend

    dlib = DlibBackend()
    lfw = data_dir / "lfw"
    for person in PEOPLE:
        photo = lfw / person / f"{person}_0001.jpg"
        if not photo.is_file():
            pytest.skip(f"{photo} not found")
        rgb = load_image(photo)
        faces = mtcnn.detect(rgb)
        (ref,) = dlib.detect(rgb)
        assert len(faces) == 1, (person, faces)
        face = faces[0]
        assert face.score > 0.9
        assert iou(face.to_face_box(), ref) > 0.5, (person, face, ref)
        # the eyes are above the nose, the nose above the mouth, all inside the box
        (lx, ly), (rx, ry), (_, ny), (_, my1), (_, my2) = face.landmarks
        assert lx < rx and max(ly, ry) < ny < min(my1, my2)
        assert all(face.left <= x <= face.right and face.top <= y <= face.bottom
                   for x, y in face.landmarks)


def test_finds_no_face_in_blank_or_noise(mtcnn: MTCNN) -> None:
    rng = np.random.default_rng(0)
    assert mtcnn.detect(np.full((250, 250, 3), 128, dtype=np.uint8)) == []
    assert mtcnn.detect(rng.integers(0, 256, (250, 250, 3), dtype=np.uint8)) == []
    assert mtcnn.detect(np.zeros((15, 15, 3), dtype=np.uint8)) == []  # smaller than a face


def test_missing_weights_name_the_install_command(tmp_path: Path) -> None:
    (tmp_path / "pnet.pt").write_bytes(b"")
    with pytest.raises(FaceModelsNotFound) as err:
        MTCNN(tmp_path).load()
    assert "rnet.pt" in str(err.value) and INSTALL_HINT in str(err.value)
    assert isinstance(err.value, VeilfaceError)


def test_corrupt_weights_are_a_clear_error(tmp_path: Path) -> None:
    for name in ("pnet.pt", "rnet.pt", "onet.pt"):
        (tmp_path / name).write_bytes(b"not a torch file")
    with pytest.raises(FaceModelInvalid, match="pnet.pt cannot be loaded"):
        MTCNN(tmp_path).load()
    detector = MTCNN(tmp_path)
    with pytest.raises(FaceModelInvalid):
        detector.detect(np.zeros((64, 64, 3), dtype=np.uint8))


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="min_face"):
        MTCNN(min_face=8)
    with pytest.raises(ValueError, match="factor"):
        MTCNN(factor=1.0)
    with pytest.raises(ValueError, match="thresholds"):
        MTCNN(thresholds=(0.6, 0.7, 1.5))


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 6, 6]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]  # box 0 overlaps box 1 (IoU 0.68)
    assert nms(boxes, scores, 0.5, "min").tolist() == [1, 2]  # box 3 lies inside box 1
    assert nms(np.empty((0, 4)), np.empty(0), 0.5).size == 0
