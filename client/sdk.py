"""``VeilClient``: the tenant SDK for enrollment, identification and verification.

The client is the only party that ever sees a template, a probe or a score
in clear. It normalizes templates (cosine = inner product), mixes them with
the tenant's secret orthogonal matrix (inner products unchanged), routes
them with its FAISS IVF lists, encrypts, and makes every decision itself:
preselection top-K, final top-1, threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from veilface.client import convert, photos
from veilface.client.convert import KeyInfo, TenantInfo
from veilface.client.enrollment import (  # the receipts are re-exported from here
    BulkReceipt,
    Enroller,
    EnrollReceipt,
)
from veilface.client.face.image_io import ImageSource
from veilface.client.face.pipeline import FacePipeline
from veilface.client.image_ops import (  # the photo results are re-exported from here
    FolderEnrollment,
    ImageEnrollment,
    ImageIdentification,
    ImageOps,
    ImageVerification,
)
from veilface.client.kiosk import not_for_kiosk
from veilface.client.liveness.gate import DEFAULT_LIVENESS, LivenessOption, LivenessPolicy
from veilface.client.protect import ProtectedImage
from veilface.client.repack import RepackReport, repack
from veilface.client.route_training import search_options, train_routing
from veilface.client.route_tuning import TuneOptions
from veilface.client.search import (  # the result types are re-exported from here
    Candidate,
    Identification,
    QueryStats,
    Searcher,
    SearchMode,
    SearchOptions,
    Verification,
)
from veilface.client.search_defaults import SearchDefaults
from veilface.client.slot_maps import SlotMaps
from veilface.client.tenant_state import TenantState
from veilface.client.thresholds import DEFAULT_TARGET_FPIR, ThresholdPolicy
from veilface.client.transport import Transport
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import FailedPrecondition, InvalidArgument
from veilface.proto.v1 import veilface_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]

class VeilClient:
    """Talk to a veilface server as one tenant.

    Parameters
    ----------
    target : ``host:port`` of the server, or several (a list or ``"a:1,b:2"``):
        one channel balanced round-robin over them (front-ends sharing a store)
    state : the tenant's keys, routing and thresholds (:class:`TenantState`)
    token : the tenant's API token
    root_cert : PEM root certificate to verify the server (TLS). Without it a
        loopback target is plaintext and any other target is TLS against the
        system roots (``client/transport.py``)
    insecure : allow plaintext to a non-loopback target that has no root_cert
        (logged as a warning: the token travels in clear)
    encrypt_workers : processes that encrypt in parallel (0 or 1: in this process)
    face_pipeline, liveness, liveness_policy : how the ``*_image`` methods embed a
        photo: this pipeline, or the dlib one with this liveness gate (default: the
        shipped model; ``None`` skips it, recorded); see :mod:`veilface.client.image_ops`
    target_fpir : false-positive identification rate ``identify`` sets its threshold
        for at the gallery's size, for the face model of the key's dimension (dlib
        at 128-d; :mod:`veilface.client.thresholds`); ``verify`` keeps the tenant's
    """

    def __init__(
        self,
        target: str | Sequence[str],
        state: TenantState,
        *,
        token: str,
        root_cert: Path | None = None,
        insecure: bool = False,
        timeout_s: float = 300.0,
        encrypt_workers: int = 2,
        face_pipeline: FacePipeline | None = None,
        liveness: LivenessOption = DEFAULT_LIVENESS,
        liveness_policy: LivenessPolicy = "refuse",
        target_fpir: float = DEFAULT_TARGET_FPIR,
    ) -> None:
        self.images = ImageOps(
            self, face_pipeline=face_pipeline, liveness=liveness, liveness_policy=liveness_policy
        )
        self.state = state
        self.crypto = TenantCrypto(state.keys(), workers=encrypt_workers)
        self.layout = self.crypto.layout
        self._mix = state.mixing_matrix()
        self._handles = state.handles()
        self.transport = Transport(
            target, token=token, root_cert=root_cert, insecure=insecure, timeout_s=timeout_s
        )
        self._center_checked = False
        self._fallback_said = False  # routed queries running strict: warned once per client
        # The 1:N threshold for the gallery's size (client/thresholds.py); verify keeps the tenant's.
        self.thresholds = ThresholdPolicy(state.dim, target_fpir=target_fpir)
        # Enrollment internals: staged templates and their background folds, bulk streams.
        self._enroller = Enroller(self)
        # Identification stages; keeps this key's copy of the bins' slot -> handle maps.
        self._search = Searcher(
            self.transport,
            self.crypto,
            self._handles,
            SlotMaps(),
            tenant_id=state.tenant_id,
            key_id=state.key_id,
        )

    def close(self) -> None:
        """Finish pending folds of staged enrollments, then close the channel."""
        try:
            self._enroller.close()
        finally:
            self.transport.close()
            self.crypto.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- preparation ----------------------------------------------------

    def normalize(self, embeddings: npt.ArrayLike) -> FloatArray:
        """Check and L2-normalize embeddings: float64 [n, dim] (a [dim] input gives [1, dim])."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.state.dim:
            raise InvalidArgument(
                f"embeddings must have shape [n, {self.state.dim}], got {tuple(x.shape)}"
            )
        if not np.isfinite(x).all():
            raise InvalidArgument("embeddings contain NaN or infinite values")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms < 1e-12).any():
            raise InvalidArgument("an embedding has zero norm")
        return np.asarray(x / norms, dtype=np.float64)

    @property
    def center(self) -> FloatArray:
        """The tenant's centering vector ``mu`` (zeros until calibrated)."""
        c = getattr(self.state, "center", None)
        return np.zeros(self.state.dim) if c is None else np.asarray(c, dtype=np.float64)

    @not_for_kiosk("calibrating the key")
    def calibrate(self, embeddings: npt.ArrayLike) -> None:
        """Fix the centering vector from the tenant's own templates (once per key).

        Templates are stored as ``mix @ (x - mu)`` and scores come back as
        ``(x - mu) . p``; the client adds ``mu . p``, the same for every
        template, so the final cosine is exact. Centering removes the
        direction all faces share, which otherwise dominates the
        preselection window. It must not change once templates are enrolled
        under the key.
        """
        if getattr(self.state, "center", None) is not None:
            raise FailedPrecondition("the centering vector is already fixed for this key")
        self.state.center = self.normalize(embeddings).mean(axis=0)
        self.register_center()

    @not_for_kiosk("registering the centering vector")
    def register_center(self) -> None:
        """Send the encrypted centering vector (the server adds ``(x - mu) . mu`` at re-ranking)."""
        mixed = self._mix @ self.center
        self.transport.call(
            self.transport.tenants.RegisterCenter,
            pb.RegisterCenterRequest(
                tenant_id=self.state.tenant_id,
                key_id=self.state.key_id,
                center_ciphertexts=self.crypto.encrypt_probe(mixed),
            ),
        )

    def _freeze_center(self) -> None:
        self._check_center()
        if getattr(self.state, "center", None) is None:
            self.state.center = np.zeros(self.state.dim)

    def _check_center(self) -> None:
        """Refuse to work with a state file that lost the key's centering vector.

        Scores would be wrong (and a re-pack would corrupt templates) if the
        server holds the key's encrypted center but this state has none:
        the state was not saved after the calibration that fixed it.
        """
        if self._center_checked or getattr(self.state, "center", None) is not None:
            return
        held = {k.key_id: k for k in self.describe().keys}.get(self.state.key_id)
        if held is not None and held.has_center:
            raise FailedPrecondition(
                f"the server holds a centering vector for key {self.state.key_id!r} but this "
                "tenant state has none: use the state file saved after the first enrollment"
            )
        self._center_checked = True

    def prepare(self, embeddings: npt.ArrayLike) -> FloatArray:
        """Templates as stored: mixed, centered, normalized. float64 [n, dim]."""
        return np.asarray((self.normalize(embeddings) - self.center) @ self._mix.T, dtype=np.float64)

    def prepare_probe(
        self, embedding: npt.ArrayLike, *, centered: bool = False
    ) -> tuple[FloatArray, float]:
        """A probe as encrypted (mixed, normalized) and its offset ``mu . p``.

        ``centered=True`` sends ``p - mu`` (identification): preselection then
        compares centered vectors, and the server adds ``(x - mu) . mu`` when
        it re-ranks, so that the full score is still ``(x - mu) . p``.
        """
        p = self.normalize(embedding)[0]
        q = p - self.center if centered else p
        return np.asarray(self._mix @ q, dtype=np.float64), float(self.center @ p)

    def _lists_for(self, xn: FloatArray) -> Int64Array | None:
        """Routing lists of normalized (unmixed, uncentered) templates (None: no routing)."""
        router = self.state.router
        if router is None:
            return None
        return router.assign((xn @ self._mix.T).astype(np.float32))

    def _enrollment_labels(self, xn: FloatArray) -> list[str]:
        """Labels single enrollments of these templates reserve their slots under."""
        lists = self._lists_for(xn)
        if lists is None or self.state.router is None:
            return [""] * len(xn)
        return self.state.router.enrollment_labels(lists.tolist())

    # -- tenant ---------------------------------------------------------

    @not_for_kiosk("registering a key")
    def register_key(self) -> KeyInfo:
        """Register the public context (and the center, if already fixed); the key as registered."""
        keys = self.state.keys()
        resp = self.transport.call(
            self.transport.tenants.RegisterKey,
            pb.RegisterKeyRequest(
                tenant_id=self.state.tenant_id,
                key_id=self.state.key_id,
                public_context=keys.public_context_bytes(),
            ),
        )
        if getattr(self.state, "center", None) is not None and not resp.key.has_center:
            self.register_center()
        return convert.key_info_from_proto(resp.key)

    def describe(self) -> TenantInfo:
        """The tenant's keys with their parameters and counts (subjects, bins, bytes at rest)."""
        resp = self.transport.call(
            self.transport.tenants.DescribeTenant,
            pb.DescribeTenantRequest(tenant_id=self.state.tenant_id),
        )
        return convert.tenant_info_from_proto(resp)

    @not_for_kiosk("training the routing lists")
    def train_routing(
        self, embeddings: npt.ArrayLike, *, nlist: int | None = None, target_recall: float = 0.995,
        seed: int = 0, force: bool = False, allow_small: bool = False, tuning: TuneOptions | None = None,
    ) -> SearchDefaults:
        """Train the IVF lists on the tenant's own templates, before enrolling under them.

        ``nlist=None``: the SDK chooses lists, ``nprobe`` and ``k`` for
        ``target_recall`` on pseudo-probes of these templates, or strict where
        routing would not pay; an explicit ``nlist`` is kept and ``nprobe``,
        ``k`` measured for it. Kept in :attr:`TenantState.search`, used by
        :meth:`identify`; too few templates make routed queries run strict
        unless ``allow_small`` (:mod:`veilface.client.route_training`).
        Refused once the key holds subjects (their bins keep their lists'
        labels) unless ``force``: retrain with :meth:`repack`.
        """
        return train_routing(
            self, embeddings, nlist=nlist, target_recall=target_recall, seed=seed, force=force,
            allow_small=allow_small, tuning=tuning,
        )

    # -- enrollment -----------------------------------------------------

    @not_for_kiosk("enrolling")
    def enroll(
        self,
        subject_id: str,
        embedding: npt.ArrayLike,
        *,
        fold: str = "background",
        staged: bool = True,
    ) -> EnrollReceipt:
        """Enroll one template on its own; durable (and searchable) on return.

        The template is first acknowledged in the key's staging area: one
        ciphertext, searched in full by every query until it is folded into
        its bin (PFIP flexible enrollment: encrypted alone at its slot and
        added homomorphically). ``fold`` says when that happens:
        ``"background"`` (default: a worker thread of this client, right
        away; :meth:`flush` waits for it), ``"now"`` (before returning) or
        ``"later"`` (left for :meth:`fold_staged`). When the staging area is
        full or the key predates it (or ``staged=False``), the template goes
        straight into its bin: 128 ciphertexts instead of one, several times
        slower to acknowledge.
        """
        return self._enroller.enroll(subject_id, embedding, fold=fold, staged=staged)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until this client's background folds are done (failures are logged)."""
        self._enroller.flush(timeout_s)

    @not_for_kiosk("folding staged templates")
    def fold_staged(self, *, limit: int = 0) -> int:
        """Fold staged templates left by any client of this key (for example one that died).

        Fetches them, decrypts each, re-encrypts it into its bin and removes
        it from the staging area in one server transaction. Returns how many
        were folded.
        """
        return self._enroller.fold_staged(limit=limit)

    @not_for_kiosk("bulk enrollment")
    def enroll_many(
        self, subject_ids: Sequence[str], embeddings: npt.ArrayLike, *, progress: bool = False
    ) -> BulkReceipt:
        """Bulk import: pack whole bins client-side and stream them (all-or-nothing)."""
        return self._enroller.enroll_many(subject_ids, embeddings, progress=progress)

    @not_for_kiosk("re-packing or rotating the gallery")
    def repack(
        self,
        *,
        nlist: int | None = None,
        target: VeilClient | None = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> RepackReport:
        """Re-pack this key's whole gallery in one atomic swap.

        ``nlist``: retrain the routing lists on the gallery itself (as it
        grows) and regroup every template under the new lists; with neither
        ``nlist`` nor ``target`` the SDK re-chooses the lists, ``nprobe`` and
        ``k`` for the gallery as it now is (:meth:`train_routing`). ``target``:
        a client of a new key of the same tenant (key rotation, see
        :meth:`TenantState.rotated`); the gallery moves to it under new
        handles, new list labels, in a random order, and the subjects'
        photos are then re-sealed under the new key. The old bins
        keep serving until the server swaps them out in one transaction
        (FAILED_PRECONDITION if one changed meanwhile: run it again).
        ``seed``: k-means seed of the retrained lists (default 0 for a
        re-pack, a random one for a rotation, so that the new lists are not
        the old ones under new names).
        """
        return repack(self, nlist=nlist, target=target, seed=seed, progress=progress)

    # -- identification -------------------------------------------------

    def identify(
        self,
        embedding: npt.ArrayLike,
        *,
        mode: str | SearchMode = "strict",
        k: int | None = None,
        nprobe: int | None = None,
        decoys: int = 0,
        threshold: float | None = None,
        rng: np.random.Generator | None = None,
        top_n: int = 5,
        rerank_all_above: float = 0.75,
    ) -> Identification:
        """1:N search: preselect on the first coordinates, re-rank the top ``k``, decide.

        The stages are in :mod:`veilface.client.search`; in routed mode every
        named label, decoy or real, is re-ranked alike, and the winner's
        handle is read from this client's own slot maps (no request names it).

        Parameters
        ----------
        embedding : float array [dim]
        mode : ``strict`` (every bin) or ``routed`` (the ``nprobe`` nearest lists);
            a :class:`~veilface.client.search.SearchMode` or its value
        k : candidates kept after preselection; their bins are scored in full
            (0: every searched template scored whole, in one stage: exact).
            Routed mode gives each named label ``ceil(k / real lists)`` of them.
            ``k``, ``nprobe``: strict defaults to 0; routed to what
            :meth:`train_routing` chose (else 32, 8).
            Routing trained on too few templates runs strict (``Identification.fallback``)
        top_n : candidates returned (with handles), best first
        rerank_all_above : when the re-ranked bins would be at least this share
            of the searched bins, every searched bin is re-ranked
        decoys : extra lists searched in routed mode, drawn as fake queries, to
            blur which are real (ignored in strict mode)
        threshold : cosine threshold for ``match``; by default the face model's
            threshold for ``target_fpir`` at the key's gallery size, never below
            the tenant's (client/thresholds.py). The result records which.
        rng : generator for the decoys (tests only; default: the OS CSPRNG)
        """
        t0 = time.perf_counter()
        chosen = search_options(self.state, mode, k, nprobe)
        if chosen.fallback and not self._fallback_said:
            log.warning("routed queries run strict: %s", chosen.fallback)
            self._fallback_said = True
        opts = SearchOptions(chosen.mode, chosen.k, chosen.nprobe, decoys, top_n, rerank_all_above)
        self._check_center()
        stats = QueryStats()
        xn = self.normalize(embedding)
        x, offset = self.prepare_probe(xn, centered=True)
        probe = self.crypto.encrypt_probe(x)
        stats.encrypt_ms = (time.perf_counter() - t0) * 1e3
        result = self._search.identify(
            probe,
            offset,
            self._mix @ xn[0],
            opts,
            router=self.state.router,
            threshold=self.state.threshold if threshold is None else threshold,
            stats=stats,
            rng=rng,
        )
        self.thresholds.decide(
            result, tenant_threshold=self.state.threshold, explicit=threshold,
            strict=opts.mode is SearchMode.STRICT, gallery_size=self._gallery_size,
        )
        stats.total_ms = (time.perf_counter() - t0) * 1e3
        result.fallback = chosen.fallback
        return result

    def _gallery_size(self) -> int:
        """The key's templates (in bins and staged), as DescribeTenant counts them."""
        held = self.describe().key(self.state.key_id)
        return held.subjects if held is not None else 0

    def verify(
        self, subject_id: str, embedding: npt.ArrayLike, *, threshold: float | None = None
    ) -> Verification:
        """1:1 against a claimed subject; the tenant decrypts and applies its threshold."""
        self._check_center()
        x, offset = self.prepare_probe(embedding)
        req = convert.verify_request(
            self.state.tenant_id,
            self.state.key_id,
            self._handles.encode(subject_id),
            self.crypto.encrypt_probe(x),
        )
        reply = convert.verify_from_proto(
            self.transport.call(self.transport.identification.Verify, req)
        )
        score = float(self.crypto.decrypt_scores(reply.scores)[reply.slot] + offset)
        thr = self.state.threshold if threshold is None else threshold
        return Verification(subject_id, score, score >= thr)

    # -- from photos (face pipeline and liveness gate first; client/image_ops.py) --

    @not_for_kiosk("enrolling")
    def enroll_image(self, subject_id: str, image: ImageSource, **enroll: Any) -> ImageEnrollment:
        """Enroll the one face of a photo once it passed the pipeline and the liveness gate."""
        return self.images.enroll_image(subject_id, image, **enroll)

    @not_for_kiosk("enrolling")
    def enroll_images(
        self, folder: str | Path, *, single: bool = False, progress: bool = False
    ) -> FolderEnrollment:
        """Enroll ``folder/<subject>/<photo>``: each subject's first photo that passes; refusals counted."""
        return self.images.enroll_images(folder, single=single, progress=progress)

    def identify_image(self, image: ImageSource, **search: Any) -> ImageIdentification:
        """:meth:`identify` (same keywords) on the one face of a photo, after the liveness gate."""
        return self.images.identify_image(image, **search)

    def verify_image(
        self, subject_id: str, image: ImageSource, *, threshold: float | None = None
    ) -> ImageVerification:
        """:meth:`verify` on the one face of a photo, after the liveness gate."""
        return self.images.verify_image(subject_id, image, threshold=threshold)

    # -- photos -----------------------------------------------------------

    @not_for_kiosk("keeping photos")
    def upload_photo(self, subject_id: str, image: ProtectedImage) -> str:
        """Keep a protected photo of an enrolled subject; returns its photo id.

        Only a :class:`~veilface.client.protect.ProtectedImage` is accepted
        (made by ``deidentify`` or another protector); it is sealed with the
        tenant's key before it leaves, and deleted with the subject.
        """
        return photos.upload_photo(self, subject_id, image)

    @not_for_kiosk("listing photos")
    def list_photos(self, subject_id: str) -> list[str]:
        return photos.list_photos(self, subject_id)

    @not_for_kiosk("fetching photos")
    def fetch_photo(self, photo_id: str) -> tuple[str, bytes, dict[str, object]]:
        """(subject id, JPEG bytes, protection record) of a kept photo."""
        return photos.fetch_photo(self, photo_id)

    @not_for_kiosk("deleting a subject")
    def delete(self, subject_id: str, *, retries: int = 3) -> None:
        """Delete a subject: re-pack its bin without it; the server forgets the handle and its photos."""
        self._enroller.delete(subject_id, retries=retries)


__all__ = [
    "BulkReceipt",
    "Candidate",
    "EnrollReceipt",
    "FolderEnrollment",
    "Identification",
    "ImageEnrollment",
    "ImageIdentification",
    "ImageVerification",
    "QueryStats",
    "RepackReport",
    "SearchDefaults",
    "SearchMode",
    "VeilClient",
    "Verification",
]
