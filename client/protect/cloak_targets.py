"""Target faces for cloaking: pull the face toward someone far from its owner.

Dodging alone pushes a face's features *away* from its owner's, in
whichever direction the surrogate finds easiest; those directions transfer
poorly to recognizers the surrogate never saw. Moving the features *toward*
a chosen other face (the target, as Fawkes and DiffAIM do) gives every step
one consistent direction and, measured on validation people, moves dlib's
recognizer further at the same SSIM (``docs/protection.md``).

The targets are not real people. They are **composite faces**: the
surrogate's embeddings of the training people (never the held-out ones) are
clustered (k-means, cosine), and each target is the pixel mean of the
aligned crops of the ``per_target`` members closest to a cluster centre, a
blurred average face that is nobody's. What ships is only what the attack
needs: per surrogate, each composite's embedding and its intermediate
feature maps (``targets.npz`` beside the surrogate weights, about 60 KB per
target), built by ``veilface protect build-targets``. The per-face target
is the composite whose embedding is least similar to the owner's.

Averaging the feature maps of a cluster instead of its pixels was tried
and did not help (the average map is not the map of any face).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from veilface.client.protect.surrogate_models import Surrogate
from veilface.client.protect.surrogates import (
    DEFAULT_WEIGHTS_DIR,
    SurrogateEnsemble,
    SurrogateWeightsNotFound,
)
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

#: File name of the target pool beside the surrogate weights.
TARGETS_FILE: Final = "targets.npz"
#: The surrogate stages whose maps the target term matches (MobileNetV2's 28, 14 and 7 px maps).
TARGET_STAGES: Final = (1, 2, 3)


@dataclass(frozen=True)
class TargetPool:
    """The composite target faces of one surrogate.

    Attributes
    ----------
    centroids
        ``float32 (K, D)`` unit embeddings of the composites.
    maps
        Per stage of :data:`TARGET_STAGES`, ``float32 (K, C, H, W)``.
    """

    centroids: Tensor
    maps: tuple[Tensor, ...]

    def farthest(self, anchor: Tensor) -> tuple[Tensor, ...]:
        """The maps (``(1, C, H, W)`` per stage) of the composite least like ``anchor``.

        ``anchor`` is the owner's embedding(s), ``(N, D)``; their mean decides.
        """
        own = F.normalize(anchor.mean(0, keepdim=True), dim=1)
        index = int((self.centroids @ own.T)[:, 0].argmin())
        return tuple(m[index : index + 1] for m in self.maps)


def load_targets(
    archs: list[str], weights_dir: str | Path | None = None
) -> dict[str, TargetPool]:
    """The target pools of ``archs`` from ``weights_dir`` (default: the shipped weights).

    Raises
    ------
    SurrogateWeightsNotFound
        The file is missing, unreadable, or lacks an architecture.
    """
    path = Path(weights_dir or DEFAULT_WEIGHTS_DIR) / TARGETS_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as exc:
        raise SurrogateWeightsNotFound(
            f"cloak target faces cannot be read from {path} ({type(exc).__name__}); "
            "reinstall veilface or rebuild them with `veilface protect build-targets`"
        ) from exc
    pools: dict[str, TargetPool] = {}
    for arch in archs:
        keys = [f"{arch}.centroids"] + [f"{arch}.stage{j}" for j in TARGET_STAGES]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise SurrogateWeightsNotFound(
                f"{path} has no target faces for surrogate {arch!r} (missing {', '.join(missing)})"
            )
        cents = torch.from_numpy(arrays[keys[0]].astype(np.float32))
        maps = tuple(torch.from_numpy(arrays[k].astype(np.float32)) for k in keys[1:])
        if any(m.shape[0] != cents.shape[0] for m in maps):
            raise SurrogateWeightsNotFound(f"{path}: target arrays of {arch!r} disagree in count")
        pools[arch] = TargetPool(F.normalize(cents, dim=1), maps)
    return pools


_cache: dict[tuple[str, tuple[str, ...]], dict[str, TargetPool]] = {}
_cache_lock = threading.Lock()


def target_pools(ensemble: SurrogateEnsemble) -> dict[str, TargetPool] | None:
    """The target pools beside ``ensemble``'s weights, loaded once; ``None`` if it has none.

    Surrogates a user trained without building targets still cloak (dodging
    only), with a warning; a target file that exists but is broken is an error.
    """
    directory = Path(ensemble.source) if ensemble.source else DEFAULT_WEIGHTS_DIR
    key = (str(directory), tuple(ensemble.archs))
    with _cache_lock:
        if key not in _cache:
            if not (directory / TARGETS_FILE).is_file():
                logger.warning(
                    "no %s beside the surrogates in %s: cloaking without a target face "
                    "(build one with `veilface protect build-targets`)", TARGETS_FILE, directory
                )
                return None
            _cache[key] = load_targets(list(ensemble.archs), directory)
        return _cache[key]


def build_targets(
    model: Surrogate,
    crops: Tensor,
    *,
    clusters: int = 16,
    per_target: int = 8,
    seed: int = 0,
    iterations: int = 30,
) -> dict[str, npt.NDArray[np.float32] | npt.NDArray[np.float16]]:
    """Composite target faces for ``model`` from face crops of *training* people.

    Parameters
    ----------
    crops
        ``float32 (N, 3, S, S)`` in ``[0, 1]``, ``S`` = ``model.crop_size``,
        one per person (people held out from surrogate training must not be
        among them).

    Returns
    -------
    dict
        ``"<arch>.centroids"`` and ``"<arch>.stage<j>"`` arrays, ready for
        :data:`TARGETS_FILE`.
    """
    if crops.shape[0] < clusters * 2:
        raise InvalidArgument(f"need at least {clusters * 2} faces for {clusters} targets")
    model.eval()
    with torch.no_grad():
        emb = torch.cat([F.normalize(model(b), dim=1) for b in torch.split(crops, 64)]).numpy()
    rng = np.random.default_rng(seed)
    centres = emb[rng.choice(len(emb), clusters, replace=False)]
    for _ in range(iterations):
        assign = (emb @ centres.T).argmax(1)
        for k in range(clusters):
            if (assign == k).any():
                c = emb[assign == k].mean(0)
                centres[k] = c / np.linalg.norm(c)
    composites = []
    for k in range(clusters):
        members = np.where(assign == k)[0]
        if members.size == 0:
            members = np.argsort(-(emb @ centres[k]))[:per_target]
        closest = members[np.argsort(-(emb[members] @ centres[k]))][:per_target]
        composites.append(crops[torch.from_numpy(closest)].mean(0))
    batch = torch.stack(composites)
    with torch.no_grad():
        cemb, maps = model.features(batch)
    out: dict[str, npt.NDArray[np.float32] | npt.NDArray[np.float16]] = {
        f"{model.arch}.centroids": F.normalize(cemb, dim=1).numpy().astype(np.float32)
    }
    for j in TARGET_STAGES:
        out[f"{model.arch}.stage{j}"] = maps[j].numpy().astype(np.float16)
    logger.info(
        "%s: %d composite targets of %d faces each, cluster sizes %s",
        model.arch, clusters, per_target, np.bincount(assign, minlength=clusters).tolist(),
    )
    return out


def training_face_crops(data: Path, size: int, *, max_people: int = 600) -> Tensor:
    """One face crop (``size`` px) per *training* person of ``data`` (never a held-out one).

    Faces are found with dlib's HOG detector (the face pipeline's); photos
    without a face are skipped.
    """
    from veilface.client.face.image_io import load_image
    from veilface.client.face.pipeline import FacePipeline
    from veilface.client.protect.face_crops import crop_square, cut
    from veilface.client.protect.surrogate_training import heldout_split, list_people

    people = list_people(data)
    names = [n for n in people if heldout_split(n) == "train"][:max_people]
    pipeline = FacePipeline()
    crops = []
    for name in names:
        rgb = load_image(people[name][0])
        boxes = pipeline.detect(rgb)
        if not boxes:
            continue
        x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
        crops.append(cut(x, crop_square(boxes[0]), size)[0])
    if not crops:
        raise InvalidArgument(
            f"no face of a training person found in {data}: give the folder of "
            "<person>/<image> photos the surrogates were trained on"
        )
    return torch.stack(crops)


__all__ = [
    "TARGETS_FILE",
    "TARGET_STAGES",
    "TargetPool",
    "build_targets",
    "load_targets",
    "target_pools",
    "training_face_crops",
]
