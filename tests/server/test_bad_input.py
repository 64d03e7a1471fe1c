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
    gallery, _names, _ = faces
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
                    total_bins=3 if i == 0 else 0,
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


def _raw_channel(srv: LocalServer) -> grpc.Channel:
    return grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 64 << 20)])


# Bytes that do not parse as any message: field 1, length-delimited, longer than the message.
_MALFORMED = b"\x0a\xff\xff\xff\x0f\x01"


def test_malformed_messages_are_invalid_argument(small_server, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, _, _ = faces
    with make_client(small_server, "malformed") as c:
        meta = c.transport._metadata
        tr = c.transport
        res = tr.call(
            tr.enrollment.ReserveSlots,
            pb.ReserveSlotsRequest(tenant_id="malformed", key_id="k1", label="", count=1),
        )
        cts = c.crypto.encrypt_contribution(c.prepare(gallery[:1]), [0])
        ch = _raw_channel(small_server)
        try:
            for method in (
                "/veilface.v1.Enrollment/FetchBin",
                "/veilface.v1.Identification/Preselect",
                "/veilface.v1.Tenants/RegisterKey",
            ):
                with pytest.raises(grpc.RpcError) as err:
                    ch.unary_unary(method)(_MALFORMED, metadata=meta, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            # Valid first messages, so that the server reads the malformed second one.
            first_enroll = pb.EnrollRequest(
                tenant_id="malformed", key_id="k1", reservation_id=res.reservation_id, handles=["m-0"]
            ).SerializeToString()
            first_bulk = pb.BulkEnrollChunk(
                tenant_id="malformed", key_id="k1", handles=["m-1"], slots=[0], ciphertexts=cts, total_bins=2
            ).SerializeToString()
            for method, first in (
                ("/veilface.v1.Enrollment/Enroll", first_enroll),
                ("/veilface.v1.Enrollment/BulkEnroll", first_bulk),
            ):
                for msgs in ([_MALFORMED], [first, _MALFORMED]):
                    with pytest.raises(grpc.RpcError) as err:
                        ch.stream_unary(method)(iter(msgs), metadata=meta, timeout=10)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, len(msgs))
        finally:
            ch.close()
        assert c.describe().keys[0].subjects == 0  # still serving, nothing written


def test_ids_past_int64_are_invalid_argument(small_server, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    huge = (2**63, 2**64 - 1)
    with make_client(small_server, "ids") as c:
        c.enroll_many(names[:4], gallery[:4])
        tr = c.transport
        probe = c.crypto.encrypt_probe(c.prepare_probe(gallery[0])[0])
        for big in huge:
            calls = [
                (tr.enrollment.FetchBin, pb.FetchBinRequest(tenant_id="ids", bin_id=big)),
                (tr.identification.ScoreCandidates, pb.ScoreCandidatesRequest(
                    tenant_id="ids", key_id="k1", probe_ciphertexts=probe,
                    candidates=[pb.CandidateSlots(bin_id=big, slots=[0])])),
                (tr.identification.FetchSlotMaps, pb.FetchSlotMapsRequest(
                    tenant_id="ids", key_id="k1", known=[pb.BinVersion(bin_id=big, version=0)])),
                (tr.enrollment.DeleteSubject, pb.DeleteSubjectRequest(
                    tenant_id="ids", handle="h", bin_id=big, bin_version=1)),
                (tr.enrollment.DeleteSubject, pb.DeleteSubjectRequest(
                    tenant_id="ids", handle="h", bin_id=1, bin_version=big)),
            ]
            for method, req in calls:
                with pytest.raises(InvalidArgument):
                    tr.call(method, req)
            for stream_method, msgs in (
                (tr.enrollment.Enroll, [pb.EnrollRequest(
                    tenant_id="ids", key_id="k1", reservation_id="r", handles=["h"], staged_id=big)]),
                (tr.enrollment.BulkEnroll, [pb.BulkEnrollChunk(
                    tenant_id="ids", key_id="k1", handles=["h"], slots=[0], total_bins=1,
                    replaces=[pb.BinRef(bin_id=big, version=1)])]),
            ):
                with pytest.raises(InvalidArgument):
                    tr.call(stream_method, iter(msgs))
        assert c.identify(gallery[1]).subject_id == names[1]


def test_oversized_ciphertexts_refused_on_arrival(small_server, faces) -> None:  # type: ignore[no-untyped-def]
    """A blob over the key's ciphertext size is refused when its message arrives, not at the stream's end."""
    import threading

    gallery, names, _ = faces
    with make_client(small_server, "sizes") as c:
        c.enroll_many(names[:4], gallery[:4])
        tr = c.transport
        big = b"\0" * (66_560 + 1)  # one byte over n4096's fresh ciphertext bound
        res = tr.call(
            tr.enrollment.ReserveSlots,
            pb.ReserveSlotsRequest(tenant_id="sizes", key_id="k1", label="", count=1),
        )
        good = c.crypto.encrypt_contribution(c.prepare(gallery[5:6]), list(res.slots))
        release = threading.Event()
        first_enroll = pb.EnrollRequest(
            tenant_id="sizes", key_id="k1", reservation_id=res.reservation_id,
            handles=["h-size"], ciphertexts=[*good[:3], big],
        )
        first_bulk = pb.BulkEnrollChunk(
            tenant_id="sizes", key_id="k1", handles=["h-bulk"], slots=[0], total_bins=2,
            ciphertexts=[*good[:-1], big],
        )
        for method, first in ((tr.enrollment.Enroll, first_enroll), (tr.enrollment.BulkEnroll, first_bulk)):

            def held(first=first):  # type: ignore[no-untyped-def]
                yield first
                release.wait(60)  # the client holds the stream open

            fut = method.future(held(), metadata=tr._metadata, timeout=60)
            try:
                with pytest.raises(grpc.RpcError) as err:
                    fut.result(timeout=15)  # answered while the stream is still open
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            finally:
                fut.cancel()
        release.set()
        center = c.crypto.encrypt_probe(c.prepare_probe(gallery[0])[0])
        for method, req in (
            (tr.tenants.RegisterCenter, pb.RegisterCenterRequest(
                tenant_id="sizes", key_id="k1", center_ciphertexts=[*center[:-1], big])),
            (tr.enrollment.DeleteSubject, pb.DeleteSubjectRequest(
                tenant_id="sizes", handle=c.state.handles().encode(names[0]), bin_id=1, bin_version=1,
                ciphertexts=[*good[:-1], big])),
        ):
            with pytest.raises(ResourceExhausted):
                tr.call(method, req)
        assert c.describe().keys[0].subjects == 4
        assert c.identify(gallery[2]).subject_id == names[2]
