"""The server's plaintext rule and the development CA of ``--tls-self-signed`` (no server started)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from veilface.errors import InvalidArgument
from veilface.server import tls
from veilface.server.config import ServerSettings
from veilface.server.tls import (
    check_plaintext_bind,
    dev_certificate_hosts,
    ensure_dev_tls,
    plaintext_refusal,
    resolve_server_tls,
)

FLAGS = ("--tls-cert/--tls-key", "--tls-self-signed DIR", "--insecure")


@pytest.mark.parametrize("host", ["0.0.0.0", "", "[::]", "::", "203.0.113.9", "[2001:db8::1]"])
def test_plaintext_refused_on_non_loopback_naming_every_way_out(host: str) -> None:
    reason = plaintext_refusal(host)
    assert reason is not None and all(flag in reason for flag in FLAGS)
    with pytest.raises(InvalidArgument) as exc:
        check_plaintext_bind(host, tls=False, insecure=False)
    assert all(flag in exc.value.message for flag in FLAGS)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
def test_plaintext_allowed_on_loopback(host: str) -> None:
    assert plaintext_refusal(host) is None
    check_plaintext_bind(host, tls=False, insecure=False)


def test_tls_or_insecure_allow_a_non_loopback_bind(caplog: pytest.LogCaptureFixture) -> None:
    check_plaintext_bind("0.0.0.0", tls=True, insecure=False)
    with caplog.at_level(logging.WARNING, logger=tls.__name__):
        check_plaintext_bind("0.0.0.0", tls=False, insecure=True)
    assert any("PLAINTEXT" in r.getMessage() for r in caplog.records)


def test_settings_resolve_applies_the_rule_and_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidArgument, match="--insecure"):
        resolve_server_tls(ServerSettings(host="0.0.0.0"))
    assert resolve_server_tls(ServerSettings(host="127.0.0.1")) is None
    monkeypatch.setenv("VEILFACE_INSECURE", "1")
    assert resolve_server_tls(ServerSettings.from_env(host="0.0.0.0")) is None
    monkeypatch.delenv("VEILFACE_INSECURE")
    monkeypatch.setenv("VEILFACE_TLS_SELF_SIGNED", str(tmp_path / "dev"))
    cert = resolve_server_tls(ServerSettings.from_env(host="0.0.0.0"))
    assert cert is not None and cert.ca_cert == tmp_path / "dev" / "ca.pem"
    both = ServerSettings(tls_self_signed=tmp_path, tls_cert=cert.cert, tls_key=cert.key)
    with pytest.raises(InvalidArgument, match="not both"):
        resolve_server_tls(both)


def test_cli_refuses_plaintext_on_every_interface(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEILFACE_")}
    db = tmp_path / "refused.db"
    proc = subprocess.run(
        [sys.executable, "-m", "veilface.cli.main", "serve", "--host", "0.0.0.0", "--port", "0",
         "--db", str(db), "--workers", "1"],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode != 0
    assert "refusing to serve plaintext on 0.0.0.0" in proc.stderr
    assert all(flag in proc.stderr for flag in FLAGS)
    assert "listening" not in proc.stdout
    assert not db.exists()  # refused before the store was opened


# -- the development CA -----------------------------------------------------------


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(
        ext.get_values_for_type(x509.DNSName)
    )


def test_dev_ca_made_with_tight_modes_and_a_chain_that_verifies(tmp_path: Path) -> None:
    files = ensure_dev_tls(tmp_path / "dev", host="Veil.Example")
    assert files.created
    for key in (files.ca_key, files.server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "dev").stat().st_mode & 0o777 == 0o700
    ca, server = _cert(files.ca_cert), _cert(files.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert _sans(server) == {"127.0.0.1", "::1", "localhost", "veil.example"}
    assert server.not_valid_after_utc <= ca.not_valid_after_utc


def test_dev_ca_is_reused_and_the_server_cert_reissued_only_when_needed(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    first = ensure_dev_tls(d)
    ca_pem, server_pem = first.ca_cert.read_bytes(), first.server_cert.read_bytes()

    again = ensure_dev_tls(d)
    assert not again.created
    assert again.ca_cert.read_bytes() == ca_pem and again.server_cert.read_bytes() == server_pem

    moved = ensure_dev_tls(d, host="10.1.2.3")  # a new name: same CA, new server certificate
    assert moved.created and moved.ca_cert.read_bytes() == ca_pem
    assert "10.1.2.3" in _sans(_cert(moved.server_cert))
    _cert(moved.server_cert).verify_directly_issued_by(_cert(moved.ca_cert))

    moved.server_cert.write_text("not a certificate")  # corrupt: reissued
    assert ensure_dev_tls(d, host="10.1.2.3").created
    _cert(moved.server_cert).verify_directly_issued_by(_cert(moved.ca_cert))


def test_dev_server_cert_from_another_ca_is_replaced(tmp_path: Path) -> None:
    a, b = ensure_dev_tls(tmp_path / "a"), ensure_dev_tls(tmp_path / "b")
    a.server_cert.write_bytes(b.server_cert.read_bytes())
    a.server_key.write_bytes(b.server_key.read_bytes())
    assert ensure_dev_tls(tmp_path / "a").created
    _cert(a.server_cert).verify_directly_issued_by(_cert(a.ca_cert))


def test_dev_ca_near_its_end_is_renewed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_dev_tls(tmp_path / "dev")
    old = first.ca_cert.read_bytes()
    monkeypatch.setattr(tls, "RENEW_BEFORE", dt.timedelta(days=tls.SERVER_DAYS + 1))
    renewed = ensure_dev_tls(tmp_path / "dev")
    assert renewed.created and renewed.ca_cert.read_bytes() == old  # CA still has a year
    monkeypatch.setattr(tls, "RENEW_BEFORE", dt.timedelta(days=tls.CA_DAYS))
    assert ensure_dev_tls(tmp_path / "dev").ca_cert.read_bytes() != old


def test_dev_ca_refuses_loose_key_files(tmp_path: Path) -> None:
    files = ensure_dev_tls(tmp_path / "dev")
    files.ca_key.chmod(0o640)
    with pytest.raises(InvalidArgument, match="chmod 600"):
        ensure_dev_tls(tmp_path / "dev")


def test_dev_certificate_hosts_skip_wildcards() -> None:
    assert dev_certificate_hosts("0.0.0.0") == ["127.0.0.1", "::1", "localhost"]
    assert dev_certificate_hosts("[::]") == ["127.0.0.1", "::1", "localhost"]
    assert dev_certificate_hosts("[2001:db8::1]")[-1] == str(ipaddress.ip_address("2001:db8::1"))
    assert dev_certificate_hosts("", ["kiosk.lan"])[-1] == "kiosk.lan"
