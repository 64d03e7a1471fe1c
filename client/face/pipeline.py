"""The on-device face pipeline: load, detect, quality gate, liveness, align, embed.

The quality gate refuses, with a typed :class:`~veilface.errors.FaceError`,
images that would make a bad template: no face, several faces (unless the
caller chose ``on_multiple="largest"``), a face too small, or too blurry.
The liveness gate (:mod:`veilface.client.liveness.gate`) then judges the
one face left: a print or a screen replay raises
:class:`~veilface.errors.PresentationAttackDetected` (policy ``"refuse"``)
or is recorded in the result (``"record"``); ``liveness=None`` skips it,
and the result says so. Nothing is silently dropped or guessed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from veilface.client.face.backend import FaceBackend, FaceBox
from veilface.client.face.errors import (
    FaceModelsNotFound,
    FaceTooBlurry,
    FaceTooSmall,
    MultipleFaces,
    NoFaceFound,
)
from veilface.client.face.image_io import ImageSource, load_image
from veilface.client.liveness.gate import (
    DEFAULT_LIVENESS,
    LivenessGate,
    LivenessOption,
    LivenessPolicy,
    LivenessResult,
)
from veilface.errors import FaceError

#: Largest side of the grey crop on which sharpness is measured: bigger face
#: crops are area-averaged down to it, so a high-resolution photo is not
#: judged blurry for being smooth at pixel scale. Smaller crops are measured
#: as they are (enlarging would blur them).
SHARPNESS_SIZE = 128

#: Default blur threshold on :func:`face_sharpness` (grey levels 0..255).
#: Calibrated on 992 random LFW photos (deep-funneled, 250x250, faces of
#: 75-156 px): sharp photos score 12.0 at the least (1st percentile 23.8,
#: median 118), the same photos after a Gaussian blur of sigma 4 score 3.1 at
#: most (median 1.5), and after sigma 2 a median of 6.8. 6.0 sits a factor of
#: two from both ends: no LFW photo is refused, every sigma-4 blur is.
#: Strong sensor noise raises the measure, so a noisy blurred photo may pass.
DEFAULT_MIN_SHARPNESS = 6.0

OnMultiple = Literal["error", "largest"]

# Columns converted to float at a time by face_sharpness.
_BAND = 256


@dataclass(frozen=True)
class FaceEmbedding:
    """One face turned into a template.

    Attributes
    ----------
    vector
        ``float32`` array of shape ``(embedding_dim,)`` (128 for dlib).
    box
        Where the face was found, in pixels of the loaded image.
    sharpness
        Variance of the Laplacian of the normalised grey face crop (see
        :func:`face_sharpness`).
    backend
        Name of the backend that computed ``vector``; vectors of different
        backends are not comparable.
    liveness
        The liveness gate's :class:`~veilface.client.liveness.LivenessScore`
        (``live=False`` only under policy ``"record"``), or
        :data:`~veilface.client.liveness.LIVENESS_SKIPPED` when the pipeline
        was made with ``liveness=None``.
    """

    vector: npt.NDArray[np.float32]
    box: FaceBox
    sharpness: float
    backend: str
    liveness: LivenessResult


def _resample_matrix(n_in: int, n_out: int) -> npt.NDArray[np.float64]:
    """``(n_out, n_in)`` matrix that shrinks a signal by area averaging (``n_out <= n_in``)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    weights: npt.NDArray[np.float64] = overlap / overlap.sum(axis=1, keepdims=True)
    return weights


def face_sharpness(
    rgb: npt.NDArray[np.uint8], box: FaceBox, *, size: int = SHARPNESS_SIZE
) -> float:
    """Variance of the Laplacian of the face crop, a blur measure (higher is sharper).

    The crop inside ``box`` (clipped to the image) is turned grey (ITU-R 601
    luma, levels 0..255), shrunk by area averaging so that no side exceeds
    ``size`` (so a high-resolution photo is not penalised), and filtered with the 4-neighbour
    Laplacian kernel; the variance of the result is returned. Plain numpy.

    Parameters
    ----------
    rgb
        ``uint8`` array of shape ``(H, W, 3)``.
    box
        The face.
    size
        Largest side of the crop that is measured.

    Returns
    -------
    float
        ``0.0`` for an empty crop.
    """
    h, w = rgb.shape[:2]
    b = box.clipped(w, h)
    crop = rgb[b.top : b.bottom, b.left : b.right]
    h, w = crop.shape[:2]
    if h < 3 or w < 3:
        return 0.0
    luma = np.array([0.299, 0.587, 0.114])
    out_h, out_w = min(size, h), min(size, w)
    if (out_h, out_w) == (h, w):
        grey = crop.astype(np.float64) @ luma
    else:
        # Shrink column band by column band, so a face filling a 40-megapixel
        # photo never needs a full-size float copy (about 1 GB).
        rows, cols = _resample_matrix(h, out_h), _resample_matrix(w, out_w)
        shrunk_rows = np.empty((out_h, w))
        for c0 in range(0, w, _BAND):
            band = crop[:, c0 : c0 + _BAND].astype(np.float64) @ luma
            shrunk_rows[:, c0 : c0 + _BAND] = rows @ band
        grey = shrunk_rows @ cols.T
    lap = (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1]
    )
    return float(lap.var())


