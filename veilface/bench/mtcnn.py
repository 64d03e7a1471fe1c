"""MTCNN face detector (Zhang et al., 2016), our own code on facenet-pytorch's weights.

The protection benchmark judges a protected photo with more than one face
detector (a perturbation that only hides the face from dlib's detectors is
not protection). MTCNN is a cascade of three small CNNs: PNet proposes
faces over an image pyramid, RNet and ONet re-score and refine the boxes
(ONet also gives five landmarks). Its weights ship in the ``facenet-pytorch``
wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``, MIT), but that package
cannot be imported here: it imports torchvision, which fails beside our torch
2.13, and its metadata pins an old torch. So it is installed without its
dependencies (``python -m pip install --no-deps facenet-pytorch==2.6.0``),
located through :mod:`importlib.metadata` (never imported), and the three
networks, the pyramid and the non-maximum suppression are written here
(torch for the convolutions and resampling, numpy for the boxes). The layer
names match the state dicts, so they load as they are.

Coordinates inside the cascade follow the reference implementation (1-based,
inclusive boxes) so the learned box regressions apply unchanged; what
:meth:`MTCNN.detect` returns is 0-based with exclusive right/bottom edges,
like :class:`~veilface.client.face.FaceBox`.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veilface.client.face.backend import FaceBox, check_rgb
from veilface.client.face.errors import FaceModelInvalid, FaceModelsNotFound

#: The command that installs the weights (the package itself is never imported).
INSTALL_HINT = "python -m pip install --no-deps facenet-pytorch==2.6.0"
#: Score thresholds of the three stages, the standard MTCNN values.
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)
#: Scale step of the image pyramid.
DEFAULT_FACTOR = 0.709
#: Smallest face searched for, px.
DEFAULT_MIN_FACE = 20
#: Photos with more pixels are shrunk for detection (boxes are scaled back).
DEFAULT_MAX_PIXELS = 4_000_000

_DIST = "facenet-pytorch"
_DATA = Path("facenet_pytorch") / "data"
_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
_Boxes = npt.NDArray[np.float64]


@dataclass(frozen=True)
class MtcnnWeights:
    """Paths of the three state dicts."""

    pnet: Path
    rnet: Path
    onet: Path


@dataclass(frozen=True)
class MtcnnFace:
    """One detected face: 0-based box (right/bottom exclusive), ONet score, 5 landmarks.

    ``landmarks`` are ``(x, y)`` of the left eye, right eye, nose tip, left
    and right mouth corners (left/right as seen in the image).
    """

    left: float
    top: float
    right: float
    bottom: float
    score: float
    landmarks: tuple[tuple[float, float], ...]

    def to_face_box(self) -> FaceBox:
        """The box in integer pixels, with its score and landmarks."""
        return FaceBox(
            left=round(self.left),
            top=round(self.top),
            right=round(self.right),
            bottom=round(self.bottom),
            score=self.score,
            landmarks=self.landmarks,
        )


def _package_data_dir() -> Path | None:
    """``facenet_pytorch/data`` of the installed distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        located = Path(str(dist.locate_file(_DATA)))
        if located.is_dir():
            return located
    for entry in sys.path:
        candidate = Path(entry or ".") / _DATA
        if candidate.is_dir():
            return candidate
    return None


