"""The insightface face backend: SCRFD detection, 5-point alignment, ArcFace embeddings.

The models are insightface's own ONNX files (``buffalo_l``: ``det_10g.onnx``
and ``w600k_r50.onnx``; ``antelopev2``: ``scrfd_10g_bnkps.onnx`` and
``glintr100.onnx``...) in insightface's model-directory layout, from a folder
the user gives; nothing is downloaded. They run on onnxruntime's CPU provider;
the pre- and post-processing are re-implemented here in numpy and Pillow
(:mod:`~veilface.client.face.scrfd`, :mod:`~veilface.client.face.arcface_align`)
rather than taken from the ``insightface`` package, which pulls in OpenCV,
scikit-image and download code.

ArcFace embeddings are L2-normalised 512-d vectors compared by cosine
similarity (for w600k_r50 two photos of one person typically score above
about 0.3-0.4); they are not comparable with dlib's 128-d descriptors, nor
across recognition models. insightface's pretrained models are licensed for
non-commercial research only: check before shipping them.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import numpy.typing as npt

from veilface.client.face.arcface_align import norm_crop
from veilface.client.face.backend import FaceBox, check_rgb
from veilface.client.face.errors import FaceModelInvalid, NoFaceFound
from veilface.client.face.insightface_models import (
    DEFAULT_DET_SIZE,
    DetectorModel,
    RecognizerModel,
    find_insightface_pack,
    open_pack,
)
from veilface.client.face.scrfd import (
    Detections,
    OutputShapeError,
    letterbox,
    postprocess,
    to_blob,
)

logger = logging.getLogger(__name__)

#: Embedding length of insightface's ArcFace models (the loaded model's own is used).
ARCFACE_DIM = 512
#: Smallest overlap (IoU) between a given box and a detection for
#: :meth:`InsightFaceBackend.align_and_embed` to take the detection's landmarks.
MATCH_IOU = 0.3


class InsightFaceBackend:
    """Face detection and embedding with insightface's SCRFD and ArcFace ONNX models.

    Parameters
    ----------
    model_dir
        insightface's root folder (``<root>/models/<pack>/*.onnx``), its
        ``models`` folder, or a pack folder.
    pack
        Pack name; default: ``buffalo_l`` if present, else the only pack.
    det_size
        Detector canvas ``(width, height)``, multiples of 32 up to 4096, for detectors
        with a dynamic input size (a fixed-size model uses its own). Faces
        smaller than about 1/40 of the image's longer side are missed at 640.
    det_thresh
        Smallest detection score kept (insightface's default 0.5).
    nms_thresh
        IoU above which overlapping detections are merged (insightface: 0.4).
    threads
        onnxruntime threads per model (0: one per core).

    Raises
    ------
    FaceModelsNotFound
        ``model_dir`` or the pack is missing (checked here, before loading).

    Notes
    -----
    Models load on first use (or :meth:`load`) and are reused. Instances are
    not thread-safe: use one per thread.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        pack: str | None = None,
        det_size: tuple[int, int] = DEFAULT_DET_SIZE,
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
        threads: int = 0,
    ) -> None:
        if len(det_size) != 2 or any(int(s) != s or s < 32 or s > 4096 or s % 32 for s in det_size):
            raise ValueError(f"det_size must be two multiples of 32 in 32..4096, got {det_size}")
        if not 0.0 < det_thresh < 1.0:
            raise ValueError(f"det_thresh must be in (0, 1), got {det_thresh}")
        if not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"nms_thresh must be in (0, 1], got {nms_thresh}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.pack_dir = find_insightface_pack(model_dir, pack)
        #: ``"insightface:<pack>"``; embeddings of different packs are not comparable.
        self.name = f"insightface:{self.pack_dir.name}"
        #: 512 until :meth:`load` reads the recognition model's own output size.
        self.embedding_dim = ARCFACE_DIM
        self.det_size = (int(det_size[0]), int(det_size[1]))
        self.det_thresh = float(det_thresh)
        self.nms_thresh = float(nms_thresh)
        self.threads = threads
        self._lock = threading.Lock()
        self._detector: DetectorModel | None = None
        self._recognizer: RecognizerModel | None = None

    def load(self) -> None:
        """Open both ONNX models now instead of on first use (idempotent).

        Raises
        ------
        FaceModelsNotFound
            onnxruntime is missing, or the pack has no detector or no recogniser.
        FaceModelInvalid
            A model file is corrupt or has unexpected inputs/outputs.
        """
        if self._recognizer is not None:
            return
        with self._lock:
            if self._recognizer is not None:
                return
            detector, recognizer = open_pack(
                self.pack_dir, det_size=self.det_size, threads=self.threads
            )
            logger.info(
                "insightface pack %s: detector %s, recogniser %s",
                self.pack_dir.name,
                detector.path.name,
                recognizer.path.name,
            )
            self.embedding_dim = recognizer.embedding_dim
            self._detector = detector
            self._recognizer = recognizer

    def _models(self) -> tuple[DetectorModel, RecognizerModel]:
        self.load()
        if (
            self._detector is None or self._recognizer is None
        ):  # pragma: no cover - load() sets both
            raise RuntimeError("models not loaded")
        return self._detector, self._recognizer

    def detect_faces(self, rgb: npt.NDArray[np.uint8]) -> Detections:
        """Run SCRFD: boxes, scores and 5-point landmarks in pixels of ``rgb``.

        Parameters
        ----------
        rgb
            ``uint8 (H, W, 3)`` RGB.

        Returns
        -------
        Detections
            Best score first, after NMS.

        Raises
        ------
        FaceModelInvalid
            The detector's outputs do not have SCRFD's shapes.
        """
        img = check_rgb(rgb)
        detector, _ = self._models()
        canvas, scale = letterbox(img, detector.input_size)
        try:
            outputs = detector.session.run(
                list(detector.output_names), {detector.input_name: to_blob(canvas)}
            )
            return postprocess(
                outputs,
                layout=detector.layout,
                input_size=detector.input_size,
                scale=scale,
                threshold=self.det_thresh,
                nms_iou=self.nms_thresh,
            )
        except OutputShapeError as exc:
            raise FaceModelInvalid(
                f"detector {detector.path.name} is not an SCRFD model this backend can "
                f"decode: {exc}"
            ) from exc
        except Exception as exc:
            if type(exc).__module__.startswith("onnxruntime"):
                raise FaceModelInvalid(
                    f"detector {detector.path.name} failed to run on a "
                    f"{detector.input_size[0]}x{detector.input_size[1]} input"
                ) from exc
            raise

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[FaceBox]:
        """All faces in ``rgb``, best score first, with their 5 landmarks.

        Box sides are rounded to whole pixels; landmarks keep sub-pixel precision.
        """
        found = self.detect_faces(rgb)
        boxes: list[FaceBox] = []
        for (x1, y1, x2, y2), score, kps in zip(
            found.boxes.tolist(), found.scores.tolist(), found.landmarks.tolist(), strict=True
        ):
            boxes.append(
                FaceBox(
                    left=round(float(x1)),
                    top=round(float(y1)),
                    right=round(float(x2)),
                    bottom=round(float(y2)),
                    score=float(score),
                    landmarks=tuple((float(x), float(y)) for x, y in kps),
                )
            )
        return boxes

    def align(self, rgb: npt.NDArray[np.uint8], landmarks: npt.ArrayLike) -> npt.NDArray[np.uint8]:
        """The ArcFace crop of a face: ``uint8 (S, S, 3)`` RGB (S = 112 for ArcFace).

        ``landmarks`` is ``(5, 2)``: eyes, nose tip, mouth corners, in pixels of ``rgb``.

        Raises
        ------
        NoFaceFound
            The landmarks are degenerate (all in one point, NaN).
        """
        img = check_rgb(rgb)
        _, recognizer = self._models()
        try:
            crop: npt.NDArray[np.uint8] = norm_crop(img, landmarks, recognizer.input_size)
        except ValueError as exc:
            raise NoFaceFound(
                f"the face landmarks cannot be aligned ({exc}); use a clearer, frontal photo"
            ) from exc
        return crop

    def embed_aligned(self, aligned: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Embed an aligned crop.

        Parameters
        ----------
        aligned
            ``uint8 (S, S, 3)`` RGB from :meth:`align`.

        Returns
        -------
        numpy.ndarray
            ``float32 (embedding_dim,)``, unit L2 norm.

        Raises
        ------
        FaceModelInvalid
            The model returned a vector of the wrong size, zero, or not finite.
        """
        crop = check_rgb(aligned)
        _, recognizer = self._models()
        side = recognizer.input_size
        if crop.shape[:2] != (side, side):
            raise ValueError(f"expected a {side}x{side} aligned crop, got {crop.shape[:2]}")
        blob = (crop.transpose(2, 0, 1)[None].astype(np.float32) - recognizer.input_mean) / (
            recognizer.input_std
        )
        try:
            (out,) = recognizer.session.run(
                [recognizer.output_name], {recognizer.input_name: np.ascontiguousarray(blob)}
            )
        except Exception as exc:
            if type(exc).__module__.startswith("onnxruntime"):
                raise FaceModelInvalid(
                    f"recogniser {recognizer.path.name} failed to run on a {side}x{side} crop"
                ) from exc
            raise
        vector = np.asarray(out, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vector))
        if vector.shape != (recognizer.embedding_dim,) or not np.isfinite(norm) or norm == 0.0:
            raise FaceModelInvalid(
                f"recogniser {recognizer.path.name} returned an unusable embedding "
                f"(shape {vector.shape}, norm {norm:.3g})"
            )
        normalised: npt.NDArray[np.float32] = (vector / norm).astype(np.float32)
        return normalised

    def align_and_embed(self, rgb: npt.NDArray[np.uint8], box: FaceBox) -> npt.NDArray[np.float32]:
        """Align the face in ``box`` on its landmarks and embed it.

        If ``box`` carries no landmarks (it came from another detector), the
        detector runs again and the detection overlapping ``box`` most (IoU at
        least :data:`MATCH_IOU`) supplies them.

        Returns
        -------
        numpy.ndarray
            ``float32 (embedding_dim,)``, unit L2 norm.

        Raises
        ------
        NoFaceFound
            No landmarks given and no detection matches ``box``.
        """
        img = check_rgb(rgb)
        landmarks = box.landmarks
        if landmarks is None:
            landmarks = self._landmarks_for(img, box)
        return self.embed_aligned(self.align(img, landmarks))

    def _landmarks_for(
        self, rgb: npt.NDArray[np.uint8], box: FaceBox
    ) -> tuple[tuple[float, float], ...]:
        found = self.detect(rgb)
        best, best_iou = None, 0.0
        for cand in found:
            iou = _iou(box, cand)
            if iou > best_iou:
                best, best_iou = cand, iou
        if best is None or best.landmarks is None or best_iou < MATCH_IOU:
            raise NoFaceFound(
                "the insightface detector finds no face in the given box; pass a box from "
                "InsightFaceBackend.detect, or a photo where the face is clearly visible"
            )
        landmarks: tuple[tuple[float, float], ...] = best.landmarks
        return landmarks


def _iou(a: FaceBox, b: FaceBox) -> float:
    w = max(0, min(a.right, b.right) - max(a.left, b.left))
    h = max(0, min(a.bottom, b.bottom) - max(a.top, b.top))
    inter = w * h
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


__all__ = ["ARCFACE_DIM", "MATCH_IOU", "InsightFaceBackend"]
