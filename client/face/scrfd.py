"""SCRFD face detection maths: letterbox pre-processing, anchor decoding, NMS.

Plain numpy and Pillow, following insightface's ``model_zoo/scrfd.py``:

* the image is resized, keeping its aspect ratio, into the top-left corner of
  a black ``input_w x input_h`` canvas (640 x 640 by default);
* pixels become ``(x - 127.5) / 128`` in RGB channel order, NCHW ``float32``
  (insightface feeds OpenCV's BGR images with ``swapRB=True``, so the network
  sees RGB, which is what the pipeline already holds);
* every stride (8, 16, 32, and 64, 128 for 5-level models) has one anchor
  point per feature-map cell, at the cell's top-left corner ``(x*s, y*s)``,
  repeated ``num_anchors`` times; the network predicts a score, distances
  ``(left, top, right, bottom) / s`` from the point to the box sides, and
  ``(dx, dy) / s`` offsets of 5 landmarks;
* boxes scoring at least the threshold are kept, mapped back to the image by
  dividing by the letterbox scale, and reduced by greedy NMS.

The resize reproduces OpenCV's ``INTER_LINEAR`` (no anti-aliasing when
shrinking), the filter insightface resizes with, to one grey level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

#: SCRFD's input normalisation: ``(pixel - INPUT_MEAN) / INPUT_STD``.
INPUT_MEAN = 127.5
INPUT_STD = 128.0


@dataclass(frozen=True)
class OutputLayout:
    """How an SCRFD model's outputs are laid out (from their number, as insightface does).

    Attributes
    ----------
    strides
        Feature strides, one score/box(/landmark) output each.
    num_anchors
        Anchors per feature-map cell.
    has_landmarks
        Whether the model predicts 5 landmarks (``*_kps`` and ``det_*`` models do).
    """

    strides: tuple[int, ...]
    num_anchors: int
    has_landmarks: bool

    @property
    def num_outputs(self) -> int:
        return len(self.strides) * (3 if self.has_landmarks else 2)


#: Output counts insightface recognises, and what they mean.
LAYOUTS: dict[int, OutputLayout] = {
    6: OutputLayout((8, 16, 32), 2, False),
    9: OutputLayout((8, 16, 32), 2, True),
    10: OutputLayout((8, 16, 32, 64, 128), 1, False),
    15: OutputLayout((8, 16, 32, 64, 128), 1, True),
}


class OutputShapeError(ValueError):
    """The network's outputs do not have the sizes its layout implies."""


@dataclass(frozen=True)
class Detections:
    """Faces found by SCRFD, in pixels of the original image, best score first.

    Attributes
    ----------
    boxes
        ``float32 (n, 4)``: ``x1, y1, x2, y2``.
    scores
        ``float32 (n,)`` in ``[0, 1]``.
    landmarks
        ``float32 (n, 5, 2)``: ``(x, y)`` of the left eye, right eye, nose,
        left and right mouth corners (left/right as seen in the image).
    """

    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]
    landmarks: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def resize_bilinear(rgb: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
    """Bilinear resize without anti-aliasing, as OpenCV's ``INTER_LINEAR`` (what SCRFD saw in training).

    Output pixel ``x`` samples input position ``(x + 0.5) * W / width - 0.5``
    (the same for rows), interpolating its 2 x 2 neighbours; done by
    Pillow's affine transform, which samples that way (its ``resize`` would
    average over the whole footprint when shrinking).

    Parameters
    ----------
    rgb
        ``uint8 (H, W, 3)``.
    width, height
        Output size.

    Returns
    -------
    numpy.ndarray
        ``uint8 (height, width, 3)``, within one grey level of ``cv2.resize``.
    """
    h, w = rgb.shape[:2]
    coeffs = (w / width, 0.0, 0.0, 0.0, h / height, 0.0)
    out = Image.fromarray(rgb).transform(
        (width, height), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))


def letterbox(
    rgb: npt.NDArray[np.uint8], size: tuple[int, int]
) -> tuple[npt.NDArray[np.uint8], float]:
    """Resize keeping the aspect ratio into the top-left corner of a black canvas.

    Parameters
    ----------
    rgb
        ``uint8 (H, W, 3)``.
    size
        Canvas ``(width, height)``.

    Returns
    -------
    canvas, scale
        ``uint8 (height, width, 3)`` and the factor from image to canvas
        pixels (canvas coordinates = image coordinates * ``scale``).
    """
    in_w, in_h = size
    h, w = rgb.shape[:2]
    if h / w > in_h / in_w:
        new_h = in_h
        new_w = max(1, int(new_h / (h / w)))
    else:
        new_w = in_w
        new_h = max(1, int(new_w * (h / w)))
    scale = new_h / h
    resized = resize_bilinear(rgb, new_w, new_h)
    canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, scale


