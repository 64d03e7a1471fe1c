"""A PROXY for the kiosk's liveness model: whole scenes, cut as the client cuts them.

The incremental-PAD benchmark's proxy (:mod:`~veilface.federated.pad.proxy`)
renders tight 48-px face crops. A kiosk sees more: the client cuts a square
of :attr:`~veilface.nn.liveness_io.CropSpec.scale` times the face box around
the detected face (:func:`~veilface.nn.liveness_io.liveness_crop`), so the
model also sees what surrounds the face — a sheet's white margin and edge,
a screen's bezel, the fingers holding a phone. This module renders scenes of
that kind and cuts them with the client's own crop:

live
    an LFW photo as it is (its face box: dlib's detector's mean box on
    deep-funnelled LFW, jittered).
print
    another person's LFW photo rendered as a print (half :func:`render_print`:
    halftone, paper white, ink range, fibre; half a good photographic print
    with only a slight loss of colour and contrast), on a sheet with a white
    margin, tilted a little, held in front of a blurred background, with a
    specular sheen sometimes.
replay
    another person's LFW photo on a screen (:func:`render_replay`: gamma,
    sub-pixel grid, moiré, glare) inside a black bezel, tilted a little,
    with fingers on the frame sometimes.

Each *domain* is a camera (:data:`KIOSK_DOMAINS`): how many pixels the crop
has before it is resized to the model's input, blur, white balance,
exposure, noise and JPEG quality; it applies to live and attack scenes alike.
Every shot also gets its own exposure, contrast, saturation and (half the
time) in-camera sharpening, the same for both classes, so that neither
overall brightness nor sharpness tells them apart: LFW's live photos are
soft press pictures, a kiosk's or a phone's are sharp.

People are split by a hash of their name (:func:`person_part`): ``train``
people are the training sites' (their ``split`` 0 train and 1 validation,
disjoint identities; the validation part chooses the threshold), ``bench``
people are used only by :func:`render_bench_set` for ``veilface bench
liveness``: no training or threshold choice ever sees them.

Everything here is a **proxy**: rendered attacks, not OULU-NPU or any real
PAD data set.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from veilface.errors import InvalidArgument
from veilface.federated.pad.proxy import (
    CaptureSetting,
    PADProxy,
    chunk_photos,
    render_print,
    render_replay,
)
from veilface.nn.liveness_io import CropSpec, liveness_crop

logger = logging.getLogger(__name__)

__all__ = [
    "KIOSK_CROP",
    "KIOSK_DOMAINS",
    "BenchSet",
    "Scene",
    "build_kiosk_proxy",
    "person_part",
    "render_bench_set",
    "render_scene",
]

KIOSK_CROP = CropSpec(scale=2.5, size=64)
"""The crop the shipped model is trained with (and the client therefore uses)."""

# dlib's HOG detector on deep-funnelled LFW (40 photos): mean box (70, 81) + 106 px
_LFW_BOX = (70.0, 81.0, 106.0)
_CANVAS = 420
FloatImage = npt.NDArray[np.float32]
Part = Literal["train", "bench"]


KIOSK_DOMAINS: tuple[CaptureSetting, ...] = (
    # resolution here: the side of the face crop as the sensor resolves it
    CaptureSetting("kiosk webcam, warm", 96, 0.6, (1.12, 1.0, 0.85), 1.0, 1.05, 0.015, 80),
    # the gate refuses a face whose crop has under 64 px (FaceTooSmall), so no domain is below
    CaptureSetting("low-res USB camera", 72, 0.5, (0.95, 1.05, 0.95), 0.9, 1.0, 0.03, 50),
    CaptureSetting("dim lobby, cool", 120, 0.8, (0.85, 0.95, 1.15), 1.4, 0.75, 0.03, 75),
    CaptureSetting("phone, bright", 220, 0.3, (1.03, 0.97, 1.03), 0.8, 1.15, 0.008, 92),
)


def person_part(name: str) -> Part:
    """``bench`` for one person in five (by a hash of the name), else ``train``."""
    return "bench" if hashlib.sha256(b"kiosk-pad:" + name.encode()).digest()[0] < 52 else "train"


@dataclass(frozen=True)
class Scene:
    """A rendered scene and where its face is."""

    image: npt.NDArray[np.uint8]  # (H, W, 3)
    box: tuple[int, int, int, int]  # left, top, right, bottom
    species: int  # 0 live, 1 print, 2 replay


def _load(path: Path) -> FloatImage:
    with Image.open(path) as raw:
        return np.asarray(raw.convert("RGB"), dtype=np.float32) / 255.0


def _pil(arr: FloatImage) -> Image.Image:
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _lfw_box(rng: np.random.Generator, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> tuple[float, float, float]:
    left, top, side = _LFW_BOX
    j = rng.normal(0.0, 3.0, 3)
    return (left + j[0]) * scale + dx, (top + j[1]) * scale + dy, (side + j[2]) * scale


def _background(photo: FloatImage, rng: np.random.Generator) -> Image.Image:
    """A plausible room behind the medium: a blurred, recoloured photo or a lit wall."""
    if rng.random() < 0.6:
        im = _pil(photo).resize((_CANVAS, _CANVAS), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(3.0, 9.0)))
        arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = arr * rng.uniform(0.7, 1.2, 3).astype(np.float32)
    else:
        yy, xx = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32) / _CANVAS
        base = rng.uniform(0.35, 0.95, 3).astype(np.float32)
        a, b = rng.uniform(-0.35, 0.35, 2)
        arr = base[None, None, :] * (1.0 + a * (xx - 0.5) + b * (yy - 0.5))[..., None]
    return _pil(arr)


def _photo_print(photo: FloatImage, rng: np.random.Generator) -> FloatImage:
    """A good photographic print: no visible halftone, a little less saturation and
    contrast than the original, a paper-white cast and a faint grain."""
    grey = photo.mean(axis=2, keepdims=True)
    img = grey + (photo - grey) * rng.uniform(0.75, 1.0)
    img = 0.5 + (img - 0.5) * rng.uniform(0.8, 0.95)
    img = img * np.array([1.0, 0.98, 0.94], dtype=np.float32) * rng.uniform(0.92, 1.0)
    img = img + rng.normal(0.0, rng.uniform(0.005, 0.02), img.shape).astype(np.float32)
    out: FloatImage = np.clip(img, 0.0, 1.0).astype(np.float32)
    return out


def _medium(
    face_photo: FloatImage, species: int, side: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple[float, float]]:
    """The print or the screen, as an RGBA image, and the photo's offset inside it."""
    if species == 1 and rng.random() < 0.5:
        rendered = _photo_print(face_photo, rng)
    else:
        render = render_print if species == 1 else render_replay
        rendered = render(face_photo, rng, with_medium=False)
    img = _pil(rendered).resize((side, side), Image.Resampling.BILINEAR)
    if species == 1:  # a sheet: white margins of random width on each side
        m = (rng.uniform(0.0, 0.3, 4) * side).astype(int)
        paper = tuple(int(255 * v) for v in np.array([1.0, 0.98, 0.93]) * rng.uniform(0.8, 1.0))
        sheet = Image.new("RGB", (side + m[0] + m[2], side + m[1] + m[3]), paper)
        sheet.paste(img, (int(m[0]), int(m[1])))
        offset = (float(m[0]), float(m[1]))
    else:  # a screen in a black bezel, the device body around it
        b = int(rng.uniform(0.03, 0.1) * side)
        body = int(rng.uniform(0.0, 0.05) * side)
        tone = int(rng.uniform(5, 40))
        sheet = Image.new("RGB", (side + 2 * (b + body), side + 2 * (b + body)), (tone,) * 3)
        ImageDraw.Draw(sheet).rectangle(
            (body, body, sheet.width - body - 1, sheet.height - body - 1), fill=(8, 8, 10)
        )
        sheet.paste(img, (b + body, b + body))
        offset = (float(b + body), float(b + body))
    rgba = sheet.convert("RGBA")
    if species == 2 and rng.random() < 0.5:  # fingers on the frame
        draw = ImageDraw.Draw(rgba)
        skin = tuple(int(v) for v in rng.uniform([150, 100, 80], [240, 190, 160]))
        for _ in range(int(rng.integers(1, 4))):
            cx = rng.uniform(0.1, 0.9) * rgba.width
            r = rng.uniform(0.04, 0.08) * rgba.width
            y = rgba.height if rng.random() < 0.7 else 0
            draw.ellipse((cx - r, y - 2.2 * r, cx + r, y + 2.2 * r), fill=(*skin, 255))
    if species == 1 and rng.random() < 0.3:  # a sheen across the paper
        arr = np.asarray(rgba, dtype=np.float32)
        yy, xx = np.mgrid[0 : rgba.height, 0 : rgba.width].astype(np.float32)
        cy, cx = rng.uniform(0, rgba.height), rng.uniform(0, rgba.width)
        r = rng.uniform(0.2, 0.5) * rgba.width
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) * rng.uniform(40, 110)
        arr[..., :3] = np.clip(arr[..., :3] + g[..., None], 0, 255)
        rgba = Image.fromarray(arr.astype(np.uint8), "RGBA")
    return rgba, offset