def find_mtcnn_weights(weights_dir: str | os.PathLike[str] | None = None) -> MtcnnWeights:
    """Locate ``pnet.pt``, ``rnet.pt`` and ``onet.pt``.

    Parameters
    ----------
    weights_dir
        Directory holding the three files; by default ``facenet_pytorch/data``
        of the installed ``facenet-pytorch`` distribution.

    Raises
    ------
    FaceModelsNotFound
        The distribution is not installed (and no directory given), or a file is missing.
    """
    found = Path(weights_dir) if weights_dir is not None else _package_data_dir()
    if found is None:
        raise FaceModelsNotFound(
            f"MTCNN weights not found: the '{_DIST}' package is not installed; "
            f"install it with '{INSTALL_HINT}' or give a directory holding {', '.join(_FILES)}"
        )
    directory = found
    where = "the given directory" if weights_dir is not None else f"the '{_DIST}' package"
    paths = [directory / name for name in _FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FaceModelsNotFound(
            f"MTCNN weight file(s) {', '.join(missing)} not found in {where} ({directory}); "
            f"install them with '{INSTALL_HINT}' or give a directory holding {', '.join(_FILES)}"
        )
    return MtcnnWeights(pnet=paths[0], rnet=paths[1], onet=paths[2])


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, 3, H, W)`` to box offsets ``(N, 4, h, w)``, face probability ``(N, 2, h, w)``."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, 3, 24, 24)`` to offsets ``(N, 4)`` and probability ``(N, 2)``."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # the weights were ported from a (W, H, C)-ordered framework: flatten in that order
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net on 48x48 crops: box offsets, 5 landmarks, probability."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(N, 3, 48, 48)`` to offsets ``(N, 4)``, landmarks ``(N, 10)``, probability."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


_Net = TypeVar("_Net", bound=nn.Module)


