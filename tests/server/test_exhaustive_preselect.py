"""Exhaustive search in one stage: Preselect with ``exhaustive`` returns full scores.

A strict (or routed) query with ``k=0`` asks for every occupied slot. The
client now asks the server to score whole templates in the preselection
stage, and re-ranks nothing; the answers must be those of the two-stage
path, and a server that ignores the flag must still give correct answers.
"""

from __future__ import annotations

import numpy as np
import pytest

import veilface.client.convert as client_convert
from tests.server.conftest import make_client
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_exhaustive_search_is_one_stage_and_exact(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(server, "exhaustive-co") as c:
        c.enroll_many(names[:-2], gallery[:-2])
        for n, g in zip(names[-2:], gallery[-2:]):  # staged templates are searched too
            c.enroll(n, g)
        g = _unit(gallery)
        for i in range(0, 60, 6):
            one = c.identify(probes[i], mode="strict", k=0)
            two = c.identify(probes[i], mode="strict", k=len(names))  # two stages, every bin
            want = float(np.max(g @ _unit(probes[i])))
            assert one.stats.rerank_ms == 0.0  # no ScoreCandidates call was made
            assert one.stats.bins_preselected == one.stats.bins_reranked > 0
            assert two.stats.rerank_ms > 0.0
            assert one.subject_id == two.subject_id == names[int(np.argmax(g @ _unit(probes[i])))]
            assert one.score == pytest.approx(want, abs=1e-3)
            assert [x.subject_id for x in one.candidates] == [x.subject_id for x in two.candidates]
            np.testing.assert_allclose(
                [x.score for x in one.candidates], [x.score for x in two.candidates], atol=1e-3
            )


def test_a_server_that_ignores_the_flag_is_re_ranked(
    server: LocalServer, faces, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """An older server answers window scores without setting the reply's flag: the
    client must not read them as full scores, and re-ranks instead."""
    gallery, names, probes = faces
    real = client_convert.preselect_request

    def old_request(*args: object, exhaustive: bool = False) -> object:
        return real(*args)  # type: ignore[arg-type]  # the flag never reaches the server

    with make_client(server, "old-server-co") as c:
        c.enroll_many(names, gallery)
        monkeypatch.setattr(client_convert, "preselect_request", old_request)
        g = _unit(gallery)
        for i in range(0, 40, 8):
            r = c.identify(probes[i], mode="strict", k=0)
            assert r.stats.rerank_ms > 0.0  # it fell back to the second stage
            assert r.score == pytest.approx(float(np.max(g @ _unit(probes[i]))), abs=1e-3)


def test_exhaustive_preselect_keeps_the_checks_of_preselect(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    """The flag adds work per bin, not a way past the checks: a foreign tenant, an
    enroll-only token, a malformed or short probe and labels in strict mode are refused."""
    from tests.server.conftest import create_tenant
    from veilface.client.admin import AdminClient
    from veilface.client.sdk import VeilClient
    from veilface.client.tenant_state import TenantState
    from veilface.client.transport import Transport
    from veilface.errors import InvalidArgument, PermissionDenied
    from veilface.proto.v1 import veilface_pb2 as pb

    gallery, names, probes = faces
    owner_token = create_tenant(server, "ex-owner")
    a = VeilClient(server.target, TenantState.new("ex-owner", dim=128), token=owner_token, encrypt_workers=0)
    a.register_key()
    with a, make_client(server, "ex-other") as b:
        a.enroll_many(names[:20], gallery[:20])
        probe = a.crypto.encrypt_probe(a.prepare_probe(probes[0])[0])

        def req(**kw: object) -> pb.PreselectRequest:
            base: dict[str, object] = {
                "tenant_id": "ex-owner", "key_id": a.state.key_id, "mode": pb.SEARCH_MODE_STRICT,
                "probe_ciphertexts": probe, "exhaustive": True,
            }
            return pb.PreselectRequest(**{**base, **kw})  # type: ignore[arg-type]

        ok = a.transport.call(a.transport.identification.Preselect, req())
        assert ok.exhaustive and len(ok.bins) == 1
        with pytest.raises(PermissionDenied):  # another tenant's token
            b.transport.call(b.transport.identification.Preselect, req())
        with AdminClient(server.target, token=owner_token) as mgr:
            enroll_only = mgr.create_token("ex-owner", name="enroller", scopes=["enroll"]).api_token
        t = Transport(server.target, token=enroll_only)
        try:
            with pytest.raises(PermissionDenied):  # no query scope
                t.call(t.identification.Preselect, req())
        finally:
            t.close()
        with pytest.raises(InvalidArgument, match="malformed"):
            a.transport.call(a.transport.identification.Preselect, req(probe_ciphertexts=[b"\x00" * 64] * len(probe)))
        with pytest.raises(InvalidArgument):
            a.transport.call(a.transport.identification.Preselect, req(probe_ciphertexts=probe[:-1]))
        with pytest.raises(InvalidArgument):
            a.transport.call(a.transport.identification.Preselect, req(labels=["x"]))
