"""Enrollment, as ``VeilClient`` runs it: staged templates and their folds, bins, bulk streams.

:class:`Enroller` holds one client's enrollment state (the background
folder of staged templates, whether the key can stage at all) and does the
work behind :meth:`VeilClient.enroll <veilface.client.sdk.VeilClient.enroll>`,
``flush``, ``fold_staged``, ``enroll_many`` and ``delete``; the client keeps the public
methods (and their kiosk guard) and reaches the client's keys, templates
and transport through the client it belongs to.

- **Staged** (:meth:`Enroller.enroll`): one ciphertext, acknowledged in the
  key's staging area and searched in full until it is folded into its bin.
- **Fold / into a bin** (:meth:`Enroller.enroll_into_bin`): reserve a slot,
  stream the template's contribution to its bin (a staged template's fold
  removes it from the staging area in the same server transaction).
- **Bulk** (:meth:`Enroller.bulk_chunks`, :meth:`Enroller.enroll_many`): whole
  bins packed here and streamed; the first chunk declares how many follow,
  so a cut stream imports nothing. Re-packs and rotations
  (:mod:`veilface.client.repack`) stream the same chunks with ``replaces``.
- **Delete** (:meth:`Enroller.delete`): the subject's bin re-packed here
  without it (a staged subject is simply dropped).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from veilface.client.tail_packing import plan_bins
from veilface.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from veilface.proto.v1 import veilface_pb2 as pb

if TYPE_CHECKING:
    from veilface.client.routing import Router
    from veilface.client.sdk import VeilClient

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

FOLDS = ("background", "now", "later")


def bulk_plan(
    router: Router | None, lists: npt.NDArray[np.int64] | None, n: int, capacity: int
) -> list[tuple[str, npt.NDArray[np.int64]]]:
    """The bins of a bulk import of ``n`` templates: (label, rows) each, rows in import order.

    Without routing, bins of ``capacity`` in order under the empty label;
    with it, each list's bins, and the shared bins of its tail group when
    the router has tail groups (:mod:`veilface.client.tail_packing`).
    """
    if router is None or lists is None:
        rows = np.arange(n, dtype=np.int64)
        return [("", rows[i : i + capacity]) for i in range(0, n, capacity)]
    return [
        (router.tail_label(b.owner) if b.tail else router.label(b.owner), b.rows)
        for b in plan_bins(lists, router.tail_groups, capacity)
    ]


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


class Enroller:
    """The enrollment work of one :class:`~veilface.client.sdk.VeilClient`."""

    def __init__(self, client: VeilClient) -> None:
        self.client = client
        self._folder: ThreadPoolExecutor | None = None
        self._folds: set[Future[None]] = set()
        self._folds_lock = threading.Lock()
        self.staging = True  # False once the server says this key cannot stage

    def close(self) -> None:
        """Finish pending folds, then stop the fold thread."""
        try:
            self.flush()
        finally:
            if self._folder is not None:
                self._folder.shutdown(wait=True)

    # -- one template ------------------------------------------------------------------

    def enroll(self, subject_id: str, embedding: npt.ArrayLike, *, fold: str, staged: bool) -> EnrollReceipt:
        """One template: staged when the key can stage (then folded per ``fold``), else into its bin."""
        c = self.client
        if fold not in FOLDS:
            raise InvalidArgument("fold must be 'background', 'now' or 'later'")
        c._freeze_center()
        xn = c.normalize(embedding)
        x = c.prepare(xn)
        handle = c._handles.encode(subject_id)
        label = c._enrollment_labels(xn)[0]
        if self.staging and staged:
            try:
                resp = c.transport.call(
                    c.transport.enrollment.EnrollStaged,
                    pb.EnrollStagedRequest(
                        tenant_id=c.state.tenant_id,
                        key_id=c.state.key_id,
                        label=label,
                        handle=handle,
                        ciphertext=c.crypto.encrypt_staged(x[0]),
                    ),
                )
            except FailedPrecondition:
                log.info("this key cannot stage templates; enrolling straight into bins")
                self.staging = False
            except ResourceExhausted:
                log.info("staging area full; enrolling straight into a bin")
            else:
                staged_id = int(resp.staged_id)
                if fold == "now":
                    self.fold(handle, label, x, staged_id)
                elif fold == "background":
                    self._fold_in_background(handle, label, x, staged_id)
                return EnrollReceipt(subject_id, handle, 0, 0, staged_id)
        bin_id, slot = self.enroll_into_bin(handle, label, x)
        return EnrollReceipt(subject_id, handle, bin_id, slot)

    def _fold_in_background(self, handle: str, label: str, x: FloatArray, staged_id: int) -> None:
        if self._folder is None:
            self._folder = ThreadPoolExecutor(1, thread_name_prefix="veilface-fold")
        fut = self._folder.submit(self.fold, handle, label, x, staged_id)
        with self._folds_lock:
            self._folds.add(fut)

        def done(f: Future[None]) -> None:
            with self._folds_lock:
                self._folds.discard(f)
            if not f.cancelled() and (exc := f.exception()) is not None:
                # The template stays staged (and searchable); fold_staged() retries.
                log.warning("fold of a staged template failed: %s", type(exc).__name__)

        fut.add_done_callback(done)

    def fold(self, handle: str, label: str, x: FloatArray, staged_id: int) -> None:
        """Fold a staged template into its bin (and out of the staging area)."""
        self.enroll_into_bin(handle, label, x, staged_id)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until the background folds are done (failures are logged)."""
        with self._folds_lock:
            pending = list(self._folds)
        for f in pending:
            if f.exception(timeout=timeout_s) is not None:
                continue  # logged by the done callback; the template stays staged

    def fold_staged(self, *, limit: int = 0) -> int:
        """Fold the key's staged templates (any client's); how many were folded."""
        c = self.client
        self.flush()
        resp = c.transport.call(
            c.transport.enrollment.FetchStaged,
            pb.FetchStagedRequest(tenant_id=c.state.tenant_id, key_id=c.state.key_id, limit=limit),
        )
        done = 0
        for t in resp.staged:
            x = c.crypto.decrypt_staged(t.ciphertext)[None, :]
            try:
                self.fold(t.handle, t.label, x, int(t.staged_id))
            except NotFound:  # deleted or folded by another client meanwhile
                continue
            done += 1
        return done

    def enroll_into_bin(
        self, handle: str, label: str, x: FloatArray, staged_id: int = 0
    ) -> tuple[int, int]:
        """Reserve a slot and add the template into its bin (streamed); (bin id, slot)."""
        c = self.client
        res = c.transport.call(
            c.transport.enrollment.ReserveSlots,
            pb.ReserveSlotsRequest(
                tenant_id=c.state.tenant_id, key_id=c.state.key_id, label=label, count=1
            ),
        )

        def messages() -> Iterator[pb.EnrollRequest]:
            # Encrypt chunk k+1 while chunk k is on the wire and being checked.
            for i, cts in enumerate(c.crypto.encrypt_contribution_chunks(x, list(res.slots))):
                if i == 0:
                    yield pb.EnrollRequest(
                        tenant_id=c.state.tenant_id,
                        key_id=c.state.key_id,
                        reservation_id=res.reservation_id,
                        handles=[handle],
                        ciphertexts=cts,
                        staged_id=staged_id,
                    )
                else:
                    yield pb.EnrollRequest(ciphertexts=cts)

        resp = c.transport.call(c.transport.enrollment.Enroll, messages())
        return int(resp.bin_id), int(resp.slots[0])

    # -- bulk ----------------------------------------------------------------------------

    def bulk_chunks(
        self,
        handles: Sequence[str],
        xn: FloatArray,
        progress: bool,
        replaces: Sequence[pb.BinRef] = (),
    ) -> Iterator[pb.BulkEnrollChunk]:
        """The chunks (one per bin) of a bulk stream of normalized templates ``xn``."""
        from tqdm import tqdm

        c = self.client
        first = True
        x = c.prepare(xn)
        # The first chunk declares how many follow: the server imports
        # nothing unless that many arrive (a cut stream leaves nothing).
        plan = bulk_plan(c.state.router, c._lists_for(xn), len(xn), c.layout.capacity)
        bar = tqdm(total=len(x), unit="tpl", desc="encrypting bins", disable=not progress)
        try:
            for lab, rows in plan:
                idx = rows.tolist()
                slots = list(range(len(idx)))
                cts = c.crypto.encrypt_contribution(x[rows], slots)
                bar.update(len(idx))
                yield pb.BulkEnrollChunk(
                    tenant_id=c.state.tenant_id,
                    key_id=c.state.key_id,
                    label=lab,
                    handles=[handles[i] for i in idx],
                    slots=slots,
                    ciphertexts=cts,
                    replaces=list(replaces) if first else [],
                    total_bins=len(plan) if first else 0,
                )
                first = False
        finally:
            bar.close()

    def enroll_many(
        self, subject_ids: Sequence[str], embeddings: npt.ArrayLike, *, progress: bool = False
    ) -> BulkReceipt:
        """Bulk import of distinct subjects (all-or-nothing)."""
        c = self.client
        xn = c.normalize(embeddings)
        if len(subject_ids) != len(xn):
            raise InvalidArgument("one subject id per embedding is required")
        if len(set(subject_ids)) != len(subject_ids):
            raise InvalidArgument("subject ids must be distinct")
        if getattr(c.state, "center", None) is None:
            c.calibrate(xn)  # first templates of this key: fix the center from them
        handles = [c._handles.encode(s) for s in subject_ids]
        resp = c.transport.call(
            c.transport.enrollment.BulkEnroll, self.bulk_chunks(handles, xn, progress)
        )
        return BulkReceipt(resp.bins, resp.subjects)

    # -- deletion --------------------------------------------------------------------------

    def delete(self, subject_id: str, *, retries: int = 3) -> None:
        """Delete a subject: re-pack its bin without it (a staged subject: drop it)."""
        c = self.client
        handle = c._handles.encode(subject_id)
        self.flush()  # a fold of this subject in flight would race the deletion
        for attempt in range(retries):
            got = c.transport.call(
                c.transport.enrollment.FetchSubjectBin,
                pb.FetchSubjectBinRequest(tenant_id=c.state.tenant_id, handle=handle),
            )
            if got.key_id != c.state.key_id:
                raise FailedPrecondition(f"the subject is enrolled under key {got.key_id!r}")
            if got.staged:
                try:
                    c.transport.call(
                        c.transport.enrollment.DeleteSubject,
                        pb.DeleteSubjectRequest(tenant_id=c.state.tenant_id, handle=handle),
                    )
                    return
                except NotFound:  # folded into a bin meanwhile: fetch again
                    if attempt == retries - 1:
                        raise
                    continue
            keep = [s for s in got.occupied_slots if s != got.slot]
            templates = c.crypto.decrypt_bin(list(got.ciphertexts), keep)
            cts = c.crypto.encrypt_contribution(templates, keep)
            try:
                c.transport.call(
                    c.transport.enrollment.DeleteSubject,
                    pb.DeleteSubjectRequest(
                        tenant_id=c.state.tenant_id,
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


__all__ = ["BulkReceipt", "EnrollReceipt", "Enroller"]
