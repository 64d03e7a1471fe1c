"""A PROXY incremental-PAD benchmark rendered from LFW faces (no real attack data).

No public PAD data set can be had here, so this module builds a stand-in:
bona fide ("live") images are LFW face crops; attacks are *rendered* from
other LFW faces:

print
    halftone dot screen per channel, paper colour cast and reduced ink
    dynamic range, desaturation, multiplicative paper-fibre texture.
replay
    screen gamma and contrast, RGB sub-pixel grid, moiré (beat of two
    rotated gratings), a specular glare blob, a cool screen white point.

Each *domain* is a different capture setting applied to live and attack
images alike (resolution, blur, colour gains, brightness/gamma, sensor noise,
JPEG quality), loosely in the spirit of the M -> C -> I -> O protocol
(MSU-MFSD, CASIA-FASD, Idiap Replay-Attack, OULU-NPU); the domains use
disjoint LFW identities. Nothing here claims to reproduce those data sets:
the numbers it yields are **proxy** numbers.

:func:`image_statistics` and :func:`compare_with_real_samples` put simple
statistics of the rendered classes beside those of the real photos in
``pad-samples/`` (``image_T*`` live, ``image_F1`` print, ``image_F2`` replay).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

__all__ = [
    "CAPTURE_DOMAINS",
    "SPECIES",
    "CaptureSetting",
    "PADProxy",
    "build_pad_proxy",
    "capture",
    "compare_with_real_samples",
    "image_statistics",
    "load_pad_proxy",
    "render_print",
    "render_replay",
]

SPECIES: tuple[str, ...] = ("live", "print", "replay")
"""Species codes: index 0 = bona fide, 1 = print attack, 2 = replay attack."""

_RENDER = 96  # side at which attacks are rendered, before the capture resamples
FloatImage = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CaptureSetting:
    """One domain's camera and scene (applied to every image of the domain).

    Attributes
    ----------
    name : str
    resolution : int
        Side the sensor resolves before resizing to the output size.
    blur : float
        Gaussian blur radius in pixels at render size (defocus / motion).
    gains : tuple[float, float, float]
        White-balance gains for R, G, B.
    gamma : float
        Exposure curve ``x ** gamma`` (> 1 darker).
    brightness : float
        Multiplier after gamma.
    noise : float
        Sensor noise std (fraction of full scale).
    jpeg_quality : int
        JPEG quality of the stored frame (1-95).
    """

    name: str
    resolution: int
    blur: float
    gains: tuple[float, float, float]
    gamma: float
    brightness: float
    noise: float
    jpeg_quality: int


CAPTURE_DOMAINS: tuple[CaptureSetting, ...] = (
    CaptureSetting("M-like laptop webcam, warm", 40, 0.8, (1.15, 1.0, 0.8), 1.0, 1.05, 0.02, 75),
    CaptureSetting("C-like low-res USB camera", 24, 0.6, (0.95, 1.05, 0.95), 0.9, 1.0, 0.05, 35),
    CaptureSetting("I-like dim indoor, cool", 48, 0.4, (0.8, 0.95, 1.2), 1.6, 0.7, 0.035, 70),
    CaptureSetting("O-like phone, bright", 96, 0.2, (1.05, 0.95, 1.05), 0.75, 1.2, 0.01, 92),
)


@dataclass
class PADProxy:
    """The rendered proxy set (all arrays aligned on the first axis).

    Attributes
    ----------
    images : numpy.ndarray
        ``(N, S, S, 3)`` uint8 RGB.
    species : numpy.ndarray
        ``(N,)`` int8, index into :data:`SPECIES` (0 = live).
    domain : numpy.ndarray
        ``(N,)`` int8 domain index into ``domain_names``.
    split : numpy.ndarray
        ``(N,)`` int8, 0 = train, 1 = test.
    identity : numpy.ndarray
        ``(N,)`` int32 index of the LFW person (disjoint across domains).
    domain_names : list[str]
    """

    images: npt.NDArray[np.uint8]
    species: npt.NDArray[np.int8]
    domain: npt.NDArray[np.int8]
    split: npt.NDArray[np.int8]
    identity: npt.NDArray[np.int32]
    domain_names: list[str]

    @classmethod
    def from_lists(
        cls,
        images: Sequence[npt.NDArray[np.uint8]],
        species: Sequence[int],
        domain: Sequence[int],
        split: Sequence[int],
        identity: Sequence[int],
        domain_names: Sequence[str],
    ) -> PADProxy:
        """Stack per-image lists into the aligned arrays (dtypes as documented above)."""
        return cls(
            images=np.stack(images),
            species=np.asarray(species, dtype=np.int8),
            domain=np.asarray(domain, dtype=np.int8),
            split=np.asarray(split, dtype=np.int8),
            identity=np.asarray(identity, dtype=np.int32),
            domain_names=list(domain_names),
        )

    @property
    def labels(self) -> npt.NDArray[np.int8]:
        """``(N,)`` int8, 1 = bona fide, 0 = attack."""
        out: npt.NDArray[np.int8] = (self.species == 0).astype(np.int8)
        return out

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` file (uncompressed)."""
        np.savez(
            Path(path),
            images=self.images,
            species=self.species,
            domain=self.domain,
            split=self.split,
            identity=self.identity,
            domain_names=np.array(self.domain_names),
        )