def _load(net: _Net, path: Path) -> _Net:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # a truncated, corrupt or foreign file
        raise FaceModelInvalid(
            f"MTCNN weight file {path} cannot be loaded ({type(exc).__name__}); "
            f"reinstall it with '{INSTALL_HINT} --force-reinstall'"
        ) from exc
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def nms(
    boxes: _Boxes,
    scores: _Boxes,
    threshold: float,
    method: Literal["union", "min"] = "union",
) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression.

    Parameters
    ----------
    boxes
        ``(n, 4)`` as ``x1, y1, x2, y2``.
    scores
        ``(n,)``.
    threshold
        A box is dropped when its overlap with a kept, higher-scoring box
        exceeds this.
    method
        Overlap as intersection over union, or over the smaller box
        (``"min"``, which also removes boxes nested in a kept one).

    Returns
    -------
    numpy.ndarray
        Indices of the kept boxes, highest score first.
    """
    if len(boxes) == 0:
        return np.empty(0, dtype=np.intp)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = int(order[0]), order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        if method == "min":
            denom = np.minimum(area[i], area[rest])
        else:
            denom = area[i] + area[rest] - inter
        overlap = np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.intp)


def _square(boxes: _Boxes) -> _Boxes:
    """Boxes grown to squares around the same centre (columns 0..3; others kept)."""
    out = boxes.copy()
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = wh.max(axis=1, keepdims=True)
    out[:, 0:2] = boxes[:, 0:2] + (wh - side) * 0.5
    out[:, 2:4] = out[:, 0:2] + side
    return out


def _regress(boxes: _Boxes, offsets: _Boxes) -> _Boxes:
    """Apply RNet/ONet box offsets (fractions of the inclusive box size)."""
    out = boxes.copy()
    wh = boxes[:, 2:4] - boxes[:, 0:2] + 1
    out[:, 0:4] += offsets[:, 0:4] * np.tile(wh, 2)
    return out


def _normalise(x: Tensor) -> Tensor:
    return (x - 127.5) * 0.0078125


def _crops(img: Tensor, boxes: _Boxes, size: int) -> tuple[Tensor, npt.NDArray[np.intp]]:
    """Cut every box (1-based inclusive) out of ``img`` ``(1, 3, H, W)``, zero-padded, resized.

    Returns the ``(n, 3, size, size)`` normalised crops and the indices of the
    boxes that had a non-empty crop.
    """
    _, _, h, w = img.shape
    out: list[Tensor] = []
    kept: list[int] = []
    for i, (bx1, by1, bx2, by2) in enumerate(np.trunc(boxes[:, :4]).astype(np.int64)):
        x0, y0 = int(bx1) - 1, int(by1) - 1  # to 0-based
        cw, ch = int(bx2 - bx1) + 1, int(by2 - by1) + 1
        if cw <= 0 or ch <= 0:
            continue
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + cw, w), min(y0 + ch, h)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        crop = img.new_zeros((1, 3, ch, cw))
        crop[:, :, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[:, :, sy0:sy1, sx0:sx1]
        out.append(F.interpolate(crop, size=(size, size), mode="area"))
        kept.append(i)
    if not out:
        return img.new_zeros((0, 3, size, size)), np.empty(0, dtype=np.intp)
    return _normalise(torch.cat(out)), np.asarray(kept, dtype=np.intp)


class MTCNN:
    """The three-stage MTCNN cascade.

    Parameters
    ----------
    weights_dir
        Directory of ``pnet.pt``, ``rnet.pt``, ``onet.pt``; by default the
        installed ``facenet-pytorch`` distribution's (see :func:`find_mtcnn_weights`).
    min_face
        Smallest face searched for, px (sets the first pyramid scale, 12 / min_face).
    thresholds
        Score thresholds of PNet, RNet and ONet.
    factor
        Scale step of the pyramid.
    max_pixels
        Larger photos are shrunk (area averaging) for detection only.
    threads
        torch threads during :meth:`detect` (restored afterwards; ``None``
        leaves torch's setting). The nets are tiny: on a shared 2-core machine
        two threads made a 250x250 photo take 2 s instead of 0.07 s.

    Weights load on first use. Instances are not thread-safe: use one per thread.
    """

    def __init__(
        self,
        weights_dir: str | os.PathLike[str] | None = None,
        *,
        min_face: int = DEFAULT_MIN_FACE,
        thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS,
        factor: float = DEFAULT_FACTOR,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = 1,
    ) -> None:
        if min_face < 12:
            raise ValueError(f"min_face must be >= 12 px (PNet's window), got {min_face}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three numbers in [0, 1], got {thresholds}")
        if max_pixels < 4096:
            raise ValueError(f"max_pixels must be >= 4096, got {max_pixels}")
        self.weights_dir = weights_dir
        self.min_face = min_face
        self.thresholds = thresholds
        self.factor = factor
        self.max_pixels = max_pixels
        self.threads = threads
        self._lock = threading.Lock()
        self._nets: tuple[PNet, RNet, ONet] | None = None

    def load(self) -> None:
        """Locate and load the weights now instead of on first use.

        Raises
        ------
        FaceModelsNotFound
            A weight file is missing.
        FaceModelInvalid
            A weight file cannot be loaded.
        """
        if self._nets is not None:
            return
        with self._lock:
            if self._nets is None:
                paths = find_mtcnn_weights(self.weights_dir)
                pnet = _load(PNet(), paths.pnet)
                rnet = _load(RNet(), paths.rnet)
                onet = _load(ONet(), paths.onet)
                self._nets = (pnet, rnet, onet)

    def _loaded(self) -> tuple[PNet, RNet, ONet]:
        self.load()
        if self._nets is None:  # pragma: no cover - load() either sets it or raises
            raise FaceModelsNotFound("MTCNN weights did not load")
        return self._nets

    def _scales(self, h: int, w: int) -> list[float]:
        scale = 12.0 / self.min_face
        side = min(h, w) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= self.factor
            side *= self.factor
        return scales

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[MtcnnFace]:
        """Find faces.

        Parameters
        ----------
        rgb
            ``uint8`` array of shape ``(H, W, 3)``, RGB.

        Returns
        -------
        list of MtcnnFace
            Highest score first; empty if none.
        """
        img_np = check_rgb(rgb)
        self.load()
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            faces = self._detect(img_np)
        finally:
            torch.set_num_threads(before)
        return faces

    def _detect(self, img_np: npt.NDArray[np.uint8]) -> list[MtcnnFace]:
        pnet, rnet, onet = self._loaded()
        h0, w0 = img_np.shape[:2]
        with torch.inference_mode():
            img = torch.from_numpy(img_np.astype(np.float32)).permute(2, 0, 1)[None]
            shrink = 1.0
            if h0 * w0 > self.max_pixels:
                shrink = math.sqrt(self.max_pixels / (h0 * w0))
                size = (max(1, round(h0 * shrink)), max(1, round(w0 * shrink)))
                img = F.interpolate(img, size=size, mode="area")
            boxes = self._stage1(img, pnet)
            if len(boxes):
                boxes = self._stage2(img, boxes, rnet)
            faces = self._stage3(img, boxes, onet) if len(boxes) else []
        if shrink != 1.0:
            faces = [_rescale(f, 1.0 / shrink) for f in faces]
        return faces

    def _stage1(self, img: Tensor, pnet: PNet) -> _Boxes:
        """PNet over the pyramid: square candidate boxes ``(n, 5)`` (x1, y1, x2, y2, score)."""
        _, _, h, w = img.shape
        found: list[_Boxes] = []
        for scale in self._scales(h, w):
            scaled = F.interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg_t, prob_t = pnet(_normalise(scaled))
            prob = prob_t[0, 1].numpy().astype(np.float64)
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if ys.size == 0:
                continue
            reg = reg_t[0].numpy().astype(np.float64)[:, ys, xs].T
            # PNet cell (stride 2, 12 px) mapped back to the image, 1-based inclusive
            cand = np.column_stack([
                np.floor((2 * xs + 1) / scale),
                np.floor((2 * ys + 1) / scale),
                np.floor((2 * xs + 12) / scale),
                np.floor((2 * ys + 12) / scale),
                prob[ys, xs],
                reg,
            ])  # fmt: skip
            found.append(cand[nms(cand[:, :4], cand[:, 4], 0.5)])
        if not found:
            return np.empty((0, 5))
        cand = np.concatenate(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
        bw, bh = cand[:, 2] - cand[:, 0], cand[:, 3] - cand[:, 1]
        boxes = np.column_stack([
            cand[:, 0] + cand[:, 5] * bw,
            cand[:, 1] + cand[:, 6] * bh,
            cand[:, 2] + cand[:, 7] * bw,
            cand[:, 3] + cand[:, 8] * bh,
            cand[:, 4],
        ])  # fmt: skip
        return _square(boxes)

    def _stage2(self, img: Tensor, boxes: _Boxes, rnet: RNet) -> _Boxes:
        crops, kept = _crops(img, boxes, 24)
        if not len(kept):
            return np.empty((0, 5))
        reg_t, prob_t = rnet(crops)
        score = prob_t[:, 1].numpy().astype(np.float64)
        ok = score > self.thresholds[1]
        boxes = np.column_stack([boxes[kept][ok, :4], score[ok]])
        reg = reg_t.numpy().astype(np.float64)[ok]
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        return _square(_regress(boxes[pick], reg[pick]))

    def _stage3(self, img: Tensor, boxes: _Boxes, onet: ONet) -> list[MtcnnFace]:
        crops, kept = _crops(img, boxes, 48)
        if not len(kept):
            return []
        reg_t, pts_t, prob_t = onet(crops)
        score = prob_t[:, 1].numpy().astype(np.float64)
        ok = score > self.thresholds[2]
        boxes = np.column_stack([boxes[kept][ok, :4], score[ok]])
        reg = reg_t.numpy().astype(np.float64)[ok]
        pts = pts_t.numpy().astype(np.float64)[ok]
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * pts[:, :5] + boxes[:, 0:1] - 1  # 0-based
        py = bh[:, None] * pts[:, 5:] + boxes[:, 1:2] - 1
        boxes = _regress(boxes, reg)
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7, "min")
        return [
            MtcnnFace(
                left=float(boxes[i, 0] - 1),  # 1-based inclusive to 0-based, exclusive right
                top=float(boxes[i, 1] - 1),
                right=float(boxes[i, 2]),
                bottom=float(boxes[i, 3]),
                score=float(boxes[i, 4]),
                landmarks=tuple((float(x), float(y)) for x, y in zip(px[i], py[i], strict=True)),
            )
            for i in pick
        ]


def _rescale(face: MtcnnFace, k: float) -> MtcnnFace:
    return MtcnnFace(
        left=face.left * k,
        top=face.top * k,
        right=face.right * k,
        bottom=face.bottom * k,
        score=face.score,
        landmarks=tuple((x * k, y * k) for x, y in face.landmarks),
    )


__all__ = [
    "DEFAULT_FACTOR",
    "DEFAULT_MIN_FACE",
    "DEFAULT_THRESHOLDS",
    "INSTALL_HINT",
    "MTCNN",
    "MtcnnFace",
    "MtcnnWeights",
    "ONet",
    "PNet",
    "RNet",
    "find_mtcnn_weights",
    "nms",
]