def render_scene(
    species: int, face_photo: Path, background_photo: Path, rng: np.random.Generator
) -> Scene:
    """One scene: a live LFW photo (species 0), or ``face_photo`` shown as a print (1) or replay (2)."""
    if species == 0:
        photo = _load(face_photo)
        if rng.random() < 0.5:
            photo = photo[:, ::-1].copy()
        left, top, side = _lfw_box(rng)
        img = _pil(photo)
        box = (left, top, left + side, top + side)
        return Scene(np.asarray(img, dtype=np.uint8), _int_box(box), 0)
    if species not in (1, 2):
        raise InvalidArgument(f"species must be 0, 1 or 2, got {species}")
    face_px = rng.uniform(105.0, 165.0)
    scale = face_px / _LFW_BOX[2]
    side = round(250 * scale)
    medium, (ox, oy) = _medium(_load(face_photo), species, side, rng)
    angle = float(rng.normal(0.0, 5.0))
    rotated = medium.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    canvas = _background(_load(background_photo), rng)
    # where the face sits inside the medium, before rotation
    left, top, fside = _lfw_box(rng, scale, ox, oy)
    fcx, fcy = left + fside / 2, top + fside / 2
    # rotate that point with the medium (PIL rotates counter-clockwise about the centre)
    mcx, mcy = medium.width / 2, medium.height / 2
    t = np.deg2rad(angle)
    rx = (fcx - mcx) * np.cos(t) + (fcy - mcy) * np.sin(t) + rotated.width / 2
    ry = -(fcx - mcx) * np.sin(t) + (fcy - mcy) * np.cos(t) + rotated.height / 2
    # put the face near the canvas centre
    tx = _CANVAS / 2 + rng.normal(0.0, 20.0) - rx
    ty = _CANVAS / 2 + rng.normal(0.0, 20.0) - ry
    canvas.paste(rotated, (round(tx), round(ty)), rotated)
    cx, cy = rx + tx, ry + ty
    box = (cx - fside / 2, cy - fside / 2, cx + fside / 2, cy + fside / 2)
    return Scene(np.asarray(canvas, dtype=np.uint8), _int_box(box), species)