def load_pad_proxy(path: str | Path) -> PADProxy:
    """Read a file written by :meth:`PADProxy.save`.

    Raises
    ------
    InvalidArgument
        Missing file or missing arrays.
    """
    file = Path(path)
    if not file.is_file():
        raise InvalidArgument(f"no PAD proxy file at {file}; build one with build_pad_proxy()")
    with np.load(file, allow_pickle=False) as z:
        need = ("images", "species", "domain", "split", "identity", "domain_names")
        if any(k not in z for k in need):
            raise InvalidArgument(f"{file} is not a PAD proxy file (needs arrays {need})")
        return PADProxy(
            images=z["images"],
            species=z["species"],
            domain=z["domain"],
            split=z["split"],
            identity=z["identity"],
            domain_names=[str(s) for s in z["domain_names"]],
        )


def _to_float(img: Image.Image) -> FloatImage:
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _to_pil(arr: FloatImage) -> Image.Image:
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _grid(size: int) -> tuple[FloatImage, FloatImage]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def render_print(
    face: FloatImage, rng: np.random.Generator, *, with_medium: bool = True
) -> FloatImage:
    """Render a printed-photo attack of ``face``.

    Parameters
    ----------
    face : numpy.ndarray
        ``(S, S, 3)`` float32 RGB in ``[0, 1]``.
    rng : numpy.random.Generator
    with_medium : bool, keyword-only
        Whether the sheet's edge may show (shrinking the face onto a
        surround); the kiosk proxy draws its own media and turns it off.

    Returns
    -------
    numpy.ndarray
        ``(S, S, 3)`` float32 in ``[0, 1]``.
    """
    s = face.shape[0]
    yy, xx = _grid(s)
    # desaturate toward grey and compress the ink range (paper white, ink black)
    grey = face.mean(axis=2, keepdims=True)
    img = grey + (face - grey) * rng.uniform(0.35, 0.65)
    img = 0.5 + (img - 0.5) * rng.uniform(0.7, 0.85)  # ink on paper: less contrast
    # halftone: per channel, a dot screen at its own angle; ink coverage vs threshold
    cell = rng.uniform(3.0, 4.5)
    out = np.empty_like(img)
    for c, angle in enumerate((15.0, 75.0, 0.0)):
        a = np.deg2rad(angle + rng.uniform(-5, 5))
        u = (xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / cell
        v = (-xx * np.sin(a) + yy * np.cos(a)) * 2 * np.pi / cell
        screen = 0.5 + 0.25 * (np.cos(u) + np.cos(v))  # in [0, 1]
        dots = 1.0 / (1.0 + np.exp(-(img[..., c] - screen) * 12.0))
        out[..., c] = 0.55 * img[..., c] + 0.45 * dots
    paper = np.array([1.0, 0.97, 0.88], dtype=np.float32) * rng.uniform(0.9, 1.0)
    black = rng.uniform(0.08, 0.16)
    out = black + (paper - black) * out
    # paper fibre texture: smoothed noise, multiplicative
    fibre = rng.normal(0.0, 1.0, (s, s)).astype(np.float32)
    fibre = (
        np.asarray(
            _to_pil(np.repeat((fibre[..., None] * 0.15 + 0.5), 3, axis=2)).filter(
                ImageFilter.GaussianBlur(1.2)
            ),
            dtype=np.float32,
        )[..., 0]
        / 255.0
    )
    out = out * (1.0 + (fibre[..., None] - 0.5) * 0.35)
    if with_medium and rng.random() < 0.4:  # the sheet's edge (as in pad-samples image_F1)
        out = _on_medium(out, np.array([0.55, 0.5, 0.45], dtype=np.float32), rng)
    result: FloatImage = np.clip(out, 0.0, 1.0).astype(np.float32)
    return result


def _on_medium(img: FloatImage, surround: FloatImage, rng: np.random.Generator) -> FloatImage:
    """Shrink ``img`` onto a medium seen with its surround (paper edge or bezel)."""
    s = img.shape[0]
    scale = rng.uniform(0.75, 0.9)
    inner = max(8, int(s * scale))
    small = (
        np.asarray(_to_pil(img).resize((inner, inner), Image.Resampling.BILINEAR), dtype=np.float32)
        / 255.0
    )
    out = np.empty_like(img)
    out[...] = surround * rng.uniform(0.6, 1.1)
    top, left = rng.integers(0, s - inner + 1, 2)
    out[top : top + inner, left : left + inner] = small
    return out


def render_replay(
    face: FloatImage, rng: np.random.Generator, *, with_medium: bool = True
) -> FloatImage:
    """Render a screen-replay attack of ``face`` (same arguments as :func:`render_print`)."""
    s = face.shape[0]
    yy, xx = _grid(s)
    # screen gamma / contrast and a cool white point
    img = face ** rng.uniform(0.6, 0.8)
    img = 0.5 + (img - 0.5) * rng.uniform(1.1, 1.3)
    img = img * np.array([0.92, 0.98, 1.1], dtype=np.float32)
    # sub-pixel grid: columns tinted R, G, B in turn
    period = 3
    sub = np.stack([((xx.astype(np.int32) % period) == c) for c in range(3)], axis=2)
    img = img * (0.88 + 0.24 * sub.astype(np.float32))
    # moiré: beat of two gratings at slightly different frequency and angle
    f1, f2 = rng.uniform(0.35, 0.5), rng.uniform(0.3, 0.45)
    a1, a2 = rng.uniform(0, np.pi), rng.uniform(0, np.pi)
    g1 = np.cos(2 * np.pi * f1 * (xx * np.cos(a1) + yy * np.sin(a1)))
    g2 = np.cos(2 * np.pi * f2 * (xx * np.cos(a2) + yy * np.sin(a2)))
    img = img + (0.14 * g1 * g2)[..., None]
    # glare: a soft specular blob
    cy, cx = rng.uniform(0.1, 0.9, 2) * s
    r = rng.uniform(0.12, 0.3) * s
    glare = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) * rng.uniform(0.35, 0.7)
    img = img + glare[..., None]
    if with_medium and rng.random() < 0.4:  # the bezel (as in pad-samples image_F2)
        img = _on_medium(img, np.array([0.06, 0.06, 0.07], dtype=np.float32), rng)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def capture(
    img: FloatImage, setting: CaptureSetting, out_size: int, rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """Pass an image through a domain's camera: blur, resolution, colour, noise, JPEG.

    Parameters
    ----------
    img : numpy.ndarray
        ``(S, S, 3)`` float32 in ``[0, 1]``.
    setting : CaptureSetting
    out_size : int
        Output side.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        ``(out_size, out_size, 3)`` uint8.
    """
    pil = _to_pil(img)
    if setting.blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(setting.blur * rng.uniform(0.8, 1.2)))
    pil = pil.resize((setting.resolution,) * 2, Image.Resampling.BILINEAR)
    arr = _to_float(pil)
    arr = np.clip(arr * np.array(setting.gains, dtype=np.float32), 0.0, 1.0) ** setting.gamma
    arr = arr * setting.brightness * rng.uniform(0.92, 1.08)
    arr = arr + rng.normal(0.0, setting.noise, arr.shape).astype(np.float32)
    buf = io.BytesIO()
    _to_pil(arr).save(buf, format="JPEG", quality=setting.jpeg_quality)
    buf.seek(0)
    out = Image.open(buf).convert("RGB").resize((out_size,) * 2, Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def _face_crop(path: Path) -> FloatImage:
    """LFW deep-funneled 250x250 -> central face crop at render size."""
    with Image.open(path) as raw:
        im = raw.convert("RGB")
        w, h = im.size
        side = int(min(w, h) * 0.5)
        left, top = (w - side) // 2, (h - side) // 2 + int(h * 0.02)
        crop = im.crop((left, top, left + side, top + side))
        return _to_float(crop.resize((_RENDER, _RENDER), Image.Resampling.BILINEAR))


def chunk_photos(
    people: Iterable[tuple[int, Sequence[Path]]], per_domain: int, n_domains: int
) -> list[list[tuple[int, Path]]] | None:
    """``n_domains`` chunks of ``per_domain`` (person id, photo) pairs, people in the given order.

    Up to two photos per person; a person's photos never straddle two
    domains except where the last person of a chunk is cut to fill it.
    ``None`` when the people hold too few photos.
    """
    chunks: list[list[tuple[int, Path]]] = []
    current: list[tuple[int, Path]] = []
    for pid, files in people:
        current += [(int(pid), f) for f in files[:2]][: per_domain - len(current)]
        if len(current) == per_domain:
            chunks.append(current)
            current = []
            if len(chunks) == n_domains:
                return chunks
    return None


def build_pad_proxy(
    lfw_root: str | Path,
    *,
    per_domain: int = 240,
    image_size: int = 64,
    domains: Sequence[CaptureSetting] = CAPTURE_DOMAINS,
    test_fraction: float = 0.35,
    seed: int = 0,
) -> PADProxy:
    """Render the proxy: per domain, half live and a quarter each print and replay.

    Parameters
    ----------
    lfw_root : str or pathlib.Path
        ``lfw/<Name>/<Name>_NNNN.jpg``.
    per_domain : int, keyword-only
        Images per domain (a multiple of 4), one LFW photo each.
    image_size : int, keyword-only
        Output side in pixels.
    domains : sequence of CaptureSetting, keyword-only
    test_fraction : float, keyword-only
        Fraction of each domain's identities held out for testing.
    seed : int, keyword-only

    Returns
    -------
    PADProxy

    Raises
    ------
    InvalidArgument
        Bad arguments, a missing LFW folder, or too few photos.
    """
    root = Path(lfw_root)
    if not root.is_dir():
        raise InvalidArgument(f"no LFW folder at {root}; set VEILFACE_DATA or pass --lfw")
    if per_domain < 8 or per_domain % 4:
        raise InvalidArgument(f"per_domain must be a multiple of 4 and >= 8, got {per_domain}")
    if not domains:
        raise InvalidArgument("at least one capture domain is needed")
    if not 0.0 < test_fraction < 1.0:
        raise InvalidArgument(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    people = sorted(p for p in root.iterdir() if p.is_dir())
    rng.shuffle(people)  # type: ignore[arg-type,unused-ignore]
    photos: list[list[Path]] = []
    for person in people:
        files = sorted(person.glob("*.jpg"))
        if files:
            photos.append(files)
    chunks = chunk_photos(enumerate(photos), per_domain, len(domains))
    if chunks is None:
        raise InvalidArgument(
            f"{root} holds too few photos for {len(domains)} domains of {per_domain} "
            "(lower per_domain)"
        )
    images: list[npt.NDArray[np.uint8]] = []
    species: list[int] = []
    domain: list[int] = []
    split: list[int] = []
    identity: list[int] = []
    for d, setting in enumerate(domains):
        chunk = chunks[d]
        ids = sorted({pid for pid, _ in chunk})
        test_ids = set(rng.choice(ids, size=max(1, int(len(ids) * test_fraction)), replace=False))
        kinds = np.array(
            [0] * (per_domain // 2) + [1] * (per_domain // 4) + [2] * (per_domain // 4)
        )
        rng.shuffle(kinds)
        for (pid, file), kind in zip(chunk, kinds, strict=True):
            face = _face_crop(file)
            if kind == 1:
                face = render_print(face, rng)
            elif kind == 2:
                face = render_replay(face, rng)
            images.append(capture(face, setting, image_size, rng))
            species.append(int(kind))
            domain.append(d)
            split.append(1 if pid in test_ids else 0)
            identity.append(pid)
    return PADProxy.from_lists(images, species, domain, split, identity, [s.name for s in domains])


STAT_NAMES: tuple[str, ...] = (
    "saturation",
    "contrast",
    "high_freq_energy",
    "spectral_peakiness",
    "specular_fraction",
)


def image_statistics(image: npt.NDArray[np.uint8], *, size: int = 96) -> dict[str, float]:
    """Simple image statistics used to compare rendered and real attacks.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB; its central square is resized to ``size``.

    Returns
    -------
    dict[str, float]
        ``saturation`` (mean HSV S), ``contrast`` (std of grey),
        ``high_freq_energy`` (share of spectral energy above half Nyquist),
        ``spectral_peakiness`` (max / median of the mid-band magnitude
        spectrum: periodic patterns such as halftone or moiré raise it),
        ``specular_fraction`` (pixels bright and unsaturated: glare).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidArgument(f"image must be (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pil = Image.fromarray(image[top : top + side, left : left + side]).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    hsv = np.asarray(pil.convert("HSV"), dtype=np.float32) / 255.0
    grey = np.asarray(pil.convert("L"), dtype=np.float32) / 255.0
    spec = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean())))
    yy, xx = np.mgrid[0:size, 0:size]
    radius = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    energy = spec**2
    mid = spec[(radius > 0.25) & (radius < 1.0)]
    return {
        "saturation": float(hsv[..., 1].mean()),
        "contrast": float(grey.std()),
        "high_freq_energy": float(energy[radius > 0.5].sum() / max(energy.sum(), 1e-12)),
        "spectral_peakiness": float(mid.max() / max(float(np.median(mid)), 1e-12)),
        "specular_fraction": float(((hsv[..., 2] > 0.92) & (hsv[..., 1] < 0.15)).mean()),
    }


def _mean_stats(images: Sequence[npt.NDArray[np.uint8]]) -> dict[str, float]:
    rows = [image_statistics(im) for im in images]
    return {k: float(np.mean([r[k] for r in rows])) for k in STAT_NAMES}


def compare_with_real_samples(
    proxy: PADProxy, samples_dir: str | Path, *, max_per_class: int = 60
) -> dict[str, dict[str, dict[str, float]]]:
    """Statistics of rendered live/print/replay beside the real pad-samples photos.

    Parameters
    ----------
    proxy : PADProxy
    samples_dir : str or pathlib.Path
        Holds ``image_T*.jpg`` (live), ``image_F1.jpg`` (print), ``image_F2.jpg`` (replay).
    max_per_class : int, keyword-only
        Rendered images per class averaged.

    Returns
    -------
    dict
        ``{"proxy": {species: stats}, "real": {species: stats}}``.

    Raises
    ------
    InvalidArgument
        The folder or one of the photos is missing.
    """
    folder = Path(samples_dir)
    live_files = sorted(folder.glob("image_T*.jpg"))
    files = {
        "live": live_files,
        "print": [folder / "image_F1.jpg"],
        "replay": [folder / "image_F2.jpg"],
    }
    if not live_files or not all(f.is_file() for fs in files.values() for f in fs):
        raise InvalidArgument(
            f"{folder} must hold image_T*.jpg, image_F1.jpg and image_F2.jpg (pad-samples)"
        )
    real: dict[str, dict[str, float]] = {}
    for name, fs in files.items():
        arrays = []
        for f in fs:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        real[name] = _mean_stats(arrays)
    rendered: dict[str, dict[str, float]] = {}
    for code, name in enumerate(SPECIES):
        idx = np.flatnonzero(proxy.species == code)[:max_per_class]
        if idx.size:
            rendered[name] = _mean_stats([proxy.images[i] for i in idx])
    return {"proxy": rendered, "real": real}
