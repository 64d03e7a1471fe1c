"""Which faces a protector must protect, and the check that caller boxes cover them.

Both protectors (:func:`~veilface.client.protect.deidentify` and
:func:`~veilface.client.protect.cloak`) run :func:`detect_for_protection`
on every image, whether or not the caller gave face boxes:

- the faces are found by **two** dlib detectors, the face pipeline's HOG
  detector (``dlib.get_frontal_face_detector``, upsample 1) and dlib's CNN
  detector (MMOD, ``mmod_human_face_detector.dat`` from the
  ``face_recognition_models`` package, upsample 0, about 0.3 s per
  250 x 250 photo on this project's 2-core machine), plus the caller's own
  ``pipeline`` when one is given. A recognizer that attacks a photo runs a
  CNN detector, so the protector must protect what such a detector finds,
  not only what HOG finds;
- detections of the same face (intersection at least
  :data:`SAME_FACE_OVERLAP` of the smaller box) are one face, represented
  by the box of the first detector that found it (the given pipeline, then
  HOG, then the CNN: the protectors keep the geometry their surrogates were
  trained on); faces only the CNN finds are added.

With ``faces="detect"`` those faces are what is protected. With caller boxes
(:func:`check_caller_boxes`), every box must have at least
:data:`MIN_BOX_SIDE` pixels a side inside the image, and every detected
face must be covered (:func:`require_covered`): at least :data:`MIN_COVERED`
of the area of one of its detections (one detector's box) must lie inside
the union of the regions the protector will change for those boxes (the
boxes grown by :func:`deidentify`'s margin, or :func:`cloak`'s crop
squares). Regions rather than raw boxes, and any detector's box rather than
all, because detectors draw different boxes around the same face: on the
81 faces both dlib detectors find in 80 LFW photos, the CNN box holds a
median 77 % (5th percentile 65 %) of the HOG box, whereas the regions a HOG
or a CNN box leads to (``deidentify`` at ``"low"``, ``cloak``) hold at least
75 % of the other detector's box and all of their own. If no detector finds a
face, caller boxes are accepted as given: the caller knows where the face
is.

This is a guard against mistakes (a wrong or placeholder box, a box in the
wrong image's coordinates), not against a caller set on bypassing it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from veilface.client.face.backend import FaceBox
from veilface.client.face.errors import FaceModelsNotFound, NoFaceFound
from veilface.client.face.models import default_model_dir
from veilface.client.face.pipeline import FacePipeline
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

#: Smallest side, in pixels inside the image, of a face box a caller may give.
MIN_BOX_SIDE: Final = 16
#: Share of a detected face's area that must lie inside the protected regions.
MIN_COVERED: Final = 0.8
#: Two detections are one face when their intersection is at least this share of the smaller.
SAME_FACE_OVERLAP: Final = 0.5
#: dlib's CNN face detector, shipped in ``face_recognition_models``.
CNN_MODEL_FILE: Final = "mmod_human_face_detector.dat"
#: Most pixels the CNN detector scans; larger photos are shrunk for it (about 5 s at the cap).
MAX_CNN_PIXELS: Final = 1_000_000

HOG: Final = "dlib HOG"
CNN: Final = "dlib CNN (MMOD)"
PIPELINE: Final = "the given pipeline"


class FaceBoxTooSmall(InvalidArgument):
    """A caller's face box is too small (or too little of it lies inside the image)."""


class UncoveredFace(InvalidArgument):
    """A face the detectors found lies (mostly) outside the regions the caller's boxes protect."""


@dataclass(frozen=True)
class Detection:
    """One detector's box around one face."""

    box: FaceBox
    detector: str


@dataclass(frozen=True)
class DetectedFace:
    """One face and every detector's box around it.

    Attributes
    ----------
    box
        The box of the first detector that found the face (the given
        pipeline, then HOG, then the CNN): what ``faces="detect"`` protects.
    detections
        Each detector's own box around this face (``box``'s included).
    """

    box: FaceBox
    detections: tuple[Detection, ...]


_local = threading.local()


def default_pipeline() -> FacePipeline:
    """The shared dlib pipeline of this thread (dlib objects are not thread-safe)."""
    pipe: FacePipeline | None = getattr(_local, "pipeline", None)
    if pipe is None:
        pipe = FacePipeline()
        _local.pipeline = pipe
    return pipe