class FacePipeline:
    """Detect, check and embed the one face of a photo.

    Parameters
    ----------
    backend
        ``"dlib"`` (the embedded default), ``"insightface"`` (needs
        ``model_dir``; see :class:`~veilface.client.face.InsightFaceBackend`,
        whose instance gives more options), or any :class:`FaceBackend` instance.
    on_multiple
        What to do when an image holds several faces: ``"error"`` raises
        :class:`MultipleFaces`; ``"largest"`` embeds the largest face.
    min_face_px
        Smallest accepted face box side, in pixels of the image; smaller faces
        raise :class:`FaceTooSmall`.
    min_sharpness
        Smallest accepted :func:`face_sharpness`; blurrier faces raise
        :class:`FaceTooBlurry`. ``0`` disables the check.
    model_dir
        Model directory of a backend given by name: for ``"dlib"`` the folder
        of its two ``.dat`` files (default: the ``face_recognition_models``
        package); for ``"insightface"`` (required) insightface's root folder,
        its ``models`` folder or a pack folder.
    upsample
        Detector upsampling for the ``"dlib"`` backend (1 finds faces down to
        about 40 px; 2 down to about 20 px, four times slower).
    liveness
        The presentation-attack check run on the face before it is embedded:
        by default the model shipped with the package (loaded on first use;
        if it is not installed, :meth:`embed` raises rather than skip the
        check); a path to the user's ``.vfpad`` artifact (verified now), a
        :class:`~veilface.client.liveness.LivenessModel`, or ``None`` to skip
        the check explicitly (recorded in every result).
    liveness_policy
        ``"refuse"``: a face judged an attack raises
        :class:`~veilface.errors.PresentationAttackDetected`; ``"record"``:
        it is embedded and its result carries the score with ``live=False``.

    Raises
    ------
    LivenessModelInvalid
        ``liveness`` is a file that is not a valid liveness artifact (wrong,
        corrupt, edited, another architecture or version), or torch is missing.
    """

    def __init__(
        self,
        backend: str | FaceBackend = "dlib",
        *,
        on_multiple: OnMultiple = "error",
        min_face_px: int = 40,
        min_sharpness: float = DEFAULT_MIN_SHARPNESS,
        model_dir: str | os.PathLike[str] | None = None,
        upsample: int = 1,
        liveness: LivenessOption = DEFAULT_LIVENESS,
        liveness_policy: LivenessPolicy = "refuse",
    ) -> None:
        if on_multiple not in ("error", "largest"):
            raise ValueError(f"on_multiple must be 'error' or 'largest', got {on_multiple!r}")
        if min_face_px < 1:
            raise ValueError(f"min_face_px must be >= 1, got {min_face_px}")
        if min_sharpness < 0:
            raise ValueError(f"min_sharpness must be >= 0, got {min_sharpness}")
        self.backend: FaceBackend = _make_backend(backend, model_dir=model_dir, upsample=upsample)
        self.on_multiple: OnMultiple = on_multiple
        self.min_face_px = min_face_px
        self.min_sharpness = float(min_sharpness)
        self.liveness = LivenessGate(liveness, policy=liveness_policy)

    def detect(self, image: ImageSource) -> list[FaceBox]:
        """All faces in ``image``, largest first (no quality gate).

        ``image`` is anything :func:`load_image` accepts.
        """
        rgb = load_image(image)
        return self._detect(rgb)

    def embed(self, image: ImageSource) -> FaceEmbedding:
        """Embed the one face of ``image``.

        Parameters
        ----------
        image
            A path, encoded bytes, or a pixel array (see :func:`load_image`).

        Raises
        ------
        ImageDecodeError, ImageSizeError
            The image cannot be used at all.
        NoFaceFound, MultipleFaces, FaceTooSmall, FaceTooBlurry
            The quality gate refused the face.
        PresentationAttackDetected
            The liveness gate judged the face an attack (policy ``"refuse"``).
        ColourImageRequired, FaceTooSmall
            The liveness model cannot judge the face (grey, too few pixels).
        LivenessModelInvalid
            The liveness gate cannot run (the default model is not installed,
            torch is missing): nothing is embedded unchecked.
        """
        rgb = load_image(image)
        faces = self._detect(rgb)
        if not faces:
            raise NoFaceFound(
                "no face found in the image; use a well-lit, frontal photo in which the "
                f"face is at least {self.min_face_px} px wide"
            )
        if len(faces) > 1 and self.on_multiple == "error":
            raise MultipleFaces(
                f"{len(faces)} faces found in the image; crop it to one person, or choose "
                "on_multiple='largest' to embed the largest face"
            )
        box = faces[0]
        side = min(box.width, box.height)
        if side < self.min_face_px:
            raise FaceTooSmall(
                f"the face is {box.width}x{box.height} px, below the minimum of "
                f"{self.min_face_px} px; move closer or use a higher-resolution photo"
            )
        sharpness = face_sharpness(rgb, box)
        if sharpness < self.min_sharpness:
            raise FaceTooBlurry(
                f"the face is too blurry (sharpness {sharpness:.1f}, minimum "
                f"{self.min_sharpness:.1f}); hold the camera still, focus on the face, "
                "and avoid heavy compression"
            )
        liveness = self.liveness.check(rgb, box)
        vector = self.backend.align_and_embed(rgb, box)
        return FaceEmbedding(
            vector=np.ascontiguousarray(vector, dtype=np.float32),
            box=box,
            sharpness=sharpness,
            backend=self.backend.name,
            liveness=liveness,
        )

    def embed_many(
        self, images: Iterable[ImageSource], *, progress: bool = True
    ) -> list[FaceEmbedding | FaceError]:
        """Embed many images, keeping going past refused ones.

        Returns
        -------
        list
            One entry per input, in order: a :class:`FaceEmbedding`, or the
            :class:`~veilface.errors.FaceError` that refused the image (use
            ``type(err).__name__`` to count reasons; a missing or unreadable
            file is an :class:`ImageNotFound`, a spoof a
            :class:`~veilface.errors.PresentationAttackDetected`). Other
            exceptions (a broken model, a liveness gate that cannot run, a
            wrong argument type) propagate.
        """
        items: Sequence[ImageSource] = list(images)
        results: list[FaceEmbedding | FaceError] = []
        iterator: Iterable[ImageSource] = items
        if progress:
            from tqdm import tqdm

            iterator = tqdm(items, desc="embedding faces", unit="img")
        for item in iterator:
            try:
                results.append(self.embed(item))
            except FaceError as err:
                results.append(err)
        return results

    def _detect(self, rgb: npt.NDArray[np.uint8]) -> list[FaceBox]:
        faces = self.backend.detect(rgb)
        return sorted(faces, key=lambda b: (-b.area, -b.score, b.top, b.left))


