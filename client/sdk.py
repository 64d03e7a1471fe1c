"""``VeilClient``: the tenant SDK for enrollment, identification and verification.

The client is the only party that ever sees a template, a probe or a score
in clear. It normalizes templates (cosine = inner product), mixes them with
the tenant's secret orthogonal matrix (inner products unchanged), routes
them with its FAISS IVF lists, encrypts, and makes every decision itself:
preselection top-K, final top-1, threshold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from veilface.client.protect import ProtectedImage
from veilface.client.routing import Router
from veilface.client.tenant_state import TenantState
from veilface.client.transport import Transport
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from veilface.proto.v1 import veilface_pb2 as pb

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Candidate:
    subject_id: str
    handle: str
    score: float


@dataclass
class QueryStats:
    """Where the time and bytes of one query went (for benchmarks)."""

    encrypt_ms: float = 0.0
    preselect_ms: float = 0.0
    rerank_ms: float = 0.0
    decrypt_ms: float = 0.0
    total_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    bins_preselected: int = 0
    bins_reranked: int = 0
    searched_templates: int = 0


@dataclass
class Identification:
    """Result of a 1:N search. ``match`` applies the tenant's threshold to ``score``."""

    subject_id: str | None
    score: float
    match: bool
    candidates: list[Candidate] = field(default_factory=list)
    stats: QueryStats = field(default_factory=QueryStats)


@dataclass(frozen=True)
class Verification:
    subject_id: str
    score: float
    match: bool


@dataclass(frozen=True)
class EnrollReceipt:
    """Where an acknowledged (durable) enrollment went.

    ``staged_id`` is set when the template was acknowledged in the staging
    area (``bin_id`` and ``slot`` are then 0 until its fold into a bin).
    """

    subject_id: str
    handle: str
    bin_id: int
    slot: int
    staged_id: int = 0


@dataclass(frozen=True)
class BulkReceipt:
    bins: int
    subjects: int


@dataclass(frozen=True)
class RepackReport:
    """What a re-pack did: subjects moved, bins before and after, the key they are under."""

    subjects: int
    old_bins: int
    new_bins: int
    key_id: str


def _bits(occupancy: bytes, capacity: int) -> npt.NDArray[np.bool_]:
    arr = np.unpackbits(np.frombuffer(occupancy, dtype=np.uint8), bitorder="little")
    return arr[:capacity].astype(bool)


