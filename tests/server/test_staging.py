"""Fast single enrollment through the staging area, over a real server and database."""

from __future__ import annotations

import numpy as np
import pytest

from tests.server.conftest import create_tenant, make_client
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.errors import AlreadyExists, InvalidArgument, NotFound
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _key(c: VeilClient) -> pb.KeyInfo:
    return next(k for k in c.describe().keys if k.key_id == c.state.key_id)


def test_staged_is_searchable_then_folded_exactly_once(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(server, "staging") as c:
        c.enroll_many(names[:100], gallery[:100])
        receipt = c.enroll(names[100], gallery[100], fold="later")
        assert receipt.staged_id > 0 and receipt.bin_id == 0
        k = _key(c)
        assert (k.staged, k.subjects) == (1, 101)

        # searched before its fold: found, with the plaintext cosine
        r = c.identify(probes[100])
        assert r.subject_id == names[100]
        assert r.score == pytest.approx(_cos(gallery[100], probes[100]), abs=1e-3)
        # a probe of another subject still finds its own bin template, not the staged one
        r = c.identify(probes[7])
        assert r.subject_id == names[7]
        assert all(cand.subject_id != names[7] or cand.score > 0.5 for cand in r.candidates)
        v = c.verify(names[100], probes[100])
        assert v.match and v.score == pytest.approx(_cos(gallery[100], probes[100]), abs=1e-3)
        assert c.verify(names[100], probes[3]).score == pytest.approx(
            _cos(gallery[100], probes[3]), abs=1e-3
        )

        # the same handle cannot be enrolled twice, staged or not
        with pytest.raises(AlreadyExists):
            c.enroll(names[100], gallery[100])
        with pytest.raises(AlreadyExists):
            c.enroll(names[5], gallery[5])

        assert c.fold_staged() == 1
        k = _key(c)
        assert (k.staged, k.subjects) == (0, 101)
        r = c.identify(probes[100])
        assert r.subject_id == names[100]
        assert r.score == pytest.approx(_cos(gallery[100], probes[100]), abs=1e-3)
        assert [cand.subject_id for cand in r.candidates].count(names[100]) == 1
        assert c.fold_staged() == 0


def test_background_fold_and_delete_of_staged(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(server, "staging-bg") as c:
        for i in range(5):
            c.enroll(names[i], gallery[i])  # acknowledged staged, folded in the background
        c.flush()
        assert _key(c).staged == 0 and _key(c).subjects == 5
        for i in range(5):
            assert c.identify(gallery[i]).subject_id == names[i]

        c.enroll(names[10], gallery[10], fold="later")
        c.delete(names[10])
        assert _key(c).staged == 0
        assert c.identify(gallery[10]).subject_id != names[10]
        with pytest.raises(NotFound):
            c.verify(names[10], probes[10])
        c.enroll(names[10], gallery[10], fold="now")  # the handle is free again
        assert c.identify(gallery[10]).subject_id == names[10]


def test_full_staging_area_falls_back_to_bins(tmp_path, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    with LocalServer(tmp_path / "full.db", env={"VEILFACE_MAX_STAGED": "2"}) as srv:
        token = create_tenant(srv, "full")
        with VeilClient(srv.target, TenantState.new("full", dim=128), token=token, encrypt_workers=0) as c:
            c.register_key()
            receipts = [c.enroll(names[i], gallery[i], fold="later") for i in range(3)]
            assert [r.staged_id > 0 for r in receipts] == [True, True, False]
            assert receipts[2].bin_id > 0
            for i in range(3):
                assert c.identify(gallery[i]).subject_id == names[i]


def test_fold_of_a_foreign_or_unknown_staged_id_writes_nothing(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    with make_client(server, "staging-a") as a, make_client(server, "staging-b") as b:
        ra = a.enroll(names[0], gallery[0], fold="later")
        x = b.prepare(gallery[1])
        h = b.state.handles().encode(names[1])
        with pytest.raises(NotFound):  # b cannot fold (remove) a's staged template
            b._enroller.enroll_into_bin(h, "", x, ra.staged_id)
        with pytest.raises(NotFound):
            b._enroller.enroll_into_bin(h, "", x, 10**9)
        assert _key(b).subjects == 0 and _key(a).staged == 1


def test_staged_enrollment_survives_sigkill(tmp_path, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    db = tmp_path / "kill.db"
    state = TenantState.new("killed", dim=128)
    srv = LocalServer(db).start()
    try:
        token = create_tenant(srv, "killed")
        c = VeilClient(srv.target, state, token=token, encrypt_workers=0)
        c.register_key()
        for i in range(3):
            c.enroll(names[i], gallery[i], fold="later")  # acknowledged: durable
        srv.kill()
        c.transport.close()
    finally:
        srv.kill()
    with LocalServer(db) as srv2, VeilClient(srv2.target, state, token=token, encrypt_workers=0) as c2:
        assert _key(c2).staged == 3
        for i in range(3):
            r = c2.identify(gallery[i])
            assert r.subject_id == names[i] and r.score == pytest.approx(1.0, abs=1e-3)
        assert c2.fold_staged() == 3
        assert _key(c2).staged == 0 and _key(c2).subjects == 3
        assert c2.identify(gallery[2]).subject_id == names[2]


def test_staged_ciphertexts_are_checked_after_the_first_too(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    """The first staged template of a key is checked by a worker, the next ones by the front-end: both refuse junk."""
    gallery, names, _ = faces
    with make_client(server, "staged-check") as c:
        c.enroll_many(names[:10], gallery[:10])
        good = c.crypto.encrypt_staged(c.prepare(c.normalize(gallery[10:11]))[0])
        for i, blob in enumerate([b"\x00" * 64, good, b"\x00" * 64, good[: len(good) // 2], good[::-1]]):
            request = pb.EnrollStagedRequest(
                tenant_id=c.state.tenant_id, key_id=c.state.key_id, label="", handle=f"h{i:02d}" * 8,
                ciphertext=blob,
            )
            if blob is good:
                c.transport.call(c.transport.enrollment.EnrollStaged, request)
                continue
            with pytest.raises(InvalidArgument, match="staged template is malformed"):
                c.transport.call(c.transport.enrollment.EnrollStaged, request)
        assert {k.key_id: k for k in c.describe().keys}[c.state.key_id].staged == 1