def _int_box(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return (round(box[0]), round(box[1]), round(box[2]), round(box[3]))


def camera(
    scene: Scene, cam: CaptureSetting, rng: np.random.Generator, crop: CropSpec = KIOSK_CROP
) -> Scene:
    """The scene as ``cam`` records it: resampled so the face crop has
    ``cam.resolution`` pixels across, blurred, white-balanced, exposed, noisy, JPEG."""
    import io

    h, w = scene.image.shape[:2]
    bw = max(scene.box[2] - scene.box[0], scene.box[3] - scene.box[1])
    crop_side = min(crop.scale * bw, w, h)
    k = max(cam.resolution * rng.uniform(0.85, 1.2), crop.size + 2) / crop_side
    nw, nh = max(8, round(w * k)), max(8, round(h * k))
    im = Image.fromarray(scene.image)
    if cam.blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(cam.blur * rng.uniform(0.7, 1.4) / max(k, 1e-3)))
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:  # in-camera sharpening (phones sharpen hard; LFW's photos are soft)
        im = im.filter(
            ImageFilter.UnsharpMask(
                radius=float(rng.uniform(0.8, 2.5)), percent=int(rng.integers(60, 250)), threshold=2
            )
        )
    arr = np.asarray(im, dtype=np.float32) / 255.0
    # the domain's camera, then per-shot exposure and colour (the same for live and attacks,
    # so neither class can be told by its overall brightness, contrast or colour)
    gains = np.array(cam.gains, dtype=np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    arr = np.clip(arr * gains, 0.0, 1.0) ** (cam.gamma * rng.uniform(0.6, 1.4))
    grey = arr.mean(axis=2, keepdims=True)
    arr = grey + (arr - grey) * rng.uniform(0.6, 1.3)
    arr = 0.5 + (arr - 0.5) * rng.uniform(0.75, 1.2)
    arr = arr * cam.brightness * rng.uniform(0.8, 1.3)
    arr = arr + rng.normal(0.0, cam.noise, arr.shape).astype(np.float32)
    buf = io.BytesIO()
    _pil(arr).save(buf, format="JPEG", quality=int(cam.jpeg_quality))
    buf.seek(0)
    with Image.open(buf) as out:
        rgb = np.asarray(out.convert("RGB"), dtype=np.uint8)
    left, top, right, bottom = (round(v * k) for v in scene.box)
    return Scene(rgb, (left, top, right, bottom), scene.species)


def _people(lfw_root: Path, part: Part) -> list[tuple[str, list[Path]]]:
    if not lfw_root.is_dir():
        raise InvalidArgument(f"no LFW folder at {lfw_root}; set VEILFACE_DATA or pass --lfw")
    out = []
    for person in sorted(p for p in lfw_root.iterdir() if p.is_dir()):
        if person_part(person.name) != part:
            continue
        files = sorted(person.glob("*.jpg"))
        if files:
            out.append((person.name, files))
    return out


def build_kiosk_proxy(
    lfw_root: str | Path,
    *,
    per_domain: int = 800,
    domains: Sequence[CaptureSetting] = KIOSK_DOMAINS,
    validation_fraction: float = 0.25,
    crop: CropSpec = KIOSK_CROP,
    seed: int = 0,
    progress: bool = False,
    renders: int = 1,
) -> PADProxy:
    """Render the training sites' proxy: per domain, half live, a quarter print, a quarter replay.

    Only ``train`` people (:func:`person_part`); a person appears in one
    domain only. ``split`` is 0 (train) or 1 (validation: identities held
    out from training, used to choose the threshold). ``renders`` > 1
    renders each photo that many times, each with its own species, scene
    and camera draw: the same face then appears live and as an attack, so
    only the medium tells them apart (``renders * per_domain`` images a domain).
    """
    if per_domain < 8 or per_domain % 4:
        raise InvalidArgument(f"per_domain must be a multiple of 4 and >= 8, got {per_domain}")
    if renders < 1:
        raise InvalidArgument(f"renders must be >= 1, got {renders}")
    if not 0.0 < validation_fraction < 1.0:
        raise InvalidArgument("validation_fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    people = _people(Path(lfw_root), "train")
    order = rng.permutation(len(people))
    need = per_domain * len(domains)
    found = chunk_photos(((int(pid), people[int(pid)][1]) for pid in order), per_domain, len(domains))
    if found is None:
        raise InvalidArgument(f"{lfw_root} holds too few photos for {len(domains)} x {per_domain}")
    chunks = found
    # backgrounds: any training person's photo, blurred past recognition
    backgrounds = [f for _, files in people for f in files[:1]]
    images, species, domain, split, identity = [], [], [], [], []
    bar = tqdm(total=need * renders, desc="rendering kiosk PAD proxy", unit="img", disable=not progress)
    for d, cam in enumerate(domains):
        chunk = chunks[d]
        ids = sorted({pid for pid, _ in chunk})
        n_val = max(1, int(len(ids) * validation_fraction))
        val_ids = {int(i) for i in rng.choice(ids, size=n_val, replace=False)}
        shots = list(chunk) * renders
        kinds = np.array([0] * (len(shots) // 2) + [1] * (len(shots) // 4) + [2] * (len(shots) // 4))
        rng.shuffle(kinds)
        for (pid, file), kind in zip(shots, kinds, strict=True):
            bg = backgrounds[int(rng.integers(len(backgrounds)))]
            scene = camera(render_scene(int(kind), file, bg, rng), cam, rng, crop)
            images.append(liveness_crop(scene.image, scene.box, crop))
            species.append(int(kind))
            domain.append(d)
            split.append(1 if pid in val_ids else 0)
            identity.append(pid)
            bar.update(1)
    bar.close()
    return PADProxy.from_lists(images, species, domain, split, identity, [c.name for c in domains])


@dataclass(frozen=True)
class BenchSet:
    """Rendered scenes of ``bench`` people for ``veilface bench liveness``."""

    images: list[npt.NDArray[np.uint8]]
    boxes: list[tuple[int, int, int, int]]
    labels: npt.NDArray[np.int8]  # 0 live, 1 print, 2 replay
    people: int


def render_bench_set(
    lfw_root: str | Path,
    *,
    n_people: int = 200,
    seed: int = 1,
    domains: Sequence[CaptureSetting] = KIOSK_DOMAINS,
    progress: bool = False,
) -> BenchSet:
    """Live, print and replay scenes of ``n_people`` ``bench`` people (one of each per person),
    each through a camera drawn from ``domains``; no training used these people."""
    rng = np.random.default_rng(seed)
    people = _people(Path(lfw_root), "bench")
    if len(people) < 2:
        raise InvalidArgument(f"{lfw_root}: too few bench people")
    pick = rng.permutation(len(people))[: min(n_people, len(people))]
    images: list[npt.NDArray[np.uint8]] = []
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    for i in tqdm(pick, desc="rendering bench attacks", unit="person", disable=not progress):
        files = people[int(i)][1]
        other = people[int(rng.integers(len(people)))][1][0]
        for kind in (0, 1, 2):
            cam = domains[int(rng.integers(len(domains)))]
            scene = camera(render_scene(kind, files[kind % len(files)], other, rng), cam, rng)
            images.append(scene.image)
            boxes.append(scene.box)
            labels.append(kind)
    return BenchSet(images, boxes, np.asarray(labels, dtype=np.int8), len(pick))