class VeilClient:
    """Talk to a veilface server as one tenant.

    Parameters
    ----------
    target : ``host:port`` of the server
    state : the tenant's keys, routing and thresholds (:class:`TenantState`)
    token : the tenant's API token
    root_cert : PEM root certificate to verify the server (TLS); None for plaintext
    encrypt_workers : processes that encrypt in parallel (0 or 1: in this process)
    """

    def __init__(
        self,
        target: str,
        state: TenantState,
        *,
        token: str,
        root_cert: Path | None = None,
        timeout_s: float = 300.0,
        encrypt_workers: int = 2,
    ) -> None:
        self.state = state
        self.crypto = TenantCrypto(state.keys(), workers=encrypt_workers)
        self.layout = self.crypto.layout
        self._mix = state.mixing_matrix()
        self._handles = state.handles()
        self.transport = Transport(target, token=token, root_cert=root_cert, timeout_s=timeout_s)
        self._folder: ThreadPoolExecutor | None = None
        self._folds: set[Future[None]] = set()
        self._folds_lock = threading.Lock()
        self._staging = True  # False once the server says this key cannot stage
        self._center_checked = False

    def close(self) -> None:
        """Finish pending folds of staged enrollments, then close the channel."""
        try:
            self.flush()
        finally:
            if self._folder is not None:
                self._folder.shutdown(wait=True)
            self.transport.close()
            self.crypto.close()

    def __enter__(self) -> VeilClient:
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

    def _labels_for(self, xn: FloatArray) -> list[str]:
        """Routing labels of normalized (unmixed, uncentered) templates."""
        router = self.state.router
        if router is None:
            return [""] * len(xn)
        return router.labels(router.assign((xn @ self._mix.T).astype(np.float32)).tolist())

    # -- tenant ---------------------------------------------------------

    def register_key(self) -> pb.KeyInfo:
        """Register the public context (and the center, if already fixed)."""
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
        key: pb.KeyInfo = resp.key
        return key

    def describe(self) -> pb.DescribeTenantResponse:
        resp: pb.DescribeTenantResponse = self.transport.call(
            self.transport.tenants.DescribeTenant,
            pb.DescribeTenantRequest(tenant_id=self.state.tenant_id),
        )
        return resp

    def train_routing(
        self, embeddings: npt.ArrayLike, *, nlist: int, seed: int = 0, force: bool = False
    ) -> Router:
        """Train the IVF lists on the tenant's own templates, before enrolling under them.

        Bins keep the label of the list they were enrolled under, so
        retraining once the key holds subjects would make routed queries miss
        them: it is refused unless ``force=True``. To retrain as the gallery
        grows, use :meth:`repack` (``nlist=``), which also re-packs the bins.
        """
        if not force and self.state.router is not None:
            keys = {k.key_id: k for k in self.describe().keys}
            held = keys.get(self.state.key_id)
            if held is not None and held.subjects > 0:
                raise FailedPrecondition(
                    f"key {self.state.key_id!r} already holds {held.subjects} subjects routed "
                    "by the current lists; retrain with repack(nlist=...), which re-packs them"
                )
        x = (self.normalize(embeddings) @ self._mix.T).astype(np.float32)
        version = (self.state.router.version + 1) if self.state.router else 1
        self.state.router = Router.train(
            x, nlist=nlist, label_key=self.state.label_key, version=version, seed=seed
        )
        return self.state.router

    # -- enrollment -----------------------------------------------------

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
        if fold not in {"background", "now", "later"}:
            raise InvalidArgument("fold must be 'background', 'now' or 'later'")
        self._freeze_center()
        xn = self.normalize(embedding)
        x = self.prepare(xn)
        handle = self._handles.encode(subject_id)
        label = self._labels_for(xn)[0]
        if self._staging and staged:
            try:
                resp = self.transport.call(
                    self.transport.enrollment.EnrollStaged,
                    pb.EnrollStagedRequest(
                        tenant_id=self.state.tenant_id,
                        key_id=self.state.key_id,
                        label=label,
                        handle=handle,
                        ciphertext=self.crypto.encrypt_staged(x[0]),
                    ),
                )
            except FailedPrecondition:
                log.info("this key cannot stage templates; enrolling straight into bins")
                self._staging = False
            except ResourceExhausted:
                log.info("staging area full; enrolling straight into a bin")
            else:
                staged_id = int(resp.staged_id)
                if fold == "now":
                    self._fold(handle, label, x, staged_id)
                elif fold == "background":
                    self._fold_in_background(handle, label, x, staged_id)
                return EnrollReceipt(subject_id, handle, 0, 0, staged_id)
        bin_id, slot = self._enroll_into_bin(handle, label, x)
        return EnrollReceipt(subject_id, handle, bin_id, slot)

    def _fold_in_background(self, handle: str, label: str, x: FloatArray, staged_id: int) -> None:
        if self._folder is None:
            self._folder = ThreadPoolExecutor(1, thread_name_prefix="veilface-fold")
        fut = self._folder.submit(self._fold, handle, label, x, staged_id)
        with self._folds_lock:
            self._folds.add(fut)

        def done(f: Future[None]) -> None:
            with self._folds_lock:
                self._folds.discard(f)
            if not f.cancelled() and (exc := f.exception()) is not None:
                # The template stays staged (and searchable); fold_staged() retries.
                log.warning("fold of a staged template failed: %s", type(exc).__name__)

        fut.add_done_callback(done)

    def _fold(self, handle: str, label: str, x: FloatArray, staged_id: int) -> None:
        self._enroll_into_bin(handle, label, x, staged_id)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until this client's background folds are done (failures are logged)."""
        with self._folds_lock:
            pending = list(self._folds)
        for f in pending:
            if f.exception(timeout=timeout_s) is not None:
                continue  # logged by the done callback; the template stays staged

    def fold_staged(self, *, limit: int = 0) -> int:
        """Fold staged templates left by any client of this key (for example one that died).

        Fetches them, decrypts each, re-encrypts it into its bin and removes
        it from the staging area in one server transaction. Returns how many
        were folded.
        """
        self.flush()
        resp = self.transport.call(
            self.transport.enrollment.FetchStaged,
            pb.FetchStagedRequest(tenant_id=self.state.tenant_id, key_id=self.state.key_id, limit=limit),
        )
        done = 0
        for t in resp.staged:
            x = self.crypto.decrypt_staged(t.ciphertext)[None, :]
            try:
                self._fold(t.handle, t.label, x, int(t.staged_id))
            except NotFound:  # deleted or folded by another client meanwhile
                continue
            done += 1
        return done

    def _enroll_into_bin(
        self, handle: str, label: str, x: FloatArray, staged_id: int = 0
    ) -> tuple[int, int]:
        """Reserve a slot and add the template into its bin (streamed); (bin id, slot)."""
        res = self.transport.call(
            self.transport.enrollment.ReserveSlots,
            pb.ReserveSlotsRequest(
                tenant_id=self.state.tenant_id, key_id=self.state.key_id, label=label, count=1
            ),
        )
        def messages() -> Iterator[pb.EnrollRequest]:
            # Encrypt chunk k+1 while chunk k is on the wire and being checked.
            for i, cts in enumerate(self.crypto.encrypt_contribution_chunks(x, list(res.slots))):
                if i == 0:
                    yield pb.EnrollRequest(
                        tenant_id=self.state.tenant_id,
                        key_id=self.state.key_id,
                        reservation_id=res.reservation_id,
                        handles=[handle],
                        ciphertexts=cts,
                        staged_id=staged_id,
                    )
                else:
                    yield pb.EnrollRequest(ciphertexts=cts)

        resp = self.transport.call(self.transport.enrollment.Enroll, messages())
        return int(resp.bin_id), int(resp.slots[0])

    def _bulk_chunks(
        self,
        handles: Sequence[str],
        xn: FloatArray,
        progress: bool,
        replaces: Sequence[pb.BinRef] = (),
    ) -> Iterator[pb.BulkEnrollChunk]:
        from tqdm import tqdm

        labels = self._labels_for(xn)
        first = True
        x = self.prepare(xn)
        order: dict[str, list[int]] = {}
        for i, lab in enumerate(labels):
            order.setdefault(lab, []).append(i)
        cap = self.layout.capacity
        bar = tqdm(total=len(x), unit="tpl", desc="encrypting bins", disable=not progress)
        try:
            for lab, rows in order.items():
                for start in range(0, len(rows), cap):
                    idx = rows[start : start + cap]
                    slots = list(range(len(idx)))
                    cts = self.crypto.encrypt_contribution(x[idx], slots)
                    bar.update(len(idx))
                    yield pb.BulkEnrollChunk(
                        tenant_id=self.state.tenant_id,
                        key_id=self.state.key_id,
                        label=lab,
                        handles=[handles[i] for i in idx],
                        slots=slots,
                        ciphertexts=cts,
                        replaces=list(replaces) if first else [],
                    )
                    first = False
        finally:
            bar.close()

    def enroll_many(
        self, subject_ids: Sequence[str], embeddings: npt.ArrayLike, *, progress: bool = False
    ) -> BulkReceipt:
        """Bulk import: pack whole bins client-side and stream them (all-or-nothing)."""
        xn = self.normalize(embeddings)
        if len(subject_ids) != len(xn):
            raise InvalidArgument("one subject id per embedding is required")
        if len(set(subject_ids)) != len(subject_ids):
            raise InvalidArgument("subject ids must be distinct")
        if getattr(self.state, "center", None) is None:
            self.calibrate(xn)  # first templates of this key: fix the center from them
        handles = [self._handles.encode(s) for s in subject_ids]
        resp = self.transport.call(
            self.transport.enrollment.BulkEnroll, self._bulk_chunks(handles, xn, progress)
        )
        return BulkReceipt(resp.bins, resp.subjects)

    def repack(
        self,
        *,
        nlist: int | None = None,
        target: VeilClient | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> RepackReport:
        """Re-pack this key's whole gallery in one atomic swap.

        ``nlist``: retrain the routing lists on the gallery itself (as it
        grows) and regroup every template under the new lists. ``target``:
        a client of a new key of the same tenant (key rotation, see
        :meth:`TenantState.rotated`); the gallery moves to it. The old bins
        keep serving until the server swaps them out in one transaction
        (FAILED_PRECONDITION if one changed meanwhile: run it again).
        """
        from veilface.client.repack import repack

        return repack(self, nlist=nlist, target=target, seed=seed, progress=progress)

    # -- identification -------------------------------------------------

    def identify(
        self,
        embedding: npt.ArrayLike,
        *,
        mode: str = "strict",
        k: int = 32,
        nprobe: int = 8,
        decoys: int = 0,
        threshold: float | None = None,
        rng: np.random.Generator | None = None,
        top_n: int = 5,
        rerank_all_above: float = 0.75,
    ) -> Identification:
        """1:N search: preselect on the first coordinates, re-rank the top ``k``, decide.

        Parameters
        ----------
        embedding : float array [dim]
        mode : ``strict`` (every bin) or ``routed`` (the ``nprobe`` nearest lists)
        k : candidates kept after preselection; their bins are scored in full
            (0: score every searched bin in full, exact but with no saving)
        top_n : candidates returned (with handles), best first
        rerank_all_above : when the candidates' bins are at least this share of
            the searched bins, every searched bin is re-ranked
        decoys : extra random lists searched in routed mode, to blur which are real
        threshold : cosine threshold for ``match`` (default: the tenant's)
        """
        t0 = time.perf_counter()
        self._check_center()
        stats = QueryStats()
        xn = self.normalize(embedding)
        x, offset = self.prepare_probe(xn, centered=True)
        probe = self.crypto.encrypt_probe(x)
        x_route = self._mix @ xn[0]
        stats.encrypt_ms = (time.perf_counter() - t0) * 1e3
        labels: list[str] = []
        if mode == "routed":
            router = self.state.router
            if router is None:
                raise FailedPrecondition("routed mode needs trained routing (train_routing)")
            lists = router.probe_lists(x_route.astype(np.float32), min(nprobe, router.nlist))
            # real and decoy labels together, sorted, decoys from the OS CSPRNG
            labels = router.query_labels(np.asarray(lists).reshape(-1).tolist(), decoys=decoys, rng=rng)
        elif mode != "strict":
            raise InvalidArgument("mode must be 'strict' or 'routed'")
        req = pb.PreselectRequest(
            tenant_id=self.state.tenant_id,
            key_id=self.state.key_id,
            mode=pb.SEARCH_MODE_ROUTED if mode == "routed" else pb.SEARCH_MODE_STRICT,
            labels=labels,
            probe_ciphertexts=probe,
        )
        t1 = time.perf_counter()
        pre = self.transport.call(self.transport.identification.Preselect, req)
        stats.preselect_ms = (time.perf_counter() - t1) * 1e3
        stats.bytes_up += req.ByteSize()
        stats.bytes_down += pre.ByteSize()
        stats.bins_preselected = len(pre.bins)
        stats.searched_templates = pre.searched_templates

        td = time.perf_counter()
        # Staged templates come back fully scored (the same score in every slot).
        staged = [
            Candidate(
                self._handles.decode(t.handle),
                t.handle,
                float(np.mean(self.crypto.decrypt_scores(t.scores)) + offset),
            )
            for t in pre.staged
        ]
        cap = self.layout.capacity
        presel: dict[int, FloatArray] = {}
        cand_bins, cand_slots, cand_scores = [], [], []
        for b in pre.bins:
            scores = self._decrypt(b)
            presel[b.bin_id] = scores
            occ = np.flatnonzero(_bits(b.occupancy, cap))
            cand_bins.append(np.full(occ.size, b.bin_id))
            cand_slots.append(occ)
            cand_scores.append(scores[occ])
        stats.decrypt_ms += (time.perf_counter() - td) * 1e3
        if not cand_scores or sum(c.size for c in cand_scores) == 0:
            return self._decide(staged, stats, t0, threshold, top_n)
        all_bins = np.concatenate(cand_bins)
        all_slots = np.concatenate(cand_slots)
        all_scores = np.concatenate(cand_scores)
        groups: dict[int, list[int]] = {}
        if k <= 0:  # exhaustive: every searched bin is scored in full
            top = np.argsort(-all_scores)[:top_n]
            groups = {b.bin_id: [] for b in pre.bins}
        else:
            top = np.argsort(-all_scores)[:k]
        for i in top:
            groups.setdefault(int(all_bins[i]), []).append(int(all_slots[i]))
        if len(groups) >= rerank_all_above * len(pre.bins):
            # The candidates already span most searched bins: scoring the rest
            # too costs little more and makes the search exact over them.
            for b in pre.bins:
                groups.setdefault(b.bin_id, [])

        req2 = pb.ScoreCandidatesRequest(
            tenant_id=self.state.tenant_id,
            key_id=self.state.key_id,
            candidates=[pb.CandidateSlots(bin_id=b, slots=s) for b, s in groups.items()],
            query_id=pre.query_id,  # the server still holds the probe
        )
        t2 = time.perf_counter()
        try:
            rest = self.transport.call(self.transport.identification.ScoreCandidates, req2)
        except NotFound:  # the server forgot the probe (restart, expiry): send it again
            req2.query_id = ""
            req2.probe_ciphertexts.extend(probe)
            rest = self.transport.call(self.transport.identification.ScoreCandidates, req2)
        stats.rerank_ms = (time.perf_counter() - t2) * 1e3
        stats.bytes_up += req2.ByteSize()
        stats.bytes_down += rest.ByteSize()
        stats.bins_reranked = len(rest.bins)

        td = time.perf_counter()
        # Every slot of a re-ranked bin now has its full score.
        f_bins, f_slots, f_scores = [], [], []
        known: dict[tuple[int, int], str] = {}
        for b in rest.bins:
            full = presel[b.bin_id] + self._decrypt(b) + offset
            occ = np.flatnonzero(_bits(b.occupancy, cap))
            f_bins.append(np.full(occ.size, b.bin_id))
            f_slots.append(occ)
            f_scores.append(full[occ])
            known.update({(b.bin_id, int(s)): h for s, h in zip(b.slots, b.handles, strict=True)})
        stats.decrypt_ms += (time.perf_counter() - td) * 1e3
        if not f_scores or sum(f.size for f in f_scores) == 0:
            return self._decide(staged, stats, t0, threshold, top_n)
        fb, fs, fv = np.concatenate(f_bins), np.concatenate(f_slots), np.concatenate(f_scores)
        best = np.argsort(-fv)[:top_n]
        missing: dict[int, list[int]] = {}
        for i in best:
            if (int(fb[i]), int(fs[i])) not in known:
                missing.setdefault(int(fb[i]), []).append(int(fs[i]))
        if missing:
            req3 = pb.ResolveHandlesRequest(
                tenant_id=self.state.tenant_id,
                slots=[pb.CandidateSlots(bin_id=b, slots=s) for b, s in missing.items()],
            )
            res3 = self.transport.call(self.transport.identification.ResolveHandles, req3)
            stats.bytes_up += req3.ByteSize()
            stats.bytes_down += res3.ByteSize()
            for b in res3.bins:
                known.update({(b.bin_id, int(s)): h for s, h in zip(b.slots, b.handles, strict=True)})
        candidates = [
            Candidate(self._handles.decode(h), h, float(fv[i]))
            for i in best
            if (h := known.get((int(fb[i]), int(fs[i])), ""))
        ]
        return self._decide(candidates + staged, stats, t0, threshold, top_n)

    def _decide(
        self,
        candidates: list[Candidate],
        stats: QueryStats,
        t0: float,
        threshold: float | None,
        top_n: int,
    ) -> Identification:
        """Best score per subject (a template being folded may be seen twice), top-1, threshold."""
        best: dict[str, Candidate] = {}
        for c in candidates:
            if c.handle not in best or c.score > best[c.handle].score:
                best[c.handle] = c
        ranked = sorted(best.values(), key=lambda c: -c.score)[:top_n]
        stats.total_ms = (time.perf_counter() - t0) * 1e3
        if not ranked:
            return Identification(None, float("-inf"), False, [], stats)
        first = ranked[0]
        thr = self.state.threshold if threshold is None else threshold
        return Identification(first.subject_id, first.score, first.score >= thr, ranked, stats)

    def _decrypt(self, b: pb.BinScores) -> FloatArray:
        """A bin's scores: one ciphertext, or parts scored by several workers."""
        if b.score_parts:
            parts = [self.crypto.decrypt_scores(p) for p in b.score_parts]
            return np.asarray(np.sum(parts, axis=0), dtype=np.float64)
        return self.crypto.decrypt_scores(b.scores)

    def verify(
        self, subject_id: str, embedding: npt.ArrayLike, *, threshold: float | None = None
    ) -> Verification:
        """1:1 against a claimed subject; the tenant decrypts and applies its threshold."""
        self._check_center()
        x, offset = self.prepare_probe(embedding)
        resp = self.transport.call(
            self.transport.identification.Verify,
            pb.VerifyRequest(
                tenant_id=self.state.tenant_id,
                handle=self._handles.encode(subject_id),
                key_id=self.state.key_id,
                probe_ciphertexts=self.crypto.encrypt_probe(x),
            ),
        )
        score = float(self.crypto.decrypt_scores(resp.scores)[resp.slot] + offset)
        thr = self.state.threshold if threshold is None else threshold
        return Verification(subject_id, score, score >= thr)

    # -- photos -----------------------------------------------------------

    def upload_photo(self, subject_id: str, image: ProtectedImage) -> str:
        """Keep a protected photo of an enrolled subject; returns its photo id.

        Only a :class:`~veilface.client.protect.ProtectedImage` is accepted
        (made by ``deidentify`` or another protector); it is sealed with the
        tenant's key before it leaves, and deleted with the subject.
        """
        from veilface.client.photos import photo_key, seal_photo

        handle = self._handles.encode(subject_id)
        sealed, method = seal_photo(
            image, key=photo_key(self.state.handle_key), tenant_id=self.state.tenant_id, handle=handle
        )
        resp = self.transport.call(
            self.transport.photos.UploadPhoto,
            pb.UploadPhotoRequest(
                tenant_id=self.state.tenant_id, handle=handle, sealed_photo=sealed, protection=method
            ),
        )
        return str(resp.photo_id)

    def list_photos(self, subject_id: str) -> list[str]:
        resp = self.transport.call(
            self.transport.photos.ListPhotos,
            pb.ListPhotosRequest(tenant_id=self.state.tenant_id, handle=self._handles.encode(subject_id)),
        )
        return list(resp.photo_ids)

    def fetch_photo(self, photo_id: str) -> tuple[str, bytes, dict[str, object]]:
        """(subject id, JPEG bytes, protection record) of a kept photo."""
        from veilface.client.photos import open_photo, photo_key

        resp = self.transport.call(
            self.transport.photos.FetchPhoto,
            pb.FetchPhotoRequest(tenant_id=self.state.tenant_id, photo_id=photo_id),
        )
        jpeg, meta = open_photo(
            resp.sealed_photo,
            key=photo_key(self.state.handle_key),
            tenant_id=self.state.tenant_id,
            handle=resp.handle,
        )
        return self._handles.decode(resp.handle), jpeg, meta

    def delete(self, subject_id: str, *, retries: int = 3) -> None:
        """Delete a subject: re-pack its bin without it; the server forgets the handle and its photos."""
        handle = self._handles.encode(subject_id)
        self.flush()  # a fold of this subject in flight would race the deletion
        for attempt in range(retries):
            got = self.transport.call(
                self.transport.enrollment.FetchSubjectBin,
                pb.FetchSubjectBinRequest(tenant_id=self.state.tenant_id, handle=handle),
            )
            if got.key_id != self.state.key_id:
                raise FailedPrecondition(f"the subject is enrolled under key {got.key_id!r}")
            if got.staged:
                try:
                    self.transport.call(
                        self.transport.enrollment.DeleteSubject,
                        pb.DeleteSubjectRequest(tenant_id=self.state.tenant_id, handle=handle),
                    )
                    return
                except NotFound:  # folded into a bin meanwhile: fetch again
                    if attempt == retries - 1:
                        raise
                    continue
            keep = [s for s in got.occupied_slots if s != got.slot]
            templates = self.crypto.decrypt_bin(list(got.ciphertexts), keep)
            cts = self.crypto.encrypt_contribution(templates, keep)
            try:
                self.transport.call(
                    self.transport.enrollment.DeleteSubject,
                    pb.DeleteSubjectRequest(
                        tenant_id=self.state.tenant_id,
                        handle=handle,
                        bin_id=got.bin_id,
                        bin_version=got.bin_version,
                        ciphertexts=cts,
                    ),
                )
                return
            except FailedPrecondition:
                if attempt == retries - 1:
                    raise
                log.info("bin changed during deletion; retrying")
        raise NotFound("unreachable")
