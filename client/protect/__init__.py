"""Protection of every image before it leaves the device.

>>> from veilface.client.protect import deidentify, upload_payload
>>> img = deidentify("photo.jpg", method="mask", strength="high")  # doctest: +SKIP
>>> data, meta = upload_payload(img)                                # doctest: +SKIP

Protectors return a :class:`ProtectedImage`, the only image type the SDK's
upload calls accept (:func:`require_protected`). Two protectors:
:func:`cloak` (an adversarial perturbation against surrogate recognizers
trained here, confined to the face region, within an L-infinity budget and
an SSIM floor; needs the ``client`` extra's torch) and :func:`deidentify`
(blur, pixelate, mask).
"""

from typing import TYPE_CHECKING, Any

from veilface.client.protect.change_floor import InsufficientChange
from veilface.client.protect.deidentify import (
    METHODS,
    PRESETS,
    DeidentifyPreset,
    Method,
    Strength,
    deidentify,
)
from veilface.client.protect.face_cover import FaceBoxTooSmall, UncoveredFace
from veilface.client.protect.protected_image import (
    ParamValue,
    ProtectedImage,
    TamperedImageError,
    UnprotectedImageError,
)
from veilface.client.protect.upload import (
    UPLOAD_JPEG_QUALITY,
    UploadMetadata,
    require_protected,
    upload_payload,
)

if TYPE_CHECKING:
    from veilface.client.protect.adversarial import PRESETS as CLOAK_PRESETS
    from veilface.client.protect.adversarial import CloakPreset, CloakPresetName, cloak
    from veilface.client.protect.surrogates import (
        SurrogateEnsemble,
        SurrogateWeightsNotFound,
        load_ensemble,
    )

# The adversarial protector needs torch: import it on first use only, so
# de-identification and the upload gate stay light.
_LAZY = {
    "CLOAK_PRESETS": ("veilface.client.protect.adversarial", "PRESETS"),
    "CloakPreset": ("veilface.client.protect.adversarial", "CloakPreset"),
    "CloakPresetName": ("veilface.client.protect.adversarial", "CloakPresetName"),
    "cloak": ("veilface.client.protect.adversarial", "cloak"),
    "SurrogateEnsemble": ("veilface.client.protect.surrogates", "SurrogateEnsemble"),
    "SurrogateWeightsNotFound": ("veilface.client.protect.surrogates", "SurrogateWeightsNotFound"),
    "load_ensemble": ("veilface.client.protect.surrogates", "load_ensemble"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLOAK_PRESETS",
    "METHODS",
    "PRESETS",
    "UPLOAD_JPEG_QUALITY",
    "CloakPreset",
    "CloakPresetName",
    "DeidentifyPreset",
    "FaceBoxTooSmall",
    "InsufficientChange",
    "Method",
    "ParamValue",
    "ProtectedImage",
    "Strength",
    "SurrogateEnsemble",
    "SurrogateWeightsNotFound",
    "TamperedImageError",
    "UncoveredFace",
    "UnprotectedImageError",
    "UploadMetadata",
    "cloak",
    "deidentify",
    "load_ensemble",
    "require_protected",
    "upload_payload",
]
