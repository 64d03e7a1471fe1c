"""TLS end to end, and no acknowledged template lost when the server is SIGKILLed."""

from __future__ import annotations

import datetime
import ipaddress
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.conftest import create_tenant
from veilface.client.admin import AdminClient
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.client.transport import Transport
from veilface.errors import VeilfaceError
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer
from veilface.server.tls import ensure_dev_tls

pytestmark = pytest.mark.slow


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_round_trip_and_plaintext_refused(tmp_path, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    cert, key = self_signed(tmp_path)
    with LocalServer(tmp_path / "tls.db", tls_cert=cert, tls_key=key) as srv:
        with AdminClient(srv.target, token=srv.admin_token, root_cert=cert) as admin:
            token = admin.create_tenant("tls").api_token
        state = TenantState.new("tls", dim=128)
        with VeilClient(srv.target, state, token=token, root_cert=cert, encrypt_workers=0) as c:
            c.register_key()
            c.enroll_many(names[:30], gallery[:30])
            assert c.identify(probes[4]).subject_id == names[4]
        plain = Transport(srv.target, token=token, timeout_s=5)
        with pytest.raises(VeilfaceError):
            plain.call(plain.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="tls"))
        plain.close()


def test_self_signed_dev_ca_end_to_end(tmp_path: Path) -> None:
    """``serve --tls-self-signed DIR``: a client holding DIR/ca.pem talks TLS, others cannot."""
    certs = tmp_path / "dev-tls"
    with LocalServer(tmp_path / "dev.db", workers=1, tls_self_signed=certs) as srv:
        assert srv.root_cert == certs / "ca.pem" and srv.root_cert.is_file()
        for target in (srv.target, f"127.0.0.1:{srv.port}"):  # the DNS and the IP SAN
            tr = Transport(target, token=srv.admin_token, root_cert=srv.root_cert)
            health = health_pb2_grpc.HealthStub(tr.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            tr.close()
        with AdminClient(srv.target, token=srv.admin_token, root_cert=srv.root_cert) as admin:
            token = admin.create_tenant("dev").api_token
        tr = Transport(srv.target, token=token, root_cert=srv.root_cert)
        desc = tr.call(tr.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="dev"))
        assert desc.tenant_id == "dev" and not desc.keys
        tr.close()

        stranger = ensure_dev_tls(tmp_path / "other-ca")  # a CA the server's certificate is not from
        for root in (stranger.ca_cert, None):  # None: plaintext on loopback
            bad = Transport(srv.target, token=token, root_cert=root, timeout_s=5)
            with pytest.raises(VeilfaceError):
                bad.call(bad.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="dev"))
            bad.close()


@pytest.fixture(params=["sqlite", "postgres"])
def crash_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path | None]:
    """(``--db`` value, admin token file) of an empty store of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "crash.db"), None
    return request.getfixturevalue("postgres").fresh_url(), tmp_path / "admin-token"


def _staged_bins(db: str) -> int:
    """Bins of unfinished bulk streams left in the store (a half-written import)."""
    if "://" not in db:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return int(con.execute("SELECT COUNT(*) FROM bins WHERE state='staged'").fetchone()[0])
    import psycopg

    with psycopg.connect(db) as conn:
        row = conn.execute(b"SELECT COUNT(*) FROM bins WHERE state='staged'").fetchone()
        return int(row[0]) if row else 0


def test_sigkill_during_bulk_loses_no_acknowledged_template(  # type: ignore[no-untyped-def]
    request, tmp_path, faces, crash_store
) -> None:
    """Enroll through a real server process, SIGKILL it mid-stream, restart: every
    acknowledged template is there, nothing of the cut stream (on SQLite and PostgreSQL)."""
    gallery, names, _ = faces
    db, admin_file = crash_store
    state = TenantState.new("crash", dim=128)
    acknowledged: list[str] = []
    srv = LocalServer(db, admin_token_file=admin_file).start()
    try:
        token = create_tenant(srv, "crash")
        c = VeilClient(srv.target, state, token=token, encrypt_workers=0)
        c.register_key()
        c.enroll_many(names[:100], gallery[:100])
        acknowledged += names[:100]
        for n, g in zip(names[100:110], gallery[100:110]):
            c.enroll(n, g)
            acknowledged.append(n)

        # A second bulk import, killed mid-stream: its chunks are in flight.
        x = c.prepare(gallery[110:200])
        started = threading.Event()

        def chunks():  # type: ignore[no-untyped-def]
            for i in range(6):
                rows = list(range(15 * i, 15 * i + 15))
                yield pb.BulkEnrollChunk(
                    tenant_id="crash", key_id="k1", label="", total_bins=6 if i == 0 else 0,
                    handles=[c.state.handles().encode(names[110 + r]) for r in rows],
                    slots=list(range(15)),
                    ciphertexts=c.crypto.encrypt_contribution(x[rows], list(range(15))),
                )
                started.set()
                time.sleep(0.3)

        errors: list[BaseException] = []

        def bulk() -> None:
            try:
                c.transport.call(c.transport.enrollment.BulkEnroll, chunks(), timeout=30)
            except BaseException as exc:  # noqa: BLE001 - the server dies under it
                errors.append(exc)

        t = threading.Thread(target=bulk)
        t.start()
        assert started.wait(30)
        deadline = time.monotonic() + 30
        while _staged_bins(db) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _staged_bins(db) >= 1, "no chunk of the stream was written before the kill"
        srv.kill()  # SIGKILL to the server and its workers, mid-stream
        t.join(30)
        assert errors, "the killed bulk import must not be acknowledged"
        c.close()
    finally:
        srv.kill()

    if admin_file is not None:
        request.getfixturevalue("postgres").wait_gone()  # the killed server's sessions have ended
    with LocalServer(db, admin_token_file=admin_file) as srv2:
        assert _staged_bins(db) == 0  # the cut stream's bins were removed at start-up
        with VeilClient(srv2.target, state, token=token, encrypt_workers=0) as c2:
            desc = c2.describe().keys[0]
            assert desc.subjects == len(acknowledged)  # all acknowledged, nothing of the cut stream
            for i in (0, 57, 99, 100, 105, 109):
                r = c2.identify(gallery[i])
                assert r.subject_id == names[i] and r.score == pytest.approx(1.0, abs=1e-3)
            assert c2.identify(gallery[150]).score < 0.999  # never acknowledged, not there
