"""The dlib face backend: HOG detector, 5-point alignment, ResNet 128-d descriptors.

dlib's ResNet (``dlib_face_recognition_resnet_model_v1``) reaches 99.38% on
LFW; two descriptors of the same person are typically closer than 0.6 in
Euclidean distance. The weights come from the ``face_recognition_models``
package (see :mod:`veilface.client.face.models`); ``dlib`` itself is imported
only when the models are first needed.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from veilface.client.face.backend import FaceBox, check_rgb
from veilface.client.face.errors import FaceModelsNotFound
from veilface.client.face.models import find_dlib_models

EMBEDDING_DIM = 128
#: Default :attr:`DlibBackend.max_detect_pixels` (a 1000 x 1000 photo at upsample 1).
DEFAULT_MAX_DETECT_PIXELS = 4_000_000


class DlibBackend:
    """Face detection and embedding with dlib.

    Parameters
    ----------
    model_dir
        Directory holding the two ``.dat`` model files; by default the
        ``face_recognition_models`` package.
    upsample
        How many times the HOG detector upsamples the image. Each step halves
        the smallest detectable face (about 80 px at 0, 40 px at 1, 20 px at 2)
        and roughly quadruples detection time.
    num_jitters
        Random jitters averaged per descriptor (0 = none; 10 is about 1% more
        accurate and 10x slower).
    padding
        Context around the aligned face chip, as in ``dlib.get_face_chip``.
    max_detect_pixels
        Most pixels the HOG detector scans, counted after upsampling (a
        ``W x H`` image costs ``W * H * 4**upsample``). Larger photos are
        shrunk (bilinear) for detection only and the boxes scaled back, so
        detection time stays bounded (about 1.5 s at the default on 2 cores)
        at the cost of missing faces smaller than about 40 px in the shrunk
        copy. ``None`` scans every pixel (a 40-megapixel photo then takes about
        a minute and gigabytes of memory).

    Models load on first use and are reused. Instances are not thread-safe:
    use one per thread.
    """

    name = "dlib"
    embedding_dim = EMBEDDING_DIM

    def __init__(
        self,
        *,
        model_dir: str | os.PathLike[str] | None = None,
        upsample: int = 1,
        num_jitters: int = 0,
        padding: float = 0.25,
        max_detect_pixels: int | None = DEFAULT_MAX_DETECT_PIXELS,
    ) -> None:
        if upsample < 0 or upsample > 4:
            raise ValueError(f"upsample must be in 0..4, got {upsample}")
        if num_jitters < 0:
            raise ValueError(f"num_jitters must be >= 0, got {num_jitters}")
        if not 0.0 <= padding <= 1.0:
            raise ValueError(f"padding must be in [0, 1], got {padding}")
        if max_detect_pixels is not None and max_detect_pixels < 4096:
            raise ValueError(f"max_detect_pixels must be >= 4096 or None, got {max_detect_pixels}")
        self.model_dir = model_dir
        self.upsample = upsample
        self.num_jitters = num_jitters
        self.padding = padding
        self.max_detect_pixels = max_detect_pixels
        self._lock = threading.Lock()
        self._dlib: Any = None
        self._detector: Any = None
        self._shape_predictor: Any = None
        self._recognizer: Any = None

    def load(self) -> None:
        """Load dlib and the models now instead of on first use (about 1 s)."""
        if self._recognizer is not None:
            return
        with self._lock:
            if self._recognizer is not None:
                return
            paths = find_dlib_models(self.model_dir)
            try:
                import dlib
            except ImportError as exc:
                raise FaceModelsNotFound(
                    "the dlib backend needs the 'dlib' module: pip install dlib-bin "
                    "(or: pip install 'veilface[client]')"
                ) from exc
            self._dlib = dlib
            self._detector = dlib.get_frontal_face_detector()
            self._shape_predictor = dlib.shape_predictor(str(paths.shape_predictor))
            self._recognizer = dlib.face_recognition_model_v1(str(paths.recognition))

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[FaceBox]:
        """Find frontal faces.

        Parameters
        ----------
        rgb
            ``uint8`` array of shape ``(H, W, 3)``, RGB.

        Returns
        -------
        list of FaceBox
            One box per face (possibly reaching past the border), with the
            detector's score; empty if none. Photos above
            ``max_detect_pixels`` are scanned shrunk; boxes are in pixels of
            ``rgb`` all the same.
        """
        img = check_rgb(rgb)
        self.load()
        h, w = img.shape[:2]
        factor = 1.0
        scanned = h * w * 4**self.upsample
        if self.max_detect_pixels is not None and scanned > self.max_detect_pixels:
            factor = math.sqrt(self.max_detect_pixels / scanned)
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            small = Image.fromarray(img).resize(size, Image.Resampling.BILINEAR)
            img = np.ascontiguousarray(np.asarray(small, dtype=np.uint8))
        rects, scores, _ = self._detector.run(img, self.upsample, 0.0)
        return [
            FaceBox(
                left=round(r.left() / factor),
                top=round(r.top() / factor),
                right=round((r.right() + 1) / factor),  # dlib rectangles are inclusive
                bottom=round((r.bottom() + 1) / factor),
                score=float(s),
            )
            for r, s in zip(rects, scores, strict=True)
        ]

    def align_and_embed(self, rgb: npt.NDArray[np.uint8], box: FaceBox) -> npt.NDArray[np.float32]:
        """Align the face in ``box`` on 5 landmarks and compute its descriptor.

        Returns
        -------
        numpy.ndarray
            ``float32`` array of shape ``(128,)``: dlib's raw descriptor
            (not re-normalised; compare with Euclidean distance).
        """
        img = check_rgb(rgb)
        self.load()
        rect = self._dlib.rectangle(box.left, box.top, box.right - 1, box.bottom - 1)
        shape = self._shape_predictor(img, rect)
        descriptor = self._recognizer.compute_face_descriptor(
            img, shape, self.num_jitters, self.padding
        )
        vector = np.asarray(descriptor, dtype=np.float32).reshape(-1)
        if vector.shape != (EMBEDDING_DIM,):  # pragma: no cover - a broken model file
            raise RuntimeError(f"dlib returned a descriptor of shape {vector.shape}")
        return vector


__all__ = ["DEFAULT_MAX_DETECT_PIXELS", "EMBEDDING_DIM", "DlibBackend"]
