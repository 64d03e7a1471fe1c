"""A PROXY visible-infrared ReID set built from LFW faces (not a real VI-ReID data set).

No public VI-ReID set (SYSU-MM01, RegDB, LLCM) can be had on this machine, so
the federated VI-ReID code is exercised on a proxy:

- **identities** = LFW people with at least ``min_images`` photos;
  disjoint train and test identities (the usual ReID protocol);
- **visible** = the colour photo;
- **infrared** = a synthetic thermal rendering of a *different* photo of the
  person (:func:`thermal_render`): a warm-skin weighted luminance, blurred,
  contrast-compressed, partly inverted and noisy, one channel repeated 3x;
- **cameras** = distinct capture transforms (:data:`PROXY_CAMERAS`): zoom and
  offset, colour cast, blur, gamma, noise, per camera. Cameras 1-2 are
  visible and 3-4 infrared, as SYSU-MM01 mixes RGB and IR cameras.

By default (``paired=True``) the cameras form dual visible/infrared rigs,
as RegDB's co-registered captures do: each photo is rendered by one visible
and one infrared camera (round robin within each modality), each with its
own crop, zoom, blur and noise. With ``paired=False`` each photo goes to one
camera only (harder: a match must also bridge different photos). Query =
infrared test images, gallery = visible test images.

Files written by :func:`build_proxy` under ``out_dir``::

    manifest.json   config, identities, camera specs, counts
    train.npz       images (N, S, S, 3) uint8, pids (N,) int64, camids (N,) int64
    test.npz        same for the test identities

LFW: Huang et al. 2007 (technical report 07-49), deep funneling Huang et al. 2012.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from veilface.errors import InvalidArgument
from veilface.federated.vireid.datasets import DatasetLayoutError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PROXY_DIR",
    "PROTOCOLS",
    "PROXY_CAMERAS",
    "PROXY_VERSION",
    "CameraSpec",
    "ProxyConfig",
    "ReIDArrays",
    "build_proxy",
    "load_proxy",
    "partition",
    "proxy_query_gallery",
    "thermal_render",
]

PROXY_VERSION = 3  # rendering version, part of the cache key
DEFAULT_PROXY_DIR = Path.home() / ".cache" / "veilface" / "vireid-proxy"
"""Where the VI-ReID task builds and reads the proxy when run-config ``data-dir`` is empty."""
PROTOCOLS: tuple[str, ...] = ("camera-isolation", "entity-isolation", "entity-sharing")


@dataclass(frozen=True)
class CameraSpec:
    """One proxy camera's capture transform.

    Attributes
    ----------
    camid : int
        1-based camera id.
    modality : {"visible", "infrared"}
    zoom : float
        Side of the face crop as a fraction of the 250-px LFW frame.
    shift : tuple of float
        Crop centre offset (x, y) as a fraction of the frame.
    cast : tuple of float
        Per-channel RGB gains (visible) or a scalar gain in ``cast[0]`` (infrared).
    gamma : float
        Output gamma.
    blur : float
        Gaussian blur sigma in output pixels.
    noise : float
        Gaussian noise sigma on the 0..1 scale.
    """

    camid: int
    modality: str
    zoom: float
    shift: tuple[float, float]
    cast: tuple[float, float, float]
    gamma: float
    blur: float
    noise: float


PROXY_CAMERAS: tuple[CameraSpec, ...] = (
    CameraSpec(1, "visible", 0.50, (0.00, 0.00), (1.00, 1.00, 1.00), 1.00, 0.0, 0.010),
    CameraSpec(2, "visible", 0.60, (0.03, -0.02), (1.10, 0.95, 0.80), 0.85, 0.7, 0.025),
    CameraSpec(3, "infrared", 0.52, (-0.02, 0.02), (1.00, 1.00, 1.00), 1.00, 0.8, 0.030),
    CameraSpec(4, "infrared", 0.62, (0.02, 0.03), (0.85, 0.85, 0.85), 1.25, 1.2, 0.045),
)


@dataclass(frozen=True)
class ProxyConfig:
    """Size and seed of the proxy (``fingerprint`` keys the on-disk cache; bump
    :data:`PROXY_VERSION` when the rendering changes).

    Attributes
    ----------
    num_train_ids, num_test_ids : int
        Disjoint identity counts.
    min_images : int
        People with fewer LFW photos are not used (>= 2, default 4 so every
        camera sees each person once).
    max_images : int
        At most this many photos per person.
    image_size : int
        Side of the square output images.
    seed : int
        Identity selection and noise.
    cameras : tuple of CameraSpec
    paired : bool
        True (default, like RegDB's co-registered captures): every photo is
        seen by one visible *and* one infrared camera (round robin within
        each modality), so a person's infrared image has a visible
        counterpart of the same moment, taken with another camera's
        geometry. False: every photo goes to exactly one camera, so
        matching must bridge different photos too (much harder).
    """

    num_train_ids: int = 150
    num_test_ids: int = 60
    min_images: int = 4
    max_images: int = 8
    image_size: int = 64
    seed: int = 0
    cameras: tuple[CameraSpec, ...] = field(default=PROXY_CAMERAS)
    paired: bool = True

    def __post_init__(self) -> None:
        mods = {c.modality for c in self.cameras}
        if mods != {"visible", "infrared"}:
            raise InvalidArgument("the proxy needs at least one visible and one infrared camera")
        if self.num_train_ids < 1 or self.num_test_ids < 1 or self.min_images < 2:
            raise InvalidArgument("need >= 1 train and test identity and min_images >= 2")

    def fingerprint(self) -> str:
        """Short hash of the configuration and :data:`PROXY_VERSION` (cache key)."""
        spec = json.dumps({"v": PROXY_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(spec.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ReIDArrays:
    """Images with labels.

    Attributes
    ----------
    images : numpy.ndarray
        ``(N, S, S, 3)`` uint8 RGB (infrared: three equal channels).
    pids : numpy.ndarray
        ``(N,)`` int64 person ids (global over the proxy).
    camids : numpy.ndarray
        ``(N,)`` int64 camera ids.
    modalities : numpy.ndarray
        ``(N,)`` int64, index into ``("visible", "infrared")``.
    """

    images: npt.NDArray[np.uint8]
    pids: npt.NDArray[np.int64]
    camids: npt.NDArray[np.int64]
    modalities: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.pids.shape[0])

    def subset(self, mask: npt.NDArray[np.bool_]) -> ReIDArrays:
        """Rows where ``mask`` is true."""
        return ReIDArrays(
            self.images[mask], self.pids[mask], self.camids[mask], self.modalities[mask]
        )


# --------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------


def _gaussian_blur(img: npt.NDArray[np.float32], sigma: float) -> npt.NDArray[np.float32]:
    """Separable Gaussian blur of an ``(H, W, C)`` float image (reflect padding)."""
    if sigma <= 0:
        return img
    radius = max(1, round(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    h, w = img.shape[:2]
    pad = np.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    rows = np.zeros_like(img)
    for i in range(k.size):
        rows += k[i] * pad[i : i + h]
    pad = np.pad(rows, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    out = np.zeros_like(img)
    for i in range(k.size):
        out += k[i] * pad[:, i : i + w]
    return out.astype(np.float32)


def thermal_render(rgb: npt.NDArray[np.float32], rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Synthetic thermal look of a colour face (a PROXY of an infrared camera).

    Skin (red-dominant) reads warm, hair and background cool: a red-weighted
    luminance, heavy blur (thermal optics are soft), compressed contrast with
    a partial inversion of the darkest (cool) regions, sensor noise.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` float32 in ``[0, 1]``.
    rng : numpy.random.Generator
        Noise source.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` float32 in ``[0, 1]``, three equal channels.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    warmth = np.clip(0.75 * r + 0.35 * g - 0.25 * b + 0.3 * (r - g), 0.0, 1.0)
    heat = _gaussian_blur(warmth[..., None], 1.5)[..., 0]
    heat = 0.15 + 0.7 * heat**0.8  # compressed dynamic range
    cool = heat < 0.35
    heat = np.where(cool, 0.5 - 0.6 * (heat - 0.15), heat)  # partial inversion of cool regions
    heat = heat + rng.normal(0.0, 0.02, heat.shape).astype(np.float32)
    heat = np.clip(heat, 0.0, 1.0).astype(np.float32)
    return np.repeat(heat[..., None], 3, axis=2)


def _capture(
    photo: npt.NDArray[np.uint8], cam: CameraSpec, size: int, rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """Apply a camera's transform to one ``(250, 250, 3)`` LFW photo -> ``(size, size, 3)``."""
    from PIL import Image

    h, w = photo.shape[:2]
    side = cam.zoom * min(h, w)
    cx = w / 2 + cam.shift[0] * w + rng.uniform(-0.01, 0.01) * w
    cy = h / 2 + cam.shift[1] * h + rng.uniform(-0.01, 0.01) * h
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    crop = Image.fromarray(photo).resize((size, size), Image.Resampling.BILINEAR, box=box)
    img = np.asarray(crop, dtype=np.float32) / 255.0
    if cam.modality == "infrared":
        img = thermal_render(img, rng) * cam.cast[0]
    else:
        img = img * np.asarray(cam.cast, dtype=np.float32)
    img = _gaussian_blur(np.clip(img, 0, 1).astype(np.float32), cam.blur)
    img = np.clip(img, 0, 1) ** cam.gamma
    # infrared sensors have one channel: the same noise on the three copies
    noise_shape = img.shape[:2] + ((1,) if cam.modality == "infrared" else (3,))
    img = img + rng.normal(0.0, cam.noise, noise_shape).astype(np.float32)
    out: npt.NDArray[np.uint8] = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out


# --------------------------------------------------------------------------
# build / load
# --------------------------------------------------------------------------


def _select_people(lfw_root: Path, config: ProxyConfig) -> list[tuple[str, list[Path]]]:
    if not lfw_root.is_dir():
        raise DatasetLayoutError(
            f"LFW folder {lfw_root} does not exist; pass the folder holding <Name>/<Name>_NNNN.jpg "
            "(e.g. ../shared/data/lfw, or set VEILFACE_DATA)"
        )
    people: list[tuple[str, list[Path]]] = []
    for person in sorted(p for p in lfw_root.iterdir() if p.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        if len(photos) >= config.min_images:
            people.append((person.name, photos[: config.max_images]))
    need = config.num_train_ids + config.num_test_ids
    if len(people) < need:
        raise DatasetLayoutError(
            f"{lfw_root} has {len(people)} people with >= {config.min_images} .jpg photos in "
            f"<Name>/ folders; the proxy needs {need}. Lower num_train_ids/num_test_ids or "
            "min_images, or point at a complete LFW copy"
        )
    order = np.random.default_rng(config.seed).permutation(len(people))[:need]
    return [people[i] for i in sorted(order)]


def _render(
    people: Sequence[tuple[str, list[Path]]],
    pid_offset: int,
    config: ProxyConfig,
    rng: np.random.Generator,
) -> ReIDArrays:
    from PIL import Image, UnidentifiedImageError

    images: list[npt.NDArray[np.uint8]] = []
    pids: list[int] = []
    cams: list[int] = []
    mods: list[int] = []
    visible = [c for c in config.cameras if c.modality == "visible"]
    infrared = [c for c in config.cameras if c.modality == "infrared"]
    for k, (_, photos) in enumerate(people):
        for j, path in enumerate(photos):
            if config.paired:  # a dual rig: one visible and one infrared camera see each moment
                rig = [visible[j % len(visible)], infrared[j % len(infrared)]]
            else:
                rig = [config.cameras[j % len(config.cameras)]]
            try:
                with Image.open(path) as im:
                    photo = np.asarray(im.convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                raise DatasetLayoutError(
                    f"cannot read LFW image {path}: {exc}; remove or replace the file"
                ) from exc
            for cam in rig:
                images.append(_capture(photo, cam, config.image_size, rng))
                pids.append(pid_offset + k)
                cams.append(cam.camid)
                mods.append(0 if cam.modality == "visible" else 1)
    return ReIDArrays(
        np.stack(images),
        np.asarray(pids, dtype=np.int64),
        np.asarray(cams, dtype=np.int64),
        np.asarray(mods, dtype=np.int64),
    )


def _save_npz(path: Path, data: ReIDArrays) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                images=data.images,
                pids=data.pids,
                camids=data.camids,
                modalities=data.modalities,
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_proxy(
    lfw_root: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: ProxyConfig
) -> Path:
    """Render the proxy into ``out_dir`` (reused when already built with the same config).

    Parameters
    ----------
    lfw_root : str or Path
        LFW folder (``<Name>/<Name>_NNNN.jpg``).
    out_dir : str or Path
        Output folder, created if missing.
    config : ProxyConfig

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    DatasetLayoutError
        Missing LFW folder, too few people, unreadable image.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.json"
    if manifest.is_file() and (out / "train.npz").is_file() and (out / "test.npz").is_file():
        try:
            if json.loads(manifest.read_text()).get("fingerprint") == config.fingerprint():
                logger.info("proxy already built in %s", out)
                return out
        except ValueError:
            pass
    people = _select_people(Path(lfw_root), config)
    rng = np.random.default_rng(config.seed + 1)
    train_people = people[: config.num_train_ids]
    test_people = people[config.num_train_ids :]
    train = _render(train_people, 0, config, rng)
    test = _render(test_people, config.num_train_ids, config, rng)
    _save_npz(out / "train.npz", train)
    _save_npz(out / "test.npz", test)
    info = {
        "proxy": "LFW-VI-proxy (synthetic thermal, NOT a real VI-ReID set)",
        "fingerprint": config.fingerprint(),
        "config": asdict(config),
        "train_people": [name for name, _ in train_people],
        "test_people": [name for name, _ in test_people],
        "train_images": len(train),
        "test_images": len(test),
    }
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, manifest)
    logger.info("proxy built in %s: %d train, %d test images", out, len(train), len(test))
    return out


def load_proxy(out_dir: str | os.PathLike[str], split: str) -> ReIDArrays:
    """Read ``train`` or ``test`` arrays written by :func:`build_proxy`.

    Raises
    ------
    DatasetLayoutError
        The folder or file is missing or malformed.
    """
    if split not in ("train", "test"):
        raise InvalidArgument(f"split must be 'train' or 'test', got {split!r}")
    path = Path(out_dir) / f"{split}.npz"
    if not path.is_file():
        raise DatasetLayoutError(
            f"{path} does not exist; build the proxy first (veilface fed bench --task vireid, "
            "or veilface.federated.vireid.proxy.build_proxy)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            data = ReIDArrays(
                z["images"].astype(np.uint8, copy=False),
                z["pids"].astype(np.int64, copy=False),
                z["camids"].astype(np.int64, copy=False),
                z["modalities"].astype(np.int64, copy=False),
            )
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetLayoutError(f"{path} is not a proxy array file: {exc}; rebuild it") from exc
    n = len(data)
    if (
        data.images.ndim != 4
        or data.images.shape[0] != n
        or data.images.shape[3] != 3
        or data.camids.shape != (n,)
        or data.modalities.shape != (n,)
    ):
        raise DatasetLayoutError(f"{path} has inconsistent array shapes; rebuild it")
    return data


def partition(
    data: ReIDArrays, protocol: str, partition_id: int, num_partitions: int
) -> ReIDArrays:
    """The training rows one client (site) holds under a protocol.

    - ``camera-isolation``: client ``i`` holds camera ``sorted(camids)[i]``
      only (so one modality); ``num_partitions`` must equal the camera count.
    - ``entity-isolation``: identities are split into ``num_partitions``
      disjoint groups (entities, like separate organisations); each holds
      all cameras of its identities. The test identities are a further,
      left-out entity.
    - ``entity-sharing``: every client holds all cameras, and identities are
      shared: rows are dealt to the clients in a fixed random order.

    Raises
    ------
    InvalidArgument
        Unknown protocol, bad partition id, or a camera-count mismatch.
    """
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if not 0 <= partition_id < num_partitions:
        raise InvalidArgument(f"partition-id {partition_id} not in 0..{num_partitions - 1}")
    if protocol == "camera-isolation":
        cams = np.unique(data.camids)
        if num_partitions != cams.size:
            raise InvalidArgument(
                f"camera isolation needs one client per camera: {cams.size} cameras "
                f"{cams.tolist()} but {num_partitions} clients; start {cams.size} SuperNodes "
                f"(veilface fed deploy-local starts as many as the protocol needs; simulation: "
                f"options.num-supernodes = {cams.size}) or use protocol='entity-isolation'"
            )
        return data.subset(data.camids == cams[partition_id])
    if protocol == "entity-isolation":
        pids = np.unique(data.pids)
        mine = pids[partition_id::num_partitions]
        return data.subset(np.isin(data.pids, mine))
    # entity-sharing: rows dealt to clients in a fixed random order (identities and
    # both modalities spread over every client)
    order = np.random.default_rng(0).permutation(len(data))
    client = np.empty(len(data), dtype=np.int64)
    client[order] = np.arange(len(data)) % num_partitions
    return data.subset(client == partition_id)


def proxy_query_gallery(test: ReIDArrays) -> tuple[ReIDArrays, ReIDArrays]:
    """Infrared-to-visible search: query = infrared rows, gallery = visible rows."""
    query = test.subset(test.modalities == 1)
    gallery = test.subset(test.modalities == 0)
    if len(query) == 0 or len(gallery) == 0:
        raise DatasetLayoutError("the proxy test split needs both infrared and visible images")
    return query, gallery
