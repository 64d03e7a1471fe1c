"""Enroll, identify and verify from photos: the face pipeline and its liveness gate, then the SDK.

:class:`ImageOps` is what ``VeilClient.enroll_image``, ``identify_image``,
``verify_image`` and ``enroll_images`` run (``client.images``). Each photo
goes through the client's :class:`~veilface.client.face.FacePipeline`:
detect, quality gate, liveness gate, align, embed. Only a face that passed
is handed to the embedding-based ``enroll``/``identify``/``verify``, so a
refused photo (no face, a spoof, ...) raises before any RPC.

Every result records the liveness decision (:class:`FaceCapture`): the
score, threshold and model fingerprint, or that the gate was skipped by
``liveness=None``. Folder enrollment keeps going past refused photos and
reports how many were refused and why (:class:`FolderEnrollment`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from veilface.client.enrollment import BulkReceipt, EnrollReceipt
from veilface.client.face.backend import FaceBox
from veilface.client.face.image_io import ImageSource
from veilface.client.face.pipeline import FaceEmbedding, FacePipeline
from veilface.client.liveness.gate import (
    DEFAULT_LIVENESS,
    LivenessOption,
    LivenessPolicy,
    LivenessResult,
    liveness_record,
)
from veilface.client.liveness.model import LivenessModel
from veilface.client.search import Identification, Verification
from veilface.errors import FaceError, InvalidArgument, PresentationAttackDetected

if TYPE_CHECKING:
    from veilface.client.sdk import VeilClient

log = logging.getLogger(__name__)

__all__ = [
    "FaceCapture",
    "FolderEnrollment",
    "FolderScan",
    "ImageEnrollment",
    "ImageIdentification",
    "ImageOps",
    "ImageVerification",
    "PhotoRefusal",
]


@dataclass(frozen=True)
class FaceCapture:
    """What the pipeline saw of a photo's face (no template): box, sharpness, backend, liveness."""

    box: FaceBox
    sharpness: float
    backend: str
    liveness: LivenessResult

    @classmethod
    def of(cls, emb: FaceEmbedding) -> FaceCapture:
        return cls(box=emb.box, sharpness=emb.sharpness, backend=emb.backend, liveness=emb.liveness)

    def to_json(self) -> dict[str, Any]:
        b = self.box
        return {
            "box": [b.left, b.top, b.right, b.bottom],
            "sharpness": self.sharpness,
            "backend": self.backend,
            "liveness": liveness_record(self.liveness),
        }


@dataclass(frozen=True)
class ImageEnrollment:
    """An enrollment from a photo: the receipt and what the pipeline saw."""

    receipt: EnrollReceipt
    capture: FaceCapture

    @property
    def liveness(self) -> LivenessResult:
        return self.capture.liveness


@dataclass(frozen=True)
class ImageIdentification:
    """A 1:N search from a photo: the identification and what the pipeline saw."""

    identification: Identification
    capture: FaceCapture

    @property
    def subject_id(self) -> str | None:
        return self.identification.subject_id

    @property
    def score(self) -> float:
        return self.identification.score

    @property
    def match(self) -> bool:
        return self.identification.match

    @property
    def liveness(self) -> LivenessResult:
        return self.capture.liveness


@dataclass(frozen=True)
class ImageVerification:
    """A 1:1 check from a photo: the verification and what the pipeline saw."""

    verification: Verification
    capture: FaceCapture

    @property
    def subject_id(self) -> str:
        return self.verification.subject_id

    @property
    def score(self) -> float:
        return self.verification.score

    @property
    def match(self) -> bool:
        return self.verification.match

    @property
    def liveness(self) -> LivenessResult:
        return self.capture.liveness


@dataclass(frozen=True)
class PhotoRefusal:
    """A photo of a folder that the pipeline refused.

    ``reason`` is the error's class name (``"PresentationAttackDetected"``,
    ``"NoFaceFound"``, ...); ``score`` and ``threshold`` are set for a
    presentation attack.
    """

    path: str
    subject_id: str
    reason: str
    message: str
    score: float | None = None
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class FolderScan:
    """The accepted face of each subject of a folder, and the photos refused on the way.

    ``subject_ids[i]``'s template is ``embeddings[i]`` (float32 ``(n, dim)``)
    from the photo ``paths[i]``; photos are tried in name order until one
    passes, so later photos of a subject are not examined.
    """

    subject_ids: tuple[str, ...]
    embeddings: npt.NDArray[np.float32]
    paths: tuple[str, ...]
    captures: tuple[FaceCapture, ...]
    refusals: tuple[PhotoRefusal, ...]
    without_photo: tuple[str, ...]
    photos_examined: int

    @property
    def refused(self) -> dict[str, int]:
        """Photos refused, by reason (the error's class name), most frequent first."""
        return dict(Counter(r.reason for r in self.refusals).most_common())


