"""Re-pack a key's gallery: routing retrained as the gallery grows, key rotation.

Both need every template re-encrypted by the tenant (the server cannot move
a template between bins or keys), and both must never lose one:

1. fold any staged templates, list the key's bins and fetch each one with
   the handles of its slots;
2. decrypt the templates and undo the key's mixing and centering;
3. retrain the lists on them (``nlist``) and/or switch to the new key's
   client (``target``), then stream new bins with the old bins' ids and
   versions in the first chunk;
4. the server swaps them in one transaction, only if no old bin changed
   since it was fetched and every old handle is in the stream.

A key rotation renews everything the server could use to link the new
gallery to the old one (ISO/IEC 24745 renewability and unlinkability): the
new key's state (:meth:`TenantState.rotated`) has fresh label, handle and
photo keys, so every subject gets a new handle and every list a new label;
the rows are streamed in a random order and the lists retrained from a
random k-means seed, so that no bin or slot position repeats the old
layout. The server is not told which new handle continues which old one:
the first chunk sets ``renew_handles`` and the server checks that the
stream carries as many subjects as the bins it replaces (the tenant checks
itself, before streaming, that the new handles are exactly its old
subjects under the new key). After the swap each subject's photos are
re-sealed under the new photo key and handle, each upload replacing the old
photo in one server transaction (:func:`reseal_photos`), so photo ids
change too.

Until the swap the old bins serve queries; a failure leaves them as they
were (and the client's previous router in place).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from veilface.client.photos import reseal_photo
from veilface.client.route_training import repack_lists
from veilface.errors import FailedPrecondition, InvalidArgument, NotFound, VeilfaceError
from veilface.proto.v1 import veilface_pb2 as pb

if TYPE_CHECKING:
    from veilface.client.sdk import VeilClient

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class RepackReport:
    """What a re-pack did: subjects moved, bins before and after, the key they are under.

    For a key rotation also the photos re-sealed under the new key, and
    those left under the old one when that step failed after the gallery
    moved (finish with :func:`veilface.client.repack.reseal_photos`).
    """

    subjects: int
    old_bins: int
    new_bins: int
    key_id: str
    photos: int = 0
    photo_subjects_left: int = 0


@dataclass(frozen=True)
class Gallery:
    """Every template of a key, decrypted.

    Attributes
    ----------
    handles
        The subject handle of each row.
    templates
        float64 [n, dim], unit rows (mixing and centering undone).
    replaces
        The key's bins as fetched (id and version), for the swap.
    """

    handles: list[str]
    templates: FloatArray
    replaces: list[pb.BinRef]


@dataclass(frozen=True)
class PhotoReseal:
    """What re-sealing photos under a new key did.

    ``subjects_left``: subjects not done when a failure stopped it (their
    photos are still under the old key; run :func:`reseal_photos` again).
    """

    photos: int
    subjects_left: int = 0


def gallery_templates(client: VeilClient, *, progress: bool = False) -> Gallery:
    """Every template of the client's key, decrypted (see :class:`Gallery`)."""
    from tqdm import tqdm

    client._check_center()
    client.flush()
    client.fold_staged()
    tr = client.transport
    refs = list(
        tr.call(
            tr.enrollment.ListBins,
            pb.ListBinsRequest(tenant_id=client.state.tenant_id, key_id=client.state.key_id),
        ).bins
    )
    handles: list[str] = []
    rows: list[FloatArray] = []
    replaces: list[pb.BinRef] = []
    mix, center = client._mix, client.center
    for ref in tqdm(refs, unit="bin", desc="fetching bins", disable=not progress):
        if ref.subjects == 0:  # emptied by deletions: swapped out, nothing to carry
            replaces.append(pb.BinRef(bin_id=ref.bin_id, version=ref.version))
            continue
        got = tr.call(
            tr.enrollment.FetchBin, pb.FetchBinRequest(tenant_id=client.state.tenant_id, bin_id=ref.bin_id)
        )
        if got.key_id != client.state.key_id:
            raise FailedPrecondition(f"bin {ref.bin_id} is under key {got.key_id!r}")
        prepared = client.crypto.decrypt_bin(list(got.ciphertexts), list(got.slots))
        x = prepared @ mix + center  # inverse of (x - mu) @ Q.T, Q orthogonal
        rows.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        handles.extend(got.handles)
        replaces.append(pb.BinRef(bin_id=got.bin_id, version=got.version))
    xn = np.concatenate(rows) if rows else np.zeros((0, client.state.dim))
    return Gallery(handles, np.asarray(xn, dtype=np.float64), replaces)


