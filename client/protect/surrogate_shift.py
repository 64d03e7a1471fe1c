"""How far a cloak moved the surrogates: the figure the change floor checks for ``cloak``.

:func:`surrogate_similarity` embeds the original and the protected face with
every surrogate, at the canonical crop square of each face box and without
any random transformation, and returns the cosine similarity of the *least*
moved face (mean over surrogates). Measured on the final 8-bit image, after
the SSIM back-off, so it reflects what leaves the device, not an iterate of
the optimisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from veilface.client.face.backend import FaceBox
from veilface.client.protect.face_crops import crop_square, cut
from veilface.client.protect.surrogates import SurrogateEnsemble


def _tensor(rgb: npt.NDArray[np.uint8]) -> Tensor:
    return torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0


def surrogate_similarity(
    ensemble: SurrogateEnsemble,
    original: npt.NDArray[np.uint8],
    result: npt.NDArray[np.uint8],
    boxes: Sequence[FaceBox],
) -> float:
    """Cosine similarity original/protected of the least moved face, mean over surrogates.

    Returns
    -------
    float
        In ``[-1, 1]``; 1.0 when the result is the original.
    """
    x0, x1 = _tensor(original), _tensor(result)
    per_face = []
    with torch.no_grad():
        for box in boxes:
            square = crop_square(box)
            sims = [
                float(
                    F.cosine_similarity(
                        m(cut(x0, square, m.crop_size)), m(cut(x1, square, m.crop_size))
                    ).mean()
                )
                for m in ensemble.models
            ]
            per_face.append(sum(sims) / len(sims))
    return max(per_face)


__all__ = ["surrogate_similarity"]
