"""Errors of the on-device face pipeline.

Every class is a :class:`veilface.errors.FaceError` (gRPC ``INVALID_ARGUMENT``),
except :class:`FaceModelsNotFound` and :class:`FaceModelInvalid`, which are
setup problems (``FAILED_PRECONDITION``). Messages say what was wrong and how to fix it; they
never contain pixel data, templates or file contents.
"""

from __future__ import annotations

from veilface.errors import FaceError, FailedPrecondition


class ImageDecodeError(FaceError):
    """The input is not a decodable image: corrupt, truncated, or an unsupported format."""


class ImageNotFound(FaceError, FileNotFoundError):
    """The image path does not exist, is a folder, or cannot be read.

    Also a :class:`FileNotFoundError`, so ``except FileNotFoundError`` still works.
    """


class ImageSizeError(FaceError):
    """The image is absurdly small or large (or a decompression bomb)."""


class NoFaceFound(FaceError):
    """The detector found no face in the image."""


class MultipleFaces(FaceError):
    """Several faces were found and the policy is ``on_multiple="error"``."""


class FaceTooSmall(FaceError):
    """The face is too small (in pixels) for a reliable template."""


class FaceTooBlurry(FaceError):
    """The face crop is too blurry (low variance of its Laplacian)."""


class ColourImageRequired(FaceError):
    """The liveness gate needs colour: the face's surroundings are grey (all channels equal).

    Print and screen-replay cues are largely colour cues, and the liveness
    model was trained on colour captures only; a grey image (or a grey
    print in front of a colour camera) cannot be judged, so it is refused,
    whatever the liveness policy. ``liveness=None`` skips the gate explicitly.
    """


class FaceModelsNotFound(FailedPrecondition):
    """The model files a face backend needs are not installed or not in the given directory."""


class FaceModelInvalid(FailedPrecondition):
    """A model file exists but is corrupt, truncated, or not the kind of model expected."""


__all__ = [
    "ColourImageRequired",
    "FaceModelInvalid",
    "FaceModelsNotFound",
    "FaceTooBlurry",
    "FaceTooSmall",
    "ImageDecodeError",
    "ImageNotFound",
    "ImageSizeError",
    "MultipleFaces",
    "NoFaceFound",
]
