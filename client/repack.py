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

Until the swap the old bins serve queries; a failure leaves them as they
were (and the client's previous router in place).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from veilface.errors import FailedPrecondition, InvalidArgument
from veilface.proto.v1 import veilface_pb2 as pb

if TYPE_CHECKING:
    from veilface.client.sdk import RepackReport, VeilClient

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


def gallery_templates(
    client: VeilClient, *, progress: bool = False
) -> tuple[list[str], FloatArray, list[pb.BinRef]]:
    """Every template of the client's key, decrypted: handles, float64 [n, dim] unit rows, bin refs."""
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
    return handles, np.asarray(xn, dtype=np.float64), replaces


def repack(
    client: VeilClient,
    *,
    nlist: int | None = None,
    target: VeilClient | None = None,
    seed: int = 0,
    progress: bool = False,
) -> RepackReport:
    """See :meth:`VeilClient.repack`."""
    from veilface.client.sdk import RepackReport

    dest = target or client
    if target is not None:
        if target.state.tenant_id != client.state.tenant_id:
            raise InvalidArgument("a key rotation stays within one tenant")
        if target.state.key_id == client.state.key_id:
            raise InvalidArgument("the target client must use a new key id")
        if target.state.dim != client.state.dim:
            raise InvalidArgument("the new key must have the same template dimension")
        if target.state.handle_key != client.state.handle_key:
            raise InvalidArgument("the new key must keep the tenant's handle key (TenantState.rotated)")
    elif nlist is None:
        raise InvalidArgument("give nlist (retrain the routing) or a target client (rotate the key)")
    handles, xn, replaces = gallery_templates(client, progress=progress)
    if not replaces:
        return RepackReport(0, 0, 0, dest.state.key_id)
    old_router, old_center = dest.state.router, dest.state.center
    try:
        if target is not None and target.state.center is None and len(xn):
            target.calibrate(xn)
        lists = nlist or (client.state.router.nlist if client.state.router is not None else 0)
        if lists:
            dest.train_routing(xn, nlist=min(lists, max(1, len(xn))), seed=seed, force=True)
        tr = dest.transport
        if not handles:  # only emptied bins: an empty stream cannot carry the swap
            raise FailedPrecondition("the key holds no subject to re-pack")
        resp = tr.call(
            tr.enrollment.BulkEnroll,
            dest._bulk_chunks(handles, xn, progress, replaces=replaces),
        )
    except BaseException:
        dest.state.router = old_router
        if target is not None:
            target.state.center = old_center
        raise
    log.info(
        "re-packed %d subjects from %d bins into %d (key %s)",
        len(handles), len(replaces), resp.bins, dest.state.key_id,
    )
    return RepackReport(len(handles), len(replaces), int(resp.bins), dest.state.key_id)