def _make_backend(
    backend: str | FaceBackend, *, model_dir: str | os.PathLike[str] | None, upsample: int
) -> FaceBackend:
    if isinstance(backend, str):
        if backend == "dlib":
            from veilface.client.face.dlib_backend import DlibBackend

            return DlibBackend(model_dir=model_dir, upsample=upsample)
        if backend == "insightface":
            if upsample != 1:
                raise ValueError("upsample applies to the 'dlib' backend only")
            if model_dir is None:
                raise FaceModelsNotFound(
                    "the insightface backend needs model_dir=, the folder holding insightface's "
                    "models/<pack>/ (e.g. buffalo_l with det_10g.onnx and w600k_r50.onnx); "
                    "models are never downloaded"
                )
            from veilface.client.face.insightface_backend import InsightFaceBackend

            return InsightFaceBackend(model_dir)
        raise ValueError(f"unknown face backend {backend!r}; available: 'dlib', 'insightface'")
    if model_dir is not None or upsample != 1:
        raise ValueError(
            "model_dir and upsample apply to a backend given by name; configure a backend "
            "instance when you create it"
        )
    if not isinstance(backend, FaceBackend):
        raise TypeError(
            f"backend must be 'dlib', 'insightface' or a FaceBackend, not {type(backend).__name__}"
        )
    return backend


__all__ = [
    "DEFAULT_MIN_SHARPNESS",
    "SHARPNESS_SIZE",
    "FaceEmbedding",
    "FacePipeline",
    "OnMultiple",
    "face_sharpness",
]