def cnn_model_path() -> Path:
    """Path of :data:`CNN_MODEL_FILE` in the installed ``face_recognition_models`` package.

    Raises
    ------
    FaceModelsNotFound
        The package or the file is missing.
    """
    path: Path = default_model_dir() / CNN_MODEL_FILE
    if not path.is_file():
        raise FaceModelsNotFound(
            f"dlib's CNN face detector {CNN_MODEL_FILE} is missing from {path.parent}; "
            "reinstall face_recognition_models (pip install 'veilface[client]')"
        )
    return path


def _cnn_detector() -> Any:
    detector = getattr(_local, "cnn", None)
    if detector is None:
        path = cnn_model_path()
        try:
            import dlib
        except ImportError as exc:
            raise FaceModelsNotFound(
                "face detection for protection needs the 'dlib' module: pip install dlib-bin "
                "(or: pip install 'veilface[client]')"
            ) from exc
        detector = dlib.cnn_face_detection_model_v1(str(path))
        _local.cnn = detector
    return detector


def detect_cnn(rgb: npt.NDArray[np.uint8]) -> list[FaceBox]:
    """Faces found by dlib's CNN detector (upsample 0: faces from about 80 px).

    Photos above :data:`MAX_CNN_PIXELS` are scanned shrunk (bilinear) and the
    boxes scaled back, so the time stays bounded; faces under about 80 px in
    the shrunk copy are then missed by this detector.
    """
    height, width = rgb.shape[:2]
    factor = min(1.0, math.sqrt(MAX_CNN_PIXELS / (height * width)))
    img = rgb
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        img = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    found = _cnn_detector()(np.ascontiguousarray(img), 0)
    return [
        FaceBox(
            left=round(d.rect.left() / factor),
            top=round(d.rect.top() / factor),
            right=round((d.rect.right() + 1) / factor),  # dlib rectangles are inclusive
            bottom=round((d.rect.bottom() + 1) / factor),
            score=float(d.confidence),
        )
        for d in found
    ]


def _overlap(a: FaceBox, b: FaceBox) -> float:
    """Intersection of ``a`` and ``b`` as a share of the smaller one's area."""
    w = min(a.right, b.right) - max(a.left, b.left)
    h = min(a.bottom, b.bottom) - max(a.top, b.top)
    smaller = min(a.area, b.area)
    return 0.0 if w <= 0 or h <= 0 or smaller == 0 else w * h / smaller


def detect_for_protection(
    rgb: npt.NDArray[np.uint8], pipeline: FacePipeline | None = None
) -> list[DetectedFace]:
    """Every face dlib's HOG and CNN detectors (and ``pipeline``, if given) find in ``rgb``.

    Detections whose intersection is at least :data:`SAME_FACE_OVERLAP` of
    the smaller box (after clipping to the image) are one face.
    """
    height, width = rgb.shape[:2]
    hog = default_pipeline()
    detections = [Detection(b, HOG) for b in hog.detect(rgb)]
    if pipeline is not None and pipeline is not hog:
        detections = [Detection(b, PIPELINE) for b in pipeline.detect(rgb)] + detections
    detections += [Detection(b, CNN) for b in detect_cnn(rgb)]
    groups: list[list[Detection]] = []
    for det in detections:
        box = det.box.clipped(width, height)
        if box.area == 0:
            continue
        group = next(
            (
                g
                for g in groups
                if any(_overlap(box, o.box.clipped(width, height)) >= SAME_FACE_OVERLAP for o in g)
            ),
            None,
        )
        if group is None:
            groups.append([det])
        else:
            group.append(det)
    faces = [DetectedFace(box=g[0].box, detections=tuple(g)) for g in groups]
    logger.debug("protection detectors: %d detection(s), %d face(s)", len(detections), len(faces))
    return faces


def check_caller_boxes(faces: object, *, width: int, height: int) -> list[FaceBox]:
    """The caller's face boxes, checked: ``FaceBox`` objects, not empty, big enough.

    Raises
    ------
    InvalidArgument
        ``faces`` is not a non-empty sequence of ``FaceBox``, or a box lies
        outside the image.
    FaceBoxTooSmall
        A box has less than :data:`MIN_BOX_SIDE` pixels a side inside the image.
    """
    if isinstance(faces, (str, bytes, bytearray)) or not isinstance(faces, Sequence):
        raise InvalidArgument(
            f"faces must be 'detect' or a list of FaceBox, not {type(faces).__name__}"
        )
    if len(faces) == 0:
        raise InvalidArgument(
            "faces is empty: there is nothing to protect; pass faces='detect' or the face boxes"
        )
    boxes: list[FaceBox] = []
    for box in faces:
        if not isinstance(box, FaceBox):
            raise InvalidArgument(
                f"faces must hold FaceBox objects, not {type(box).__name__} "
                "(from veilface.client.face import FaceBox)"
            )
        inside = box.clipped(width, height)
        if inside.area == 0:
            raise InvalidArgument(
                f"face box ({box.left}, {box.top}, {box.right}, {box.bottom}) does not overlap "
                f"the {width}x{height} image"
            )
        if min(inside.width, inside.height) < MIN_BOX_SIDE:
            raise FaceBoxTooSmall(
                f"face box ({box.left}, {box.top}, {box.right}, {box.bottom}) is "
                f"{inside.width}x{inside.height} px inside the {width}x{height} image; a face "
                f"box must be at least {MIN_BOX_SIDE} px a side: give the box around the whole "
                "face, or faces='detect'"
            )
        boxes.append(box)
    return boxes


