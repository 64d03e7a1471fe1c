"""On-device face pipeline: load an image, detect, check quality, align, embed.

>>> from veilface.client.face import FacePipeline
>>> emb = FacePipeline().embed("photo.jpg")   # doctest: +SKIP
>>> emb.vector.shape, emb.vector.dtype        # doctest: +SKIP
((128,), dtype('float32'))

Backends implement :class:`FaceBackend`; ``"dlib"`` (weights from the
``face_recognition_models`` package) is the embedded default;
:class:`InsightFaceBackend` runs insightface's SCRFD and ArcFace ONNX models
from a folder the user gives (onnxruntime is imported only then). Nothing is
downloaded at run time.
"""

from veilface.client.face.backend import FaceBackend, FaceBox
from veilface.client.face.dlib_backend import DlibBackend
from veilface.client.face.errors import (
    ColourImageRequired,
    FaceModelInvalid,
    FaceModelsNotFound,
    FaceTooBlurry,
    FaceTooSmall,
    ImageDecodeError,
    ImageNotFound,
    ImageSizeError,
    MultipleFaces,
    NoFaceFound,
)
from veilface.client.face.image_io import ImageSource, load_image
from veilface.client.face.insightface_backend import InsightFaceBackend
from veilface.client.face.models import DlibModelPaths, find_dlib_models
from veilface.client.face.pipeline import (
    DEFAULT_MIN_SHARPNESS,
    FaceEmbedding,
    FacePipeline,
    face_sharpness,
)

__all__ = [
    "DEFAULT_MIN_SHARPNESS",
    "ColourImageRequired",
    "DlibBackend",
    "DlibModelPaths",
    "FaceBackend",
    "FaceBox",
    "FaceEmbedding",
    "FaceModelInvalid",
    "FaceModelsNotFound",
    "FacePipeline",
    "FaceTooBlurry",
    "FaceTooSmall",
    "ImageDecodeError",
    "ImageNotFound",
    "ImageSizeError",
    "ImageSource",
    "InsightFaceBackend",
    "MultipleFaces",
    "NoFaceFound",
    "face_sharpness",
    "find_dlib_models",
    "load_image",
]