def _check_rotation(client: VeilClient, target: VeilClient) -> None:
    old, new = client.state, target.state
    if new.tenant_id != old.tenant_id:
        raise InvalidArgument("a key rotation stays within one tenant")
    if new.key_id == old.key_id:
        raise InvalidArgument("the target client must use a new key id")
    if new.dim != old.dim:
        raise InvalidArgument("the new key must have the same template dimension")
    shared = [
        name
        for name in ("label_key", "handle_key", "photo_key")
        if getattr(new, name) == getattr(old, name)
    ]
    if shared:
        raise InvalidArgument(
            f"the new key shares the {', '.join(shared)} of the old one, so the server could link "
            "the two galleries: make it with TenantState.rotated(), which draws fresh keys"
        )


def _renewing(chunks: Iterator[pb.BulkEnrollChunk]) -> Iterator[pb.BulkEnrollChunk]:
    """The stream with ``renew_handles`` set on its first chunk (the one naming the replaced bins)."""
    first = next(chunks, None)
    if first is None:
        return
    first.renew_handles = True
    yield first
    yield from chunks


def repack(
    client: VeilClient,
    *,
    nlist: int | None = None,
    target: VeilClient | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> RepackReport:
    """See :meth:`VeilClient.repack`."""
    dest = target or client
    if target is not None:
        _check_rotation(client, target)
    gallery = gallery_templates(client, progress=progress)
    if not gallery.replaces:
        return RepackReport(0, 0, 0, dest.state.key_id)
    handles, xn = gallery.handles, gallery.templates
    subject_ids: list[str] = []
    if target is not None:
        # New handles for the same subjects, in an order that owes nothing to the old bins.
        old_codec, new_codec = client.state.handles(), target.state.handles()
        order = np.random.default_rng(secrets.randbits(128)).permutation(len(handles))
        subject_ids = [old_codec.decode(handles[i]) for i in order]
        handles = [new_codec.encode(s) for s in subject_ids]
        if len(set(handles)) != len(gallery.handles):
            raise FailedPrecondition("the old key's bins name a subject twice; nothing was moved")
        xn = xn[order]
        if seed is None:
            seed = secrets.randbelow(2**31 - 1)
    old_router, old_center, old_search = dest.state.router, dest.state.center, dest.state.search
    try:
        if target is not None and target.state.center is None and len(xn):
            target.calibrate(xn)
        lists = repack_lists(client.state, nlist, rotating=target is not None)
        if lists is None:  # the SDK chooses again, for the gallery as it is now
            dest.train_routing(xn, seed=seed or 0, force=True)
        elif lists:
            dest.train_routing(xn, nlist=min(lists, max(1, len(xn))), seed=seed or 0, force=True)
        tr = dest.transport
        if not handles:  # only emptied bins: an empty stream cannot carry the swap
            raise FailedPrecondition("the key holds no subject to re-pack")
        chunks = dest._enroller.bulk_chunks(handles, xn, progress, replaces=gallery.replaces)
        resp = tr.call(tr.enrollment.BulkEnroll, _renewing(chunks) if target is not None else chunks)
    except BaseException:
        dest.state.router, dest.state.search = old_router, old_search
        if target is not None:
            target.state.center = old_center
        raise
    log.info(
        "re-packed %d subjects from %d bins into %d (key %s)",
        len(handles), len(gallery.replaces), resp.bins, dest.state.key_id,
    )
    # The gallery has moved: a failure from here on is reported, never raised,
    # so that the caller goes on to save the new state.
    photos = reseal_photos(client, target, subject_ids, progress=progress) if target else PhotoReseal(0)
    return RepackReport(
        len(handles),
        len(gallery.replaces),
        int(resp.bins),
        dest.state.key_id,
        photos=photos.photos,
        photo_subjects_left=photos.subjects_left,
    )


def _moved_subjects(new: VeilClient) -> list[str]:
    """Subject ids of every subject in the new key's bins (read back from the server)."""
    tr, codec = new.transport, new.state.handles()
    refs = tr.call(
        tr.enrollment.ListBins, pb.ListBinsRequest(tenant_id=new.state.tenant_id, key_id=new.state.key_id)
    ).bins
    out: list[str] = []
    for ref in refs:
        if ref.subjects:
            got = tr.call(
                tr.enrollment.FetchBin, pb.FetchBinRequest(tenant_id=new.state.tenant_id, bin_id=ref.bin_id)
            )
            out.extend(codec.decode(h) for h in got.handles)
    return out


def reseal_photos(
    old: VeilClient,
    new: VeilClient,
    subject_ids: Sequence[str] | None = None,
    *,
    progress: bool = False,
) -> PhotoReseal:
    """Re-seal the photos of moved subjects under the new key's photo key and handles.

    For each subject (default: every subject of the new key's bins, read
    back from the server), each photo kept under its old handle is fetched,
    opened with the old photo key, sealed again under the new photo key for
    the new handle and uploaded with ``replaces`` set to the old photo id:
    the server stores the new photo (under a new id) and deletes the old
    one in one transaction, so a photo is never lost. Subjects are visited
    in a random order. Safe to run again after a failure: photos already
    re-sealed are no longer under the old handle.

    Returns
    -------
    PhotoReseal
        Photos re-sealed; the first error from the server (or a photo that
        does not open with the old key) stops the run, logged, and the
        subjects not done are counted in ``subjects_left``.
    """
    from tqdm import tqdm

    if old.state.tenant_id != new.state.tenant_id:
        raise InvalidArgument("photos are re-sealed within one tenant")
    subjects = list(subject_ids) if subject_ids is not None else _moved_subjects(new)
    secrets.SystemRandom().shuffle(subjects)
    done = 0
    for n, sid in enumerate(tqdm(subjects, unit="subject", desc="re-sealing photos", disable=not progress)):
        try:
            done += _reseal_subject(old, new, sid)
        except VeilfaceError as exc:
            left = len(subjects) - n
            log.warning(
                "re-sealing photos under key %s stopped (%s); %d subjects left: run reseal_photos again",
                new.state.key_id, type(exc).__name__, left,
            )
            return PhotoReseal(done, left)
    log.info("re-sealed %d photos of %d subjects under key %s", done, len(subjects), new.state.key_id)
    return PhotoReseal(done)


def _reseal_subject(old: VeilClient, new: VeilClient, subject_id: str) -> int:
    """Re-seal one subject's photos (see :func:`reseal_photos`); how many."""
    tenant, tr = old.state.tenant_id, old.transport
    old_handle = old.state.handles().encode(subject_id)
    new_handle = new.state.handles().encode(subject_id)
    listed = tr.call(tr.photos.ListPhotos, pb.ListPhotosRequest(tenant_id=tenant, handle=old_handle))
    done = 0
    for photo_id in listed.photo_ids:
        got = tr.call(tr.photos.FetchPhoto, pb.FetchPhotoRequest(tenant_id=tenant, photo_id=photo_id))
        blob = reseal_photo(
            got.sealed_photo,
            old_key=old.state.photo_key,
            old_handle=old_handle,
            new_key=new.state.photo_key,
            new_handle=new_handle,
            tenant_id=tenant,
        )
        upload = pb.UploadPhotoRequest(
            tenant_id=tenant,
            handle=new_handle,
            sealed_photo=blob,
            protection=got.protection,
            replaces=photo_id,
        )
        try:
            new.transport.call(new.transport.photos.UploadPhoto, upload)
        except NotFound:  # the subject (or this photo) was deleted meanwhile
            log.warning("a subject or photo went during the re-seal; its old photo is left")
            continue
        done += 1
    return done


__all__ = ["Gallery", "PhotoReseal", "RepackReport", "gallery_templates", "repack", "reseal_photos"]
