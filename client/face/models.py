"""Locate dlib's face model files.

The weights ship in the ``face_recognition_models`` package (installed with the
``client`` extra). Its ``__init__`` imports ``pkg_resources``, which recent
setuptools no longer provide, so the package is located with
:func:`importlib.util.find_spec` and never imported. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from veilface.client.face.errors import FaceModelsNotFound

#: File name of dlib's 5-point landmark model (used for alignment).
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
#: File name of dlib's ResNet face recognition model (128-d descriptors).
RECOGNITION_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"

_PACKAGE = "face_recognition_models"
_INSTALL_HINT = "pip install face_recognition_models (or: pip install 'veilface[client]')"


@dataclass(frozen=True)
class DlibModelPaths:
    """Paths of the two model files the dlib backend loads."""

    shape_predictor: Path
    recognition: Path


def default_model_dir() -> Path:
    """The ``models/`` directory of the installed ``face_recognition_models`` package.

    Raises
    ------
    FaceModelsNotFound
        The package is not installed.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise FaceModelsNotFound(
            f"dlib's face models are not installed: the '{_PACKAGE}' package was not found "
            f"({_INSTALL_HINT}), or pass model_dir= a directory holding "
            f"{SHAPE_PREDICTOR_FILE} and {RECOGNITION_MODEL_FILE}"
        )
    return Path(spec.origin).resolve().parent / "models"


def find_dlib_models(model_dir: str | os.PathLike[str] | None = None) -> DlibModelPaths:
    """Return the paths of dlib's landmark and recognition models.

    Parameters
    ----------
    model_dir
        Directory holding :data:`SHAPE_PREDICTOR_FILE` and
        :data:`RECOGNITION_MODEL_FILE`; by default the ``models/`` directory of
        the installed ``face_recognition_models`` package.

    Raises
    ------
    FaceModelsNotFound
        The package is missing (no ``model_dir`` given) or a file is absent.
    """
    directory = Path(model_dir) if model_dir is not None else default_model_dir()
    paths = DlibModelPaths(
        shape_predictor=directory / SHAPE_PREDICTOR_FILE,
        recognition=directory / RECOGNITION_MODEL_FILE,
    )
    missing = [p.name for p in (paths.shape_predictor, paths.recognition) if not p.is_file()]
    if missing:
        where = "the given model_dir" if model_dir is not None else f"the '{_PACKAGE}' package"
        raise FaceModelsNotFound(
            f"dlib model file(s) {', '.join(missing)} not found in {where} ({directory}); "
            f"reinstall it ({_INSTALL_HINT}) or point model_dir at a directory holding them"
        )
    return paths


__all__ = [
    "RECOGNITION_MODEL_FILE",
    "SHAPE_PREDICTOR_FILE",
    "DlibModelPaths",
    "default_model_dir",
    "find_dlib_models",
]
