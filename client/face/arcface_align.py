"""ArcFace 5-point face alignment: similarity transform onto the standard template.

Reproduces insightface's ``utils/face_align.norm_crop`` without OpenCV or
scikit-image: the similarity transform (rotation, uniform scale, translation)
that maps the 5 detected landmarks onto :data:`ARCFACE_DST` in the
least-squares sense (Umeyama 1991, what ``skimage.transform.
SimilarityTransform.estimate`` computes), then a bilinear warp with black
borders and OpenCV's pixel-centre convention (pixel ``(i, j)`` at coordinates
``(j, i)``), done by Pillow.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

#: Where ArcFace expects the left eye, right eye, nose tip and mouth corners
#: in a 112 x 112 crop (insightface's ``arcface_dst``).
ARCFACE_DST: npt.NDArray[np.float64] = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def umeyama(src: npt.ArrayLike, dst: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Least-squares similarity transform taking ``src`` points onto ``dst`` points.

    Parameters
    ----------
    src, dst
        ``(n, 2)`` point sets, ``n >= 2``.

    Returns
    -------
    numpy.ndarray
        ``float64 (2, 3)`` matrix ``M`` with ``dst ~= src @ M[:, :2].T + M[:, 2]``.

    Raises
    ------
    ValueError
        The shapes differ or the source points are all the same point.
    """
    s = np.asarray(src, dtype=np.float64)
    d = np.asarray(dst, dtype=np.float64)
    if s.shape != d.shape or s.ndim != 2 or s.shape[1] != 2 or s.shape[0] < 2:
        raise ValueError(f"expected two (n, 2) point sets, got {s.shape} and {d.shape}")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(d))):
        raise ValueError("landmarks contain NaN or infinite values")
    s_mean, d_mean = s.mean(axis=0), d.mean(axis=0)
    s_c, d_c = s - s_mean, d - d_mean
    s_var = float((s_c**2).sum(axis=1).mean())
    if s_var <= 1e-12:
        raise ValueError("the landmarks coincide; no transform can be estimated")
    cov = d_c.T @ s_c / s.shape[0]
    u, sing, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection: flip the weakest axis
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = float(sing @ sign) / s_var
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rot
    matrix[:, 2] = d_mean - scale * rot @ s_mean
    return matrix


def estimate_norm(landmarks: npt.ArrayLike, image_size: int = 112) -> npt.NDArray[np.float64]:
    """The ``(2, 3)`` transform from image to an ``image_size`` ArcFace crop.

    ``image_size`` must be a multiple of 112 (the template is scaled) or of
    128 (the template is scaled and shifted right, as insightface does).
    """
    if image_size % 112 == 0:
        ratio, shift_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        shift_x = 8.0 * ratio
    else:
        raise ValueError(f"image_size must be a multiple of 112 or 128, got {image_size}")
    dst = ARCFACE_DST * ratio
    dst[:, 0] += shift_x
    return umeyama(landmarks, dst)


def warp_affine(
    rgb: npt.NDArray[np.uint8], matrix: npt.NDArray[np.float64], size: int
) -> npt.NDArray[np.uint8]:
    """Bilinear affine warp, like ``cv2.warpAffine(rgb, matrix, (size, size), borderValue=0)``.

    Parameters
    ----------
    rgb
        ``uint8 (H, W, 3)``.
    matrix
        ``(2, 3)`` transform from source to destination pixel coordinates
        (pixel centres at integer coordinates).
    size
        Side of the square output.

    Returns
    -------
    numpy.ndarray
        ``uint8 (size, size, 3)``.
    """
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    a, b, c = inv[0]
    d, e, f = inv[1]
    # Pillow samples output pixel (x, y) at input position inv @ (x+0.5, y+0.5)
    # with pixel centres at +0.5; shift so integer coordinates are centres.
    coeffs = (a, b, c + 0.5 * (1.0 - a - b), d, e, f + 0.5 * (1.0 - d - e))
    warped = Image.fromarray(rgb).transform(
        (size, size),
        Image.Transform.AFFINE,
        coeffs,
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.ascontiguousarray(np.asarray(warped, dtype=np.uint8))


def norm_crop(
    rgb: npt.NDArray[np.uint8], landmarks: npt.ArrayLike, image_size: int = 112
) -> npt.NDArray[np.uint8]:
    """The aligned ArcFace crop of a face.

    Parameters
    ----------
    rgb
        ``uint8 (H, W, 3)``.
    landmarks
        ``(5, 2)`` ``(x, y)`` of the left eye, right eye, nose tip, left and
        right mouth corners, in pixels of ``rgb``.
    image_size
        Side of the crop (112 for ArcFace).

    Returns
    -------
    numpy.ndarray
        ``uint8 (image_size, image_size, 3)``.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"expected (5, 2) landmarks, got shape {pts.shape}")
    return warp_affine(rgb, estimate_norm(pts, image_size), image_size)


__all__ = ["ARCFACE_DST", "estimate_norm", "norm_crop", "umeyama", "warp_affine"]