def to_blob(canvas: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """``uint8 (H, W, 3)`` RGB -> ``float32 (1, 3, H, W)`` normalised as SCRFD expects."""
    chw = canvas.transpose(2, 0, 1)[None].astype(np.float32)
    blob: npt.NDArray[np.float32] = np.ascontiguousarray((chw - INPUT_MEAN) / INPUT_STD)
    return blob


def anchor_centers(
    height: int, width: int, stride: int, num_anchors: int
) -> npt.NDArray[np.float32]:
    """``float32 (height*width*num_anchors, 2)`` anchor points ``(x, y)``, row-major, anchors innermost."""
    ys, xs = np.mgrid[:height, :width]
    centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centers, num_anchors, axis=0)


def decode(
    outputs: Sequence[npt.NDArray[np.float32]],
    *,
    layout: OutputLayout,
    input_size: tuple[int, int],
    threshold: float,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Turn raw SCRFD outputs into candidate boxes in canvas pixels.

    Parameters
    ----------
    outputs
        The network outputs in model order: the score maps of every stride,
        then the box maps, then the landmark maps. Each is ``(n, k)`` or
        batched ``(1, n, k)``.
    layout
        The model's :class:`OutputLayout`.
    input_size
        Canvas ``(width, height)`` fed to the network.
    threshold
        Smallest score kept.

    Returns
    -------
    boxes, scores, landmarks
        ``float32 (m, 4)``, ``(m,)``, ``(m, 5, 2)`` (zeros if the model has no
        landmarks), unsorted, not yet NMS-reduced.

    Raises
    ------
    OutputShapeError
        The outputs do not match the layout and input size.
    """
    if len(outputs) != layout.num_outputs:
        raise OutputShapeError(f"expected {layout.num_outputs} outputs, got {len(outputs)}")
    in_w, in_h = input_size
    n_levels = len(layout.strides)
    all_boxes, all_scores, all_kps = [], [], []
    for level, stride in enumerate(layout.strides):
        centers = anchor_centers(in_h // stride, in_w // stride, stride, layout.num_anchors)
        n = centers.shape[0]
        scores = _as_rows(outputs[level], n, 1, stride, "score").reshape(-1)
        dist = _as_rows(outputs[level + n_levels], n, 4, stride, "box") * stride
        keep = np.flatnonzero(scores >= threshold)
        c, d = centers[keep], dist[keep]
        all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
        all_scores.append(scores[keep])
        if layout.has_landmarks:
            kps = _as_rows(outputs[level + 2 * n_levels], n, 10, stride, "landmark") * stride
            all_kps.append(c[:, None, :] + kps[keep].reshape(-1, 5, 2))
        else:
            all_kps.append(np.zeros((keep.size, 5, 2), np.float32))
    return (
        np.concatenate(all_boxes).astype(np.float32),
        np.concatenate(all_scores).astype(np.float32),
        np.concatenate(all_kps).astype(np.float32),
    )


def _as_rows(
    out: npt.NDArray[np.float32], n: int, k: int, stride: int, what: str
) -> npt.NDArray[np.float32]:
    arr = np.asarray(out, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:  # batched export: (1, n, k)
        arr = arr[0]
    if arr.shape != (n, k):
        raise OutputShapeError(
            f"the stride-{stride} {what} output has shape {tuple(np.shape(out))}, "
            f"expected ({n}, {k})"
        )
    return arr


def nms(boxes: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou: float) -> list[int]:
    """Greedy non-maximum suppression (insightface's, with its ``+1`` pixel areas).

    Parameters
    ----------
    boxes
        ``float32 (n, 4)`` ``x1, y1, x2, y2``.
    scores
        ``float32 (n,)``.
    iou
        Boxes overlapping a kept box by more than this are dropped.

    Returns
    -------
    list of int
        Indices of the kept boxes, best score first.
    """
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= iou]
    return keep


def postprocess(
    outputs: Sequence[npt.NDArray[np.float32]],
    *,
    layout: OutputLayout,
    input_size: tuple[int, int],
    scale: float,
    threshold: float,
    nms_iou: float,
) -> Detections:
    """Decode, map back to the original image (divide by ``scale``) and NMS-reduce.

    See :func:`decode` for ``outputs``, ``layout`` and ``input_size``;
    ``scale`` is the one :func:`letterbox` returned.
    """
    boxes, scores, kps = decode(outputs, layout=layout, input_size=input_size, threshold=threshold)
    boxes, kps = boxes / scale, kps / scale
    keep = nms(boxes, scores, nms_iou)
    return Detections(
        boxes=np.ascontiguousarray(boxes[keep], dtype=np.float32),
        scores=np.ascontiguousarray(scores[keep], dtype=np.float32),
        landmarks=np.ascontiguousarray(kps[keep], dtype=np.float32).reshape(-1, 5, 2),
    )


__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "LAYOUTS",
    "Detections",
    "OutputLayout",
    "OutputShapeError",
    "anchor_centers",
    "decode",
    "letterbox",
    "nms",
    "postprocess",
    "resize_bilinear",
    "to_blob",
]
