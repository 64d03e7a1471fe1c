"""Re-packing a gallery: routing retrained as it grows, and key rotation, over a real server."""

from __future__ import annotations

import numpy as np
import pytest

from tests.server.conftest import make_client, plaintext_top1
from veilface.client.sdk import VeilClient
from veilface.errors import FailedPrecondition, NotFound
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def _key(c: VeilClient, key_id: str | None = None) -> pb.KeyInfo:
    kid = key_id or c.state.key_id
    return next(k for k in c.describe().keys if k.key_id == kid)


def test_retrain_routing_as_the_gallery_grows(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(server, "grows") as c:
        c.train_routing(gallery[:40], nlist=2)  # trained when the gallery was small
        c.enroll_many(names[:200], gallery[:200])
        c.enroll(names[200], gallery[200], fold="later")  # a staged one is carried too
        with pytest.raises(FailedPrecondition):  # plain retraining would break routed search
            c.train_routing(gallery[:201], nlist=6)
        old_labels = {b.label for b in c.transport.call(
            c.transport.enrollment.ListBins, pb.ListBinsRequest(tenant_id="grows", key_id="k1")).bins}

        report = c.repack(nlist=6)
        assert report.subjects == 201 and c.state.router is not None and c.state.router.nlist == 6
        k = _key(c)
        assert (k.subjects, k.staged) == (201, 0)
        new_labels = {b.label for b in c.transport.call(
            c.transport.enrollment.ListBins, pb.ListBinsRequest(tenant_id="grows", key_id="k1")).bins}
        assert not new_labels & old_labels and len(new_labels) == 6
        # routed search under the new lists finds everyone, with exact scores
        for i in range(0, 201, 20):
            r = c.identify(gallery[i], mode="routed", nprobe=2)
            assert r.subject_id == names[i] and r.score == pytest.approx(1.0, abs=1e-3)
        hits = sum(
            c.identify(probes[i], mode="routed", nprobe=3).subject_id
            == names[plaintext_top1(gallery[:201], probes[i])]
            for i in range(25)
        )
        assert hits >= 24
        # deletion and verification still work on re-packed bins
        c.delete(names[3])
        assert c.identify(gallery[3], mode="strict").subject_id != names[3]
        assert c.verify(names[4], probes[4]).score == pytest.approx(
            float(gallery[4] @ probes[4] / np.linalg.norm(gallery[4]) / np.linalg.norm(probes[4])), abs=1e-3
        )


def test_key_rotation_moves_the_gallery_atomically(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(server, "rotates") as old:
        old.enroll_many(names[:60], gallery[:60])
        token = old.transport._metadata[0][1].removeprefix("Bearer ")  # the tenant's token
        new_state = old.state.rotated("k2")
        with VeilClient(server.target, new_state, token=token, encrypt_workers=0) as new:
            new.register_key()
            report = old.repack(target=new)
            assert report.subjects == 60 and report.key_id == "k2"
            assert _key(new, "k2").subjects == 60 and _key(new, "k1").subjects == 0
            for i in (0, 17, 59):
                r = new.identify(probes[i])
                assert r.subject_id == names[plaintext_top1(gallery[:60], probes[i])]
            assert new.identify(gallery[17]).score == pytest.approx(1.0, abs=1e-3)
            with pytest.raises(NotFound):  # the subject now lives under k2, with a new handle
                old.verify(names[17], probes[17])
            assert new.verify(names[17], probes[17]).match


def test_a_stale_or_incomplete_repack_changes_nothing(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    with make_client(server, "stale") as c:
        c.enroll_many(names[:30], gallery[:30])
        tr = c.transport
        (ref,) = tr.call(tr.enrollment.ListBins, pb.ListBinsRequest(tenant_id="stale", key_id="k1")).bins
        handles = [c.state.handles().encode(n) for n in names[:30]]
        x = c.normalize(gallery[:30])

        def stream(hs, rows, version):  # type: ignore[no-untyped-def]
            return c._enroller.bulk_chunks(hs, rows, False, replaces=[pb.BinRef(bin_id=ref.bin_id, version=version)])

        with pytest.raises(FailedPrecondition):  # leaves out 5 subjects of the replaced bin
            tr.call(tr.enrollment.BulkEnroll, stream(handles[:25], x[:25], ref.version))
        with pytest.raises(FailedPrecondition):  # the bin changed since it was fetched
            tr.call(tr.enrollment.BulkEnroll, stream(handles, x, ref.version + 1))
        with pytest.raises(NotFound):  # another tenant's (or no) bin
            tr.call(tr.enrollment.FetchBin, pb.FetchBinRequest(tenant_id="stale", bin_id=10**9))
        k = _key(c)
        assert (k.subjects, k.bins) == (30, 1)
        assert c.identify(gallery[12]).subject_id == names[12]


def test_a_state_that_lost_its_center_is_refused(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    gallery, names, _ = faces
    with make_client(server, "lost-center") as c:
        c.enroll_many(names[:20], gallery[:20])  # fixes and registers the center
        token = c.transport._metadata[0][1].removeprefix("Bearer ")
        stale = dataclasses.replace(c.state, center=None)  # as if never saved after enrolling
        with VeilClient(server.target, stale, token=token, encrypt_workers=0) as s:
            with pytest.raises(FailedPrecondition, match="centering vector"):
                s.identify(gallery[0])
            with pytest.raises(FailedPrecondition, match="centering vector"):
                s.repack(nlist=2)
