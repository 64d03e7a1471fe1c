"""De-identification: blur, pixelate or mask the faces of a photo before it leaves the device.

:func:`deidentify` loads the image with :func:`veilface.client.face.load_image`
(so every input check of the face pipeline applies), finds the faces with
dlib's HOG and CNN detectors (:mod:`veilface.client.protect.face_cover`; or
takes the boxes the caller gives, refusing boxes that leave a detected face
uncovered), grows each box by a margin, and replaces the pixels inside it:

``"blur"``
    Gaussian blur whose standard deviation is a fraction of the face size.
``"pixelate"``
    The face region is averaged down to a coarse grid of blocks and scaled
    back up (nearest neighbour).
``"mask"``
    The face region is painted a solid grey level.

Pixels outside the (expanded) boxes are left exactly as they were. The result
is a :class:`~veilface.client.protect.ProtectedImage`, the only kind of image
the SDK's upload path accepts. An image in which no face is found is refused
with :class:`~veilface.client.face.NoFaceFound`, and a result that left a
protected region (nearly) unchanged with
:class:`~veilface.client.protect.change_floor.InsufficientChange` (e.g. a
mask over a region already of the fill colour): the protector never passes
through an image it could not protect.

What this protects against, and what it does not
-------------------------------------------------
- At the ``"medium"`` and ``"high"`` presets, a blurred, pixelated or masked
  LFW face is no longer matched to the original photo by dlib's recognizer
  at its standard threshold (0.6); the tests check this on real photos.
  Measured on 9 LFW photos (first photo of 9 people, embedded at the
  original face box, which is stricter than re-detection): distances to the
  original of 0.65-0.81 for blur at ``"medium"``, 0.66-0.86 for pixelation,
  0.68-0.81 for a mask; ``"low"`` blur still matched 2 of 9 (minimum 0.45).
  The margin over 0.6 is thin because a face with its features destroyed
  embeds near a generic point rather than far from everyone: this is a
  measurement against one recognizer at one threshold, not proof of
  anonymity.
- **Blur** is the weakest: deblurring and face-hallucination networks can
  partly reverse a Gaussian blur, and recognizers fine-tuned on blurred faces
  match them far better than off-the-shelf ones. Use it where the photo only
  needs to look anonymised to a human.
- **Pixelation** keeps the coarse layout of the face (skin tone, hair line,
  head shape). Faces that are small in the photo are barely changed by it
  (a 24 px face at 8 blocks is 3 px blocks), and published attacks recognise
  pixelated faces well above chance. Depixelation models exist.
- **Masking** removes the face pixels entirely and is the strongest of the
  three; what remains (hair outside the margin, clothes, body shape, the
  background, the file's context) can still identify a person.
- Only faces that are found are protected. dlib's HOG detector misses
  profile, occluded and small faces (below about 40 px at ``upsample=1``),
  its CNN detector faces below about 80 px; a face both miss passes through
  unchanged. For crowds, give the boxes yourself or add a more sensitive
  ``pipeline`` (its detections are added to dlib's).
- None of this is adversarial protection: the output does not look unchanged,
  and nothing here is optimised against recognizers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from veilface.client.face.backend import FaceBox
from veilface.client.face.image_io import ImageSource, load_image
from veilface.client.face.pipeline import FacePipeline
from veilface.client.protect.face_cover import faces_to_protect
from veilface.client.protect.protected_image import ParamValue, ProtectedImage, mint_protected
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

Method = Literal["blur", "pixelate", "mask"]
Strength = Literal["low", "medium", "high"]


@dataclass(frozen=True)
class DeidentifyPreset:
    """What a strength preset means.

    Attributes
    ----------
    margin
        Each face box grows by ``margin`` times its width on the left and
        right, ``margin`` times its height at the bottom, and twice that at
        the top (detector boxes stop at the eyebrows; the forehead and hair
        line identify too).
    blur_sigma
        ``"blur"``: standard deviation of the Gaussian, as a fraction of the
        larger side of the detected (not expanded) face box.
    blocks
        ``"pixelate"``: number of blocks across the larger side of the
        expanded region.
    fill
        ``"mask"``: grey level (0..255) painted over the region.
    """

    margin: float
    blur_sigma: float
    blocks: int
    fill: int


#: The strength presets. ``"medium"`` is the default; ``"low"`` keeps more of
#: the face's look and may still be matched by a recognizer (``"low"`` blur
#: was matched by dlib on 2 of 9 LFW photos; see the module docstring).
PRESETS: Final[Mapping[Strength, DeidentifyPreset]] = {
    "low": DeidentifyPreset(margin=0.10, blur_sigma=0.06, blocks=12, fill=0),
    "medium": DeidentifyPreset(margin=0.20, blur_sigma=0.12, blocks=8, fill=0),
    "high": DeidentifyPreset(margin=0.30, blur_sigma=0.18, blocks=5, fill=0),
}

METHODS: Final[tuple[Method, ...]] = ("blur", "pixelate", "mask")


def deidentify(
    image: ImageSource,
    *,
    method: Method = "blur",
    faces: Literal["detect"] | Sequence[FaceBox] = "detect",
    strength: Strength = "medium",
    pipeline: FacePipeline | None = None,
) -> ProtectedImage:
    """Blur, pixelate or mask every face of ``image``.

    Parameters
    ----------
    image
        A path, encoded bytes, or a pixel array; anything
        :func:`veilface.client.face.load_image` accepts.
    method
        ``"blur"``, ``"pixelate"`` or ``"mask"`` (see the module docstring for
        how much each protects).
    faces
        ``"detect"`` to protect every face dlib's HOG and CNN detectors (and
        ``pipeline``'s) find, or the face boxes
        (:class:`~veilface.client.face.FaceBox`, pixels of the loaded image)
        to protect. Boxes grow by the preset's margin either way. The
        detectors run on caller boxes too: every face they find must lie at
        least 80 % inside the grown boxes (see
        :mod:`veilface.client.protect.face_cover`).
    strength
        ``"low"``, ``"medium"`` or ``"high"``; see :data:`PRESETS`.
    pipeline
        A face pipeline whose detections are added to dlib's HOG and CNN
        detectors' (default: none; dlib's HOG detector is the shared
        :class:`~veilface.client.face.FacePipeline` of the thread).

    Returns
    -------
    ProtectedImage
        ``uint8 (H, W, 3)`` RGB pixels of the loaded image with every region
        in ``.faces`` replaced; all other pixels are unchanged.

    Raises
    ------
    ImageDecodeError, ImageSizeError
        The image cannot be loaded (see :func:`load_image`).
    NoFaceFound
        ``faces="detect"`` and the detectors found no face: nothing is
        returned, since the image could not be protected.
    InvalidArgument
        Unknown ``method`` or ``strength``; ``faces`` is empty, holds
        something other than ``FaceBox`` objects, or a box that lies outside
        the image.
    FaceBoxTooSmall, UncoveredFace
        A caller box has under 16 px a side in the image, or the caller's
        boxes leave a detected face uncovered (both ``InvalidArgument``).
    InsufficientChange
        A protected region came out (nearly) unchanged (``InvalidArgument``).
    """
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if strength not in PRESETS:
        raise InvalidArgument(f"strength must be one of {', '.join(PRESETS)}; got {strength!r}")
    preset = PRESETS[strength]
    rgb = load_image(image)
    height, width = rgb.shape[:2]

    boxes = faces_to_protect(
        rgb,
        faces,
        pipeline,
        region=lambda box: _expand(box, preset.margin, width=width, height=height),
        no_face=(
            "no face found in the image, so it cannot be de-identified; pass the face "
            "boxes explicitly with faces=[FaceBox(...)] if you know where the faces are"
        ),
    )

    out = rgb.copy()
    regions: list[FaceBox] = []
    for box in boxes:
        region = _expand(box, preset.margin, width=width, height=height)
        if method == "blur":
            sigma = max(1.0, preset.blur_sigma * max(box.width, box.height))
            _blur(out, region, sigma)
        elif method == "pixelate":
            _pixelate(out, region, preset.blocks)
        else:
            out[region.top : region.bottom, region.left : region.right] = preset.fill
        regions.append(region)

    params: dict[str, ParamValue] = {"strength": strength, "margin": preset.margin}
    if method == "blur":
        params["sigma_fraction"] = preset.blur_sigma
    elif method == "pixelate":
        params["blocks"] = preset.blocks
    else:
        params["fill"] = preset.fill
    logger.debug("de-identified %d face region(s) with %s (%s)", len(regions), method, strength)
    return mint_protected(rgb, out, method=method, params=params, faces=regions)


def _expand(box: FaceBox, margin: float, *, width: int, height: int) -> FaceBox:
    dx, dy = margin * box.width, margin * box.height
    grown = FaceBox(
        left=math.floor(box.left - dx),
        top=math.floor(box.top - 2.0 * dy),
        right=math.ceil(box.right + dx),
        bottom=math.ceil(box.bottom + dy),
        score=box.score,
    )
    return grown.clipped(width, height)


def _blur(out: npt.NDArray[np.uint8], region: FaceBox, sigma: float) -> None:
    """Gaussian-blur ``region`` of ``out`` in place, with context from around it."""
    height, width = out.shape[:2]
    pad = math.ceil(3.0 * sigma)
    ctx = FaceBox(region.left - pad, region.top - pad, region.right + pad, region.bottom + pad)
    ctx = ctx.clipped(width, height)
    crop = Image.fromarray(out[ctx.top : ctx.bottom, ctx.left : ctx.right])
    blurred = np.asarray(crop.filter(ImageFilter.GaussianBlur(radius=sigma)))
    y0, x0 = region.top - ctx.top, region.left - ctx.left
    out[region.top : region.bottom, region.left : region.right] = blurred[
        y0 : y0 + region.height, x0 : x0 + region.width
    ]


def _pixelate(out: npt.NDArray[np.uint8], region: FaceBox, blocks: int) -> None:
    """Replace ``region`` of ``out`` in place by ``blocks`` area-averaged blocks across."""
    w, h = region.width, region.height
    if w == 0 or h == 0:
        return
    side = max(w, h)
    small = (max(1, round(blocks * w / side)), max(1, round(blocks * h / side)))
    crop = Image.fromarray(out[region.top : region.bottom, region.left : region.right])
    coarse = crop.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.NEAREST)
    out[region.top : region.bottom, region.left : region.right] = np.asarray(coarse)


__all__ = ["METHODS", "PRESETS", "DeidentifyPreset", "Method", "Strength", "deidentify"]