@dataclass(frozen=True)
class FolderEnrollment:
    """What ``enroll_images`` did: subjects enrolled, photos refused and why.

    ``bins`` is the number of bins a bulk enrollment wrote (``-1`` for one
    by one); ``receipts`` holds the one-by-one receipts.
    """

    scan: FolderScan
    bins: int
    receipts: tuple[EnrollReceipt, ...] = field(default=())

    @property
    def subjects(self) -> int:
        return len(self.scan.subject_ids)

    @property
    def refused(self) -> dict[str, int]:
        return self.scan.refused

    def to_json(self) -> dict[str, Any]:
        s = self.scan
        return {
            "subjects": self.subjects,
            "bins": self.bins,
            "photos_examined": s.photos_examined,
            "photos_refused": len(s.refusals),
            "refused": s.refused,
            "presentation_attacks": s.refused.get(PresentationAttackDetected.__name__, 0),
            "subjects_without_photo": list(s.without_photo),
            "refusals": [r.to_json() for r in s.refusals],
            "liveness": {
                sid: liveness_record(c.liveness)
                for sid, c in zip(s.subject_ids, s.captures, strict=True)
            },
        }


def _refusal(path: Path, subject_id: str, err: FaceError) -> PhotoRefusal:
    if isinstance(err, PresentationAttackDetected):
        return PhotoRefusal(
            str(path), subject_id, type(err).__name__, err.message, err.score, err.threshold
        )
    return PhotoRefusal(str(path), subject_id, type(err).__name__, err.message)


