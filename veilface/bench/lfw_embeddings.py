"""Embed a Labeled Faces in the Wild folder into an ``.npz`` for the benchmarks.

Input layout (LFW's): ``<root>/<Name>/<Name>_NNNN.jpg``. People and files are
walked in sorted order, so the same folder and options always give the same
rows in the same order. Each image goes through the on-device pipeline
(:class:`veilface.client.face.FacePipeline` with ``on_multiple="largest"``:
LFW photos often show a second face, the labelled person is the centred,
largest one); images the quality gate refuses are skipped and counted by
reason.

Output arrays (``allow_pickle=False`` safe):

- ``emb``: ``float32 [n, 128]``, dlib's raw descriptors (not re-normalised);
- ``labels``: ``str [n]``, the person (folder name);
- ``paths``: ``str [n]``, the image path relative to ``root``;
- ``meta``: ``str []``, a JSON summary (backend, options, counts).

LFW: Huang et al., *Labeled Faces in the Wild*, UMass TR 07-49, 2007; deep
funneling: Huang et al., NIPS 2012.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from veilface.errors import InvalidArgument

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_people(
    root: str | os.PathLike[str],
    *,
    min_images: int = 2,
    max_people: int | None = None,
    max_per_person: int | None = None,
) -> list[tuple[str, list[Path]]]:
    """The ``(name, image paths)`` to embed, sorted by name then file name.

    People with fewer than ``min_images`` image files are left out; then the
    first ``max_people`` people (in name order) are kept, each with their
    first ``max_per_person`` files.

    Raises
    ------
    InvalidArgument
        ``root`` is not a directory, or an option is out of range.
    """
    if min_images < 1:
        raise InvalidArgument(f"min_images must be >= 1, got {min_images}")
    if max_people is not None and max_people < 1:
        raise InvalidArgument(f"max_people must be >= 1, got {max_people}")
    if max_per_person is not None and max_per_person < 1:
        raise InvalidArgument(f"max_per_person must be >= 1, got {max_per_person}")
    if max_per_person is not None and max_per_person < min_images:
        raise InvalidArgument(
            f"max_per_person ({max_per_person}) must be at least min_images ({min_images})"
        )
    base = Path(root)
    if not base.is_dir():
        raise InvalidArgument(
            f"{base} is not a directory; expected an LFW folder laid out as <Name>/<Name>_NNNN.jpg"
        )
    people: list[tuple[str, list[Path]]] = []
    for person in sorted(p for p in base.iterdir() if p.is_dir()):
        files = sorted(
            f for f in person.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES
        )
        if len(files) < min_images:
            continue
        people.append((person.name, files[:max_per_person]))
        if max_people is not None and len(people) >= max_people:
            break
    return people


def build_embeddings(
    root: str | os.PathLike[str],
    *,
    min_images: int = 2,
    max_people: int | None = None,
    max_per_person: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed the faces of an LFW-style folder.

    Parameters
    ----------
    root
        Folder holding one sub-folder of images per person.
    min_images
        Only people with at least this many image files are read, and a person
        keeps rows only if at least this many images pass the quality gate
        (so every label in the result has ``>= min_images`` rows).
    max_people
        Read only the first ``max_people`` eligible people (name order).
    max_per_person
        Read at most this many images per person (the first, in file order).
    progress
        Show a tqdm progress bar on stderr.

    Returns
    -------
    dict
        ``emb`` (``float32 [n, 128]``), ``labels`` (``str [n]``), ``paths``
        (``str [n]``, relative to ``root``) and the summary: ``people``,
        ``rows``, ``images_read``, ``skipped`` (``{error class name: count}``
        for images the pipeline refused), ``dropped_people`` and
        ``dropped_rows`` (people left with fewer than ``min_images`` good
        images), ``backend``, ``seconds`` and ``seconds_per_image``.
    """
    from veilface.client.face import FaceEmbedding, FacePipeline

    base = Path(root)
    people = list_people(
        base, min_images=min_images, max_people=max_people, max_per_person=max_per_person
    )
    files = [f for _, fs in people for f in fs]
    owners = [name for name, fs in people for _ in fs]
    log.info("embedding %d images of %d people from %s", len(files), len(people), base)

    # A data set's templates for benchmarks, not captures at a camera: no liveness gate.
    pipeline = FacePipeline("dlib", on_multiple="largest", liveness=None)
    pipeline.backend.load()  # keep model loading out of the timing
    start = time.perf_counter()
    results = pipeline.embed_many(files, progress=progress)
    seconds = time.perf_counter() - start

    skipped: Counter[str] = Counter()
    good: dict[str, list[tuple[Path, FaceEmbedding]]] = {}
    for name, path, res in zip(owners, files, results, strict=True):
        if isinstance(res, FaceEmbedding):
            good.setdefault(name, []).append((path, res))
        else:
            skipped[type(res).__name__] += 1

    vectors: list[np.ndarray] = []
    labels: list[str] = []
    paths: list[str] = []
    dropped_people = dropped_rows = 0
    for name, _ in people:
        rows = good.get(name, [])
        if len(rows) < min_images:
            dropped_people += 1
            dropped_rows += len(rows)
            continue
        for path, emb in rows:
            vectors.append(emb.vector)
            labels.append(name)
            paths.append(path.relative_to(base).as_posix())

    dim = pipeline.backend.embedding_dim
    emb_arr = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    return {
        "emb": emb_arr,
        "labels": np.array(labels, dtype=str),
        "paths": np.array(paths, dtype=str),
        "people": len({*labels}),
        "rows": len(labels),
        "images_read": len(files),
        "skipped": dict(sorted(skipped.items())),
        "dropped_people": dropped_people,
        "dropped_rows": dropped_rows,
        "backend": pipeline.backend.name,
        "min_images": min_images,
        "max_people": max_people,
        "max_per_person": max_per_person,
        "seconds": round(seconds, 2),
        "seconds_per_image": round(seconds / len(files), 4) if files else None,
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a :func:`build_embeddings` result (no arrays)."""
    return {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}


def save_npz(path: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Write ``emb``, ``labels``, ``paths`` and a JSON ``meta`` to ``path``, atomically.

    Returns the path written (exactly ``path``; no suffix is added).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "emb": np.ascontiguousarray(result["emb"], dtype=np.float32),
        "labels": np.asarray(result["labels"], dtype=str),
        "paths": np.asarray(result["paths"], dtype=str),
        "meta": np.array(json.dumps(summary(result), sort_keys=True)),
    }
    # A sibling temporary file (created with the umask's permissions, unlike
    # mkstemp's 0600), renamed over the target once complete.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


__all__ = ["build_embeddings", "list_people", "save_npz", "summary"]