def covered_share(face: FaceBox, regions: Sequence[FaceBox]) -> float:
    """Share of ``face``'s area inside the union of ``regions`` (0 for an empty face)."""
    if face.area == 0:
        return 0.0
    inside = np.zeros((face.height, face.width), dtype=bool)
    for r in regions:
        left, right = max(r.left, face.left), min(r.right, face.right)
        top, bottom = max(r.top, face.top), min(r.bottom, face.bottom)
        if left < right and top < bottom:
            inside[top - face.top : bottom - face.top, left - face.left : right - face.left] = True
    return float(inside.mean())


def require_covered(
    detected: Sequence[DetectedFace], regions: Sequence[FaceBox], *, width: int, height: int
) -> None:
    """Refuse unless every detected face is covered by ``regions``.

    A face is covered when at least :data:`MIN_COVERED` of the area of one of
    its detections (any detector's box, clipped to the image) lies inside the
    union of ``regions``.

    Raises
    ------
    UncoveredFace
        Names the first uncovered face, the detectors that found it, its box
        and how much of it the regions cover.
    """
    for face in detected:
        shares = [covered_share(d.box.clipped(width, height), regions) for d in face.detections]
        best = max(shares)
        if best < MIN_COVERED:
            logger.warning("refused face boxes that leave a detected face unprotected")
            b = face.box
            names = " and ".join(dict.fromkeys(d.detector for d in face.detections))
            raise UncoveredFace(
                f"the face {names} found at ({b.left}, {b.top}, {b.right}, {b.bottom}) is only "
                f"{best:.0%} inside the regions your face boxes protect (at least "
                f"{MIN_COVERED:.0%} must be): it would leave the device unprotected; pass "
                "faces='detect', or boxes around every face in the image"
            )


def faces_to_protect(
    rgb: npt.NDArray[np.uint8],
    faces: object,
    pipeline: FacePipeline | None,
    *,
    region: Callable[[FaceBox], FaceBox],
    no_face: str,
) -> list[FaceBox]:
    """The boxes a protector protects: detected faces, or checked and covering caller boxes.

    Parameters
    ----------
    rgb
        The loaded image.
    faces
        ``"detect"`` or the caller's boxes.
    pipeline
        An extra detector (the protector's ``pipeline`` argument), or ``None``.
    region
        The region (clipped to the image) the protector changes for a box.
    no_face
        Message of :class:`NoFaceFound` when ``faces="detect"`` finds nothing.

    Raises
    ------
    NoFaceFound, InvalidArgument, FaceBoxTooSmall, UncoveredFace
        See :func:`check_caller_boxes` and :func:`require_covered`.
    """
    height, width = rgb.shape[:2]
    if isinstance(faces, str):
        if faces != "detect":
            raise InvalidArgument(f"faces must be 'detect' or a list of FaceBox, got {faces!r}")
        found = detect_for_protection(rgb, pipeline)
        if not found:
            raise NoFaceFound(no_face)
        boxes = [f.box for f in found]
    else:
        boxes = check_caller_boxes(faces, width=width, height=height)
        found = detect_for_protection(rgb, pipeline)
    require_covered(found, [region(b) for b in boxes], width=width, height=height)
    return boxes


__all__ = [
    "CNN_MODEL_FILE",
    "MAX_CNN_PIXELS",
    "MIN_BOX_SIDE",
    "MIN_COVERED",
    "SAME_FACE_OVERLAP",
    "DetectedFace",
    "Detection",
    "FaceBoxTooSmall",
    "UncoveredFace",
    "check_caller_boxes",
    "cnn_model_path",
    "covered_share",
    "default_pipeline",
    "detect_for_protection",
    "faces_to_protect",
    "require_covered",
]
