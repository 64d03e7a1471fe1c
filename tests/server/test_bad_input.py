"""Bad input gets a precise status, the server keeps serving, nothing half-written remains."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.server.conftest import make_client
from veilface.client.transport import RemoteError, Transport
from veilface.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    db = tmp_path_factory.mktemp("bad") / "g.db"
    with LocalServer(db, extra_args=["--max-message-mb", "8"]) as srv:
        yield srv


def _raw(srv: LocalServer, token: str) -> Transport:
    return Transport(srv.target, token=token)


def test_malformed_and_foreign_ciphertexts(small_server, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    with make_client(small_server, "bad-ct") as c:
        c.enroll_many(names[:20], gallery[:20])
        good = c.crypto.encrypt_probe(c.prepare_probe(gallery[0])[0])
        tr = c.transport
        cases = {
            "garbage": [b"\x01" * 200] + good[1:],
            "truncated": [good[0][: len(good[0]) // 2]] + good[1:],
            "too few": good[:-1],
            "empty": [],
        }
        for probe in cases.values():
            req = pb.PreselectRequest(
                tenant_id="bad-ct", key_id="k1", mode=pb.SEARCH_MODE_STRICT, probe_ciphertexts=probe
            )
            with pytest.raises(InvalidArgument):
                tr.call(tr.identification.Preselect, req)
        # a contribution made of probe-shaped garbage at a reserved slot
        res = tr.call(
            tr.enrollment.ReserveSlots,
            pb.ReserveSlotsRequest(tenant_id="bad-ct", key_id="k1", label="", count=1),
        )
        bad = c.crypto.encrypt_contribution(c.prepare(gallery[21]), list(res.slots))
        bad[7] = bad[7][:-10]
        with pytest.raises(InvalidArgument):
            tr.call(
                tr.enrollment.Enroll,
                iter([
                    pb.EnrollRequest(
                        tenant_id="bad-ct", key_id="k1", reservation_id=res.reservation_id,
                        handles=["h-bad"], ciphertexts=bad[:64],
                    ),
                    pb.EnrollRequest(ciphertexts=bad[64:]),
                ]),
            )
        # too many ciphertexts, and a second message that tries to switch reservation
        good = c.crypto.encrypt_contribution(c.prepare(gallery[21]), list(res.slots))
        for msgs in (
            [pb.EnrollRequest(tenant_id="bad-ct", key_id="k1", reservation_id=res.reservation_id,
                              handles=["h-bad"], ciphertexts=good), pb.EnrollRequest(ciphertexts=good[:1])],
            [pb.EnrollRequest(tenant_id="bad-ct", key_id="k1", reservation_id=res.reservation_id,
                              handles=["h-bad"], ciphertexts=good[:10]),
             pb.EnrollRequest(reservation_id="other", ciphertexts=good[10:])],
        ):
            with pytest.raises(InvalidArgument):
                tr.call(tr.enrollment.Enroll, iter(msgs))
        # a staged template: garbage, truncated, missing, oversized, a foreign key
        staged = c.crypto.encrypt_staged(c.prepare(gallery[22])[0])
        other = make_client(small_server, "bad-ct-other")
        foreign = other.crypto.encrypt_staged(other.prepare(gallery[22])[0])
        other.close()
        for blob, err in (
            (b"\x02" * 300, InvalidArgument),
            (staged[: len(staged) // 2], InvalidArgument),
            (b"", InvalidArgument),
            (staged + b"\0" * (600 * 1024), ResourceExhausted),
        ):
            with pytest.raises(err):
                tr.call(
                    tr.enrollment.EnrollStaged,
                    pb.EnrollStagedRequest(tenant_id="bad-ct", key_id="k1", handle="h-st", ciphertext=blob),
                )
        # a ciphertext of another tenant's key loads (same parameters) but is
        # noise under this key: the server cannot tell; the tenant's own
        # scores would be garbage for it, never for other templates
        tr.call(
            tr.enrollment.EnrollStaged,
            pb.EnrollStagedRequest(tenant_id="bad-ct", key_id="k1", handle="h-foreign", ciphertext=foreign),
        )
        with pytest.raises(NotFound):
            tr.call(
                tr.enrollment.EnrollStaged,
                pb.EnrollStagedRequest(tenant_id="bad-ct", key_id="nokey", handle="h-st", ciphertext=staged),
            )
        tr.call(tr.enrollment.DeleteSubject, pb.DeleteSubjectRequest(tenant_id="bad-ct", handle="h-foreign"))
        # wrong template dimension on the client side
        with pytest.raises(InvalidArgument):
            c.identify(np.ones(64))
        with pytest.raises(InvalidArgument):
            c.identify(np.full(128, np.nan))
        # still serving, and the rejected enrollment left nothing behind
        assert c.identify(gallery[3]).subject_id == names[3]
        assert c.describe().keys[0].subjects == 20


def test_unknown_tenant_key_subject_and_mode(small_server, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    with make_client(small_server, "unk") as c:
        tr = c.transport
        with pytest.raises(NotFound):
            tr.call(tr.identification.Verify, pb.VerifyRequest(tenant_id="unk", handle="nobody", key_id="k1"))
        with pytest.raises(NotFound):
            c.verify("never-enrolled", gallery[0])
        with pytest.raises(NotFound):
            tr.call(
                tr.enrollment.ReserveSlots,
                pb.ReserveSlotsRequest(tenant_id="unk", key_id="nokey", label="", count=1),
            )
        with pytest.raises(InvalidArgument):
            tr.call(tr.identification.Preselect, pb.PreselectRequest(tenant_id="unk", key_id="k1"))
        with pytest.raises(NotFound):
            tr.call(
                tr.enrollment.Enroll,
                iter([pb.EnrollRequest(tenant_id="unk", key_id="k1", reservation_id="forged", handles=["x"])]),
            )
        with pytest.raises(InvalidArgument):
            tr.call(tr.tenants.RegisterKey, pb.RegisterKeyRequest(tenant_id="unk", key_id="k2", public_context=b"nope"))


def test_oversized_message_is_resource_exhausted(small_server) -> None:  # type: ignore[no-untyped-def]
    with make_client(small_server, "big") as c:
        tr = c.transport
        with pytest.raises(ResourceExhausted):  # over the server's 8 MiB message limit
            tr.call(
                tr.tenants.RegisterKey,
                pb.RegisterKeyRequest(tenant_id="big", key_id="k2", public_context=b"\0" * (9 * 1024 * 1024)),
            )
        with pytest.raises(ResourceExhausted):  # more work than one request may ask for
            tr.call(
                tr.enrollment.ReserveSlots,
                pb.ReserveSlotsRequest(tenant_id="big", key_id="k1", label="", count=5000),
            )
        assert c.describe().keys[0].key_id == "k1"  # still serving


def test_tokens_and_tenant_isolation(small_server, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(small_server, "tenant-a") as a, make_client(small_server, "tenant-b") as b:
        b.enroll_many(names[:10], gallery[:10])
        handle_b = b.state.handles().encode(names[0])
        tr = a.transport  # tenant A's token
        probe = a.crypto.encrypt_probe(a.prepare_probe(probes[0])[0])
        calls = [
            (tr.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="tenant-b")),
            (tr.identification.Preselect, pb.PreselectRequest(tenant_id="tenant-b", key_id="k1", mode=pb.SEARCH_MODE_STRICT, probe_ciphertexts=probe)),
            (tr.identification.Verify, pb.VerifyRequest(tenant_id="tenant-b", handle=handle_b, key_id="k1", probe_ciphertexts=probe)),
            (tr.enrollment.ReserveSlots, pb.ReserveSlotsRequest(tenant_id="tenant-b", key_id="k1", count=1)),
            (tr.enrollment.FetchSubjectBin, pb.FetchSubjectBinRequest(tenant_id="tenant-b", handle=handle_b)),
            (tr.enrollment.DeleteSubject, pb.DeleteSubjectRequest(tenant_id="tenant-b", handle=handle_b, bin_id=1)),
            (tr.tenants.CreateTenant, pb.CreateTenantRequest(tenant_id="tenant-c")),
            (tr.enrollment.EnrollStaged, pb.EnrollStagedRequest(tenant_id="tenant-b", key_id="k1", handle="x", ciphertext=probe[0])),
            (tr.enrollment.FetchStaged, pb.FetchStagedRequest(tenant_id="tenant-b", key_id="k1")),
        ]
        for method, req in calls:
            with pytest.raises(PermissionDenied):
                tr.call(method, req)
        # A bulk stream that names another tenant in its chunks is refused too.
        chunk = pb.BulkEnrollChunk(tenant_id="tenant-b", key_id="k1", handles=["x"], slots=[0])
        with pytest.raises(PermissionDenied):
            tr.call(tr.enrollment.BulkEnroll, iter([chunk]))
        # B is untouched
        assert b.describe().keys[0].subjects == 10
        assert b.identify(gallery[0]).subject_id == names[0]
    for bad in ("", "vf_wrong-token"):
        t = _raw(small_server, bad or "x")
        if not bad:
            t._metadata = ()  # no authorization header at all
        with pytest.raises(Unauthenticated):
            t.call(t.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="tenant-a"))
        t.close()


def test_bulk_stream_cut_in_the_middle_leaves_nothing(small_server, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    with make_client(small_server, "cut") as c:
        c.enroll_many(names[:5], gallery[:5])
        x = c.prepare(gallery[5:15])

        def chunks():  # type: ignore[no-untyped-def]
            for i in range(2):
                yield pb.BulkEnrollChunk(
                    tenant_id="cut", key_id="k1", label="",
                    handles=[f"cut-{i}-{j}" for j in range(5)], slots=list(range(5)),
                    ciphertexts=c.crypto.encrypt_contribution(x[5 * i : 5 * i + 5], list(range(5))),
                )
            raise RuntimeError("client dies mid-stream")

        with pytest.raises(RemoteError):  # CANCELLED/UNKNOWN: the client's iterator raised
            c.transport.call(c.transport.enrollment.BulkEnroll, chunks())
        desc = c.describe().keys[0]
        assert desc.subjects == 5 and desc.bins == 1
        assert c.identify(gallery[2]).subject_id == names[2]


def test_health_service_answers_without_token(small_server) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(small_server.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="veilface.v1.Identification"), timeout=10
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