class ImageOps:
    """The photo-based operations of one :class:`~veilface.client.sdk.VeilClient`.

    Parameters
    ----------
    client
        The client whose ``enroll``/``identify``/``verify`` run after the pipeline.
    face_pipeline
        The pipeline to use (its own liveness settings apply). Default: the
        dlib pipeline with ``liveness`` and ``liveness_policy``, created on
        first use.
    liveness, liveness_policy
        As for :class:`~veilface.client.face.FacePipeline`; a path is read
        and verified now. Only without ``face_pipeline``.
    """

    def __init__(
        self,
        client: VeilClient,
        *,
        face_pipeline: FacePipeline | None = None,
        liveness: LivenessOption = DEFAULT_LIVENESS,
        liveness_policy: LivenessPolicy = "refuse",
    ) -> None:
        if face_pipeline is not None and (
            liveness is not DEFAULT_LIVENESS or liveness_policy != "refuse"
        ):
            raise ValueError(
                "give either face_pipeline= or liveness=/liveness_policy=, not both: the "
                "pipeline carries its own liveness settings"
            )
        if face_pipeline is not None and not isinstance(face_pipeline, FacePipeline):
            raise TypeError(f"face_pipeline must be a FacePipeline, not {type(face_pipeline).__name__}")
        if liveness_policy not in ("refuse", "record"):
            raise ValueError(f"liveness_policy must be 'refuse' or 'record', got {liveness_policy!r}")
        self.client = client
        self._pipeline = face_pipeline
        # A user's artifact is verified now, not at the first photo.
        if isinstance(liveness, (str, os.PathLike)):
            liveness = LivenessModel(Path(os.fspath(liveness)))
        self._liveness: LivenessOption = liveness
        self._policy: LivenessPolicy = liveness_policy
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> FacePipeline:
        """The face pipeline (created on first use)."""
        if self._pipeline is None:
            with self._lock:
                if self._pipeline is None:
                    self._pipeline = FacePipeline(
                        liveness=self._liveness, liveness_policy=self._policy
                    )
        return self._pipeline

    def capture(self, image: ImageSource) -> FaceEmbedding:
        """The gated embedding of ``image``'s one face (see ``FacePipeline.embed`` for the errors)."""
        return self.pipeline.embed(image)

    def enroll_image(self, subject_id: str, image: ImageSource, **enroll: Any) -> ImageEnrollment:
        """Gate and embed ``image``, then ``client.enroll(subject_id, ...)`` (keywords passed on)."""
        emb = self.capture(image)
        receipt = self.client.enroll(subject_id, emb.vector, **enroll)
        return ImageEnrollment(receipt, FaceCapture.of(emb))

    def identify_image(self, image: ImageSource, **search: Any) -> ImageIdentification:
        """Gate and embed ``image``, then ``client.identify`` with the keywords ``search``."""
        emb = self.capture(image)
        return ImageIdentification(self.client.identify(emb.vector, **search), FaceCapture.of(emb))

    def verify_image(
        self, subject_id: str, image: ImageSource, *, threshold: float | None = None
    ) -> ImageVerification:
        """Gate and embed ``image``, then ``client.verify(subject_id, ...)``."""
        emb = self.capture(image)
        result = self.client.verify(subject_id, emb.vector, threshold=threshold)
        return ImageVerification(result, FaceCapture.of(emb))

    def scan_folder(self, folder: str | Path, *, progress: bool = False) -> FolderScan:
        """Gate and embed one photo per subject of ``folder/<subject>/<photo>`` (nothing sent).

        Each subject's photos are tried in name order (hidden files
        skipped) until one passes; every photo refused on the way is kept
        with its reason.

        Raises
        ------
        InvalidArgument
            ``folder`` is not a folder, or holds no ``<subject>/<photo>`` file.
        LivenessModelInvalid
            The liveness gate cannot run: nothing is enrolled unchecked.
        """
        root = Path(folder)
        if not root.is_dir():
            raise InvalidArgument(f"{root} is not a folder of <subject>/<photo> files")
        people = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        todo = [
            (person, sorted(f for f in person.iterdir() if f.is_file() and not f.name.startswith(".")))
            for person in people
        ]
        if not any(files for _, files in todo):
            raise InvalidArgument(f"{root}: no <subject>/<photo> files found")
        items: Any = todo
        if progress:
            from tqdm import tqdm

            items = tqdm(todo, desc="checking photos", unit="subject")
        ids: list[str] = []
        vectors: list[npt.NDArray[np.float32]] = []
        paths: list[str] = []
        captures: list[FaceCapture] = []
        refusals: list[PhotoRefusal] = []
        missing: list[str] = []
        examined = 0
        for person, files in items:
            for f in files:
                examined += 1
                try:
                    emb = self.capture(f)
                except FaceError as err:
                    refusals.append(_refusal(f, person.name, err))
                    continue
                ids.append(person.name)
                vectors.append(emb.vector)
                paths.append(str(f))
                captures.append(FaceCapture.of(emb))
                break
            else:
                missing.append(person.name)
        dim = self.pipeline.backend.embedding_dim
        scan = FolderScan(
            subject_ids=tuple(ids),
            embeddings=np.asarray(vectors, dtype=np.float32).reshape(len(vectors), dim),
            paths=tuple(paths),
            captures=tuple(captures),
            refusals=tuple(refusals),
            without_photo=tuple(missing),
            photos_examined=examined,
        )
        log.info(
            "folder scan: %d subjects accepted, %d photos refused %s",
            len(ids), len(refusals), scan.refused,
        )
        return scan

    def enroll_scan(self, scan: FolderScan, *, single: bool = False) -> FolderEnrollment:
        """Enroll the accepted faces of a :meth:`scan_folder` (bulk, or one by one with ``single``)."""
        if not scan.subject_ids:
            why = ", ".join(f"{n} {reason}" for reason, n in scan.refused.items())
            raise InvalidArgument(
                f"no photo passed the face pipeline ({len(scan.refusals)} refused: {why}); "
                "nothing was enrolled"
            )
        if single:
            receipts = tuple(
                self.client.enroll(sid, vec)
                for sid, vec in zip(scan.subject_ids, scan.embeddings, strict=True)
            )
            return FolderEnrollment(scan, bins=-1, receipts=receipts)
        bulk: BulkReceipt = self.client.enroll_many(list(scan.subject_ids), scan.embeddings)
        return FolderEnrollment(scan, bins=bulk.bins)

    def enroll_images(
        self, folder: str | Path, *, single: bool = False, progress: bool = False
    ) -> FolderEnrollment:
        """:meth:`scan_folder` then :meth:`enroll_scan`: nothing is sent until every photo was checked."""
        return self.enroll_scan(self.scan_folder(folder, progress=progress), single=single)
