"""Protection of every image before it leaves the device.

>>> from veilface.client.protect import deidentify, upload_payload
>>> img = deidentify("photo.jpg", method="mask", strength="high")  # doctest: +SKIP
>>> data, meta = upload_payload(img)                                # doctest: +SKIP

Protectors return a :class:`ProtectedImage`, the only image type the SDK's
upload calls accept (:func:`require_protected`). Today's protector is
de-identification (:func:`deidentify`: blur, pixelate, mask); adversarial
perturbation is to come.
"""

from veilface.client.protect.deidentify import (
    METHODS,
    PRESETS,
    DeidentifyPreset,
    Method,
    Strength,
    deidentify,
)
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

__all__ = [
    "METHODS",
    "PRESETS",
    "UPLOAD_JPEG_QUALITY",
    "DeidentifyPreset",
    "Method",
    "ParamValue",
    "ProtectedImage",
    "Strength",
    "TamperedImageError",
    "UnprotectedImageError",
    "UploadMetadata",
    "deidentify",
    "require_protected",
    "upload_payload",
]
