"""A stand-in for CLIP pretraining on the PAD proxy: capture-parameter regression on LFW.

No CLIP weights install offline, and prompt tuning on a *random* backbone
learns little. For the proxy benchmark only, :func:`pretrain_visual` trains
the CLIP-style tower to regress the parameters of random, generic photometric
degradations (saturation, contrast, gamma, colour gains, blur, noise, JPEG
quality) applied to LFW faces of people the proxy does **not** use. No attack
rendering (halftone, moiré, glare, media borders) and no PAD label is seen.
The result is saved in the OpenAI key layout and loaded through the same
``pad-clip-weights`` path a user would give for real CLIP weights. Both the
method and the naive baseline start from it.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm import tqdm

from veilface.errors import InvalidArgument
from veilface.federated.pad.models import CLIPVisionConfig, CLIPVisionTransformer, iter_batches
from veilface.federated.pad.training import images_to_tensor

logger = logging.getLogger(__name__)

__all__ = ["NUM_TARGETS", "degrade", "pretrain_visual"]

NUM_TARGETS = 9
"""saturation, contrast, gamma, gain R, gain G, gain B, blur, noise, JPEG quality (each in [0, 1])."""


def degrade(
    face: npt.NDArray[np.uint8], size: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """One random generic degradation of ``face`` and its parameters.

    Parameters
    ----------
    face : numpy.ndarray
        ``(S, S, 3)`` uint8.
    size : int
        Output side.
    rng : numpy.random.Generator

    Returns
    -------
    image : numpy.ndarray
        ``(size, size, 3)`` uint8.
    targets : numpy.ndarray
        ``(NUM_TARGETS,)`` float32 in ``[0, 1]``.
    """
    t = rng.random(NUM_TARGETS).astype(np.float32)
    img = face.astype(np.float32) / 255.0
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * (0.3 + 1.0 * t[0])
    img = 0.5 + (img - 0.5) * (0.6 + 0.7 * t[1])
    img = np.clip(img, 0, 1) ** (0.6 + 1.0 * t[2])
    img = img * (0.8 + 0.4 * t[3:6])
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(1.5 * float(t[6])))
    arr = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    arr = arr + rng.normal(0.0, 0.06 * float(t[7]), arr.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=int(20 + 75 * t[8])
    )
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)
    return out, t


def pretrain_visual(
    config: CLIPVisionConfig,
    lfw_root: str | Path,
    out_path: str | Path,
    *,
    skip_people: int,
    num_images: int = 1000,
    epochs: int = 6,
    views: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Pretrain a CLIP-style tower on degradation regression and save its state dict.

    Parameters
    ----------
    config : CLIPVisionConfig
    lfw_root : str or pathlib.Path
    out_path : str or pathlib.Path
        ``torch.save`` target (keys ``visual.*``, readable by
        :func:`~veilface.federated.pad.models.load_clip_visual`).
    skip_people : int, keyword-only
        People (in the proxy's shuffled order, same ``seed``) the proxy uses;
        pretraining takes photos from the people after them.
    num_images, epochs, views, lr, seed, progress : keyword-only
        Faces used, passes, degraded versions per face, AdamW rate, seed, tqdm bar.

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    root = Path(lfw_root)
    if not root.is_dir():
        raise InvalidArgument(f"no LFW folder at {root}")
    rng = np.random.default_rng(seed)
    people = sorted(p for p in root.iterdir() if p.is_dir())
    rng.shuffle(people)  # type: ignore[arg-type,unused-ignore]  # same order as build_pad_proxy
    files = [f for person in people[skip_people:] for f in sorted(person.glob("*.jpg"))[:1]]
    if len(files) < 64:
        raise InvalidArgument(
            f"{root} has too few photos beyond the proxy's people for pretraining"
        )
    files = files[:num_images]
    faces = []
    for f in files:
        with Image.open(f) as raw:
            im = raw.convert("RGB")
            w, h = im.size
            s = int(min(w, h) * 0.5)
            left, top = (w - s) // 2, (h - s) // 2
            crop = im.crop((left, top, left + s, top + s)).resize(
                (96, 96), Image.Resampling.BILINEAR
            )
            faces.append(np.asarray(crop, dtype=np.uint8))
    torch.manual_seed(seed)
    tower = CLIPVisionTransformer(config)
    head = torch.nn.Linear(config.output_dim, NUM_TARGETS)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    # a fixed pool of ``views`` degradations per face, rendered once (PIL is the slow part)
    pairs = [degrade(face, config.image_size, rng) for face in faces for _ in range(views)]
    x = images_to_tensor(np.stack([p[0] for p in pairs]))
    y = torch.from_numpy(np.stack([p[1] for p in pairs]))
    bar = tqdm(range(epochs), desc="pretrain (proxy stand-in for CLIP)", disable=not progress)
    for _ in bar:
        losses = []
        for idx in iter_batches(len(pairs), 32, gen):
            loss = F.mse_loss(head(tower(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
        bar.set_postfix(mse=f"{np.mean(losses):.4f}")
        logger.info("pretrain epoch mse %.4f", float(np.mean(losses)))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"visual.{k}": v for k, v in tower.state_dict().items()}, out)
    return out
