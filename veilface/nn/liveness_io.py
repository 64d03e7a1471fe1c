"""The liveness model's file format and input crop (numpy and Pillow; no torch).

Shared by the federated trainer, which writes the artifact
(``veilface fed train --task pad --export liveness.vfpad``), and the client's
liveness gate, which reads it. Both must cut the face the same way, so the
crop lives here too.

A ``.vfpad`` file is a ZIP archive of two members:

``manifest.json``
    ``format`` (``"veilface-liveness"``), ``format_version`` (1),
    ``architecture`` (name, model id and configuration), ``input`` (crop
    scale, side, colour order, normalisation), ``threshold`` (on P(live):
    a face scoring below it is an attack) and ``threshold_rule`` (the BPCER
    it was chosen at, on which data, with the APCER there), ``training``
    (run id, rounds, sites, domains, data description, whether proxy data),
    ``weights_sha256`` and ``fingerprint``.
``weights.npz``
    The state arrays, float32, no pickles.

The fingerprint is the SHA-256 of the canonical manifest (without the
fingerprint itself) followed by the weights' bytes: it names one trained
model, and any change to either part shows. Reading checks sizes before
decompressing (a ZIP bomb is refused), then the format, version, digest
and fingerprint; a file that fails any check raises
:class:`LivenessModelInvalid` and nothing is half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veilface.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CropSpec",
    "LivenessArtifact",
    "LivenessModelInvalid",
    "liveness_crop",
    "read_artifact",
    "write_artifact",
]

FORMAT = "veilface-liveness"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.npz"
MAX_MANIFEST_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 64 << 20  # a kiosk model is ~1-4 MB; refuse anything absurd
MAX_ARRAYS = 4096


class LivenessModelInvalid(FailedPrecondition):
    """A liveness artifact is corrupt, truncated, foreign, or of another version or architecture."""


@dataclass(frozen=True)
class CropSpec:
    """How the liveness model's input is cut from a photo around a detected face.

    Attributes
    ----------
    scale : float
        Side of the square crop, as a multiple of the face box's larger
        side; shrunk so the crop fits the image (never padded), and shifted
        inside it: the model sees the face with its surroundings (a paper's
        edge, a screen's bezel, the fingers holding it).
    size : int
        Side in pixels the crop is resized to.
    mean, std : tuple of 3 floats
        Per-channel normalisation of RGB values in [0, 1].
    """

    scale: float = 2.5
    size: int = 64
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        if not 1.0 <= self.scale <= 8.0:
            raise InvalidArgument(f"crop scale must be in [1, 8], got {self.scale}")
        if not 16 <= self.size <= 512:
            raise InvalidArgument(f"crop size must be in [16, 512], got {self.size}")

    def to_json(self) -> dict[str, Any]:
        return {
            "crop_scale": self.scale,
            "size": self.size,
            "color": "RGB",
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": "bilinear",
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CropSpec:
        if d.get("color") != "RGB" or d.get("resample") != "bilinear":
            raise LivenessModelInvalid("liveness artifact: input must be RGB, bilinear resampling")
        try:
            return cls(
                scale=float(d["crop_scale"]),
                size=int(d["size"]),
                mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError, InvalidArgument) as exc:
            raise LivenessModelInvalid(f"liveness artifact: bad input section ({exc})") from exc


def liveness_crop(
    rgb: npt.NDArray[np.uint8],
    box: tuple[int, int, int, int],
    spec: CropSpec,
) -> npt.NDArray[np.uint8]:
    """The model's input: a square around the face box, inside the image, resized.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
    box : (left, top, right, bottom) in pixels of ``rgb``
    spec : CropSpec

    Returns
    -------
    (size, size, 3) uint8
    """
    from PIL import Image

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidArgument(f"liveness crop needs an (H, W, 3) uint8 RGB image, got {rgb.shape}")
    h, w = rgb.shape[:2]
    left, top, right, bottom = (int(v) for v in box)
    bw, bh = right - left, bottom - top
    if bw < 1 or bh < 1:
        raise InvalidArgument(f"empty face box {box}")
    side = min(spec.scale * max(bw, bh), w, h)
    side = max(1.0, side)
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    x0 = min(max(cx - side / 2.0, 0.0), w - side)
    y0 = min(max(cy - side / 2.0, 0.0), h - side)
    # only the region (plus a pixel) goes to Pillow: a 2160x1617 photo is not copied whole
    xa, ya = max(0, int(np.floor(x0)) - 1), max(0, int(np.floor(y0)) - 1)
    xb, yb = min(w, int(np.ceil(x0 + side)) + 1), min(h, int(np.ceil(y0 + side)) + 1)
    im = Image.fromarray(np.ascontiguousarray(rgb[ya:yb, xa:xb]))
    crop = im.resize(
        (spec.size, spec.size),
        Image.Resampling.BILINEAR,
        box=(x0 - xa, y0 - ya, x0 - xa + side, y0 - ya + side),
        reducing_gap=2.0,
    )
    return np.asarray(crop, dtype=np.uint8)


@dataclass(frozen=True)
class LivenessArtifact:
    """A read (and verified) ``.vfpad`` file."""

    manifest: dict[str, Any]
    arrays: dict[str, npt.NDArray[np.float32]] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def crop(self) -> CropSpec:
        return CropSpec.from_json(self.manifest["input"])

    @property
    def architecture(self) -> dict[str, Any]:
        arch: dict[str, Any] = self.manifest["architecture"]
        return arch


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "fingerprint"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _fingerprint(manifest: Mapping[str, Any], weights: bytes) -> str:
    return hashlib.sha256(_canonical(manifest) + weights).hexdigest()


def write_artifact(
    path: str | Path,
    arrays: Mapping[str, npt.NDArray[Any]],
    *,
    architecture: Mapping[str, Any],
    crop: CropSpec,
    threshold: float,
    threshold_rule: Mapping[str, Any],
    training: Mapping[str, Any],
) -> str:
    """Write a ``.vfpad`` file atomically; returns its fingerprint."""
    if not 0.0 < threshold < 1.0:
        raise InvalidArgument(f"threshold must be in (0, 1), got {threshold}")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})  # type: ignore[arg-type]
    weights = buf.getvalue()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": dict(architecture),
        "input": crop.to_json(),
        "threshold": float(threshold),
        "threshold_rule": dict(threshold_rule),
        "training": dict(training),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    manifest["fingerprint"] = _fingerprint(manifest, weights)
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        zf.writestr(WEIGHTS, weights)
    tmp.replace(out)
    return str(manifest["fingerprint"])


def _member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise LivenessModelInvalid(f"liveness artifact: no {name} inside") from None
    if info.file_size > limit:
        raise LivenessModelInvalid(f"liveness artifact: {name} is {info.file_size} bytes, over {limit}")
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LivenessModelInvalid(f"liveness artifact: {name} is over {limit} bytes")
    return data


def read_artifact(path: str | Path) -> LivenessArtifact:
    """Read and verify a ``.vfpad`` file.

    Raises
    ------
    LivenessModelInvalid
        Missing, not a ZIP, oversized, another format or version, a digest
        or fingerprint that does not match, or arrays that are not float32.
    """
    p = Path(path)
    if not p.is_file():
        raise LivenessModelInvalid(f"no liveness model at {p}")
    try:
        with zipfile.ZipFile(p) as zf:
            raw_manifest = _member(zf, MANIFEST, MAX_MANIFEST_BYTES)
            weights = _member(zf, WEIGHTS, MAX_WEIGHTS_BYTES)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise LivenessModelInvalid(f"{p} is not a liveness artifact (.vfpad): {exc}") from exc
    try:
        manifest = json.loads(raw_manifest)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LivenessModelInvalid(f"{p}: manifest is not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LivenessModelInvalid(f"{p} is not a veilface liveness artifact")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LivenessModelInvalid(
            f"{p}: format version {manifest.get('format_version')!r}, this veilface reads "
            f"version {FORMAT_VERSION}"
        )
    for key in ("architecture", "input", "threshold", "fingerprint", "weights_sha256"):
        if key not in manifest:
            raise LivenessModelInvalid(f"{p}: manifest has no {key!r}")
    if hashlib.sha256(weights).hexdigest() != manifest["weights_sha256"]:
        raise LivenessModelInvalid(f"{p}: weights do not match their digest (corrupt file)")
    if _fingerprint(manifest, weights) != manifest["fingerprint"]:
        raise LivenessModelInvalid(f"{p}: fingerprint does not match (the manifest was changed)")
    try:
        threshold = float(manifest["threshold"])
    except (TypeError, ValueError):
        raise LivenessModelInvalid(f"{p}: threshold is not a number") from None
    if not 0.0 < threshold < 1.0:
        raise LivenessModelInvalid(f"{p}: threshold {threshold} is not in (0, 1)")
    CropSpec.from_json(manifest["input"])
    arrays: dict[str, npt.NDArray[np.float32]] = {}
    try:
        with np.load(io.BytesIO(weights), allow_pickle=False) as z:
            if len(z.files) > MAX_ARRAYS:
                raise LivenessModelInvalid(f"{p}: {len(z.files)} arrays, over {MAX_ARRAYS}")
            for k in z.files:
                a = z[k]
                if a.dtype != np.float32:
                    raise LivenessModelInvalid(f"{p}: array {k} is {a.dtype}, not float32")
                arrays[k] = a
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise LivenessModelInvalid(f"{p}: weights cannot be read ({exc})") from exc
    return LivenessArtifact(manifest=manifest, arrays=arrays)
