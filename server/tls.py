"""Transport security of ``veilface serve``: which certificate, and when plaintext is refused.

Three ways to serve:

- ``--tls-cert``/``--tls-key``: the operator's certificate;
- ``--tls-self-signed DIR``: a development CA and a server certificate it
  signs, made here with ``cryptography`` (ECDSA P-256) and reused on the next
  start while they are valid, so clients keep the same ``ca.pem``;
- plaintext, allowed only on a loopback address (127.0.0.0/8, ``::1``,
  ``localhost``) unless ``--insecure`` is given: without TLS the API tokens
  cross the network in clear.

Nothing here imports ``grpc``: ``server/app.py`` turns the paths into
credentials.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veilface.errors import InvalidArgument
from veilface.loopback import is_loopback_host

if TYPE_CHECKING:
    from veilface.server.config import ServerSettings

log = logging.getLogger(__name__)

#: Names and addresses every development certificate carries.
LOCAL_NAMES: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
#: Bind hosts meaning "every interface": never a certificate name.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})

CA_DAYS = 365
SERVER_DAYS = 90
#: A certificate closer than this to its end is replaced at start-up.
RENEW_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True)
class DevTLSFiles:
    """The files of ``--tls-self-signed DIR``.

    ``ca_cert`` is what clients pass as ``--root-cert``; ``ca_key`` and
    ``server_key`` are written with mode 0600. ``created`` says whether this
    call (re)wrote any of them.
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    created: bool


@dataclass(frozen=True)
class ServerCertificate:
    """The certificate chain and key the server presents (PEM files)."""

    cert: Path
    key: Path
    ca_cert: Path | None = None  # set for a development CA: the clients' root


def bare_host(host: str) -> str:
    """``host`` without IPv6 brackets or surrounding blanks."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def plaintext_refusal(host: str) -> str | None:
    """Why plaintext may not be served on ``host``, or None when it may (loopback).

    A pure function so the rule is testable without a non-loopback interface.
    """
    if is_loopback_host(host):
        return None
    shown = host if bare_host(host) else '"" (every interface)'
    return (
        f"refusing to serve plaintext on {shown}: it is not a loopback address, and "
        "without TLS API tokens and ciphertexts cross the network in clear. Give "
        "--tls-cert/--tls-key (your certificate), --tls-self-signed DIR (a development CA "
        "and certificate made in DIR), or --insecure to serve plaintext anyway"
    )


def check_plaintext_bind(host: str, *, tls: bool, insecure: bool) -> None:
    """Raise :class:`InvalidArgument` for plaintext on a non-loopback host without ``insecure``.

    With ``insecure`` the bind is allowed and logged as a warning.
    """
    if tls:
        return
    reason = plaintext_refusal(host)
    if reason is None:
        return
    if not insecure:
        raise InvalidArgument(reason)
    log.warning("serving PLAINTEXT on non-loopback %r (--insecure): tokens travel in clear", host)


def resolve_server_tls(settings: ServerSettings) -> ServerCertificate | None:
    """The certificate to serve with (making the development CA if asked), or None for plaintext.

    Also applies the plaintext rule, so a refused start fails before the
    store or the workers are touched.
    """
    has_pair = settings.tls_cert is not None or settings.tls_key is not None
    if settings.tls_self_signed is not None and has_pair:
        raise InvalidArgument("give either --tls-cert/--tls-key or --tls-self-signed DIR, not both")
    tls: ServerCertificate | None = None
    if settings.tls_self_signed is not None:
        files = ensure_dev_tls(Path(settings.tls_self_signed), host=settings.host)
        tls = ServerCertificate(files.server_cert, files.server_key, files.ca_cert)
    elif settings.tls_cert is not None and settings.tls_key is not None:
        tls = ServerCertificate(Path(settings.tls_cert), Path(settings.tls_key))
    elif has_pair:
        raise InvalidArgument("TLS needs both a certificate and a key (--tls-cert, --tls-key)")
    check_plaintext_bind(settings.host, tls=tls is not None, insecure=settings.insecure)
    return tls


# -- the development CA -------------------------------------------------------


def dev_certificate_hosts(host: str, extra_hosts: Sequence[str] = ()) -> list[str]:
    """SAN entries: the loopback names, then the bind host (unless a wildcard) and extras."""
    names = list(LOCAL_NAMES)
    for h in (host, *extra_hosts):
        h = bare_host(h).lower()  # DNS names compare case-insensitively
        if h not in WILDCARD_HOSTS and h not in names:
            names.append(h)
    return names


def ensure_dev_tls(
    directory: Path, *, host: str = "127.0.0.1", extra_hosts: Sequence[str] = ()
) -> DevTLSFiles:
    """Make, or reuse while valid, a development CA and a server certificate in ``directory``.

    The CA (``ca.pem``, ``ca.key``) is reused while it has more than a week
    to live; the server certificate (``server.pem``, ``server.key``) is
    reissued by the same CA when it is missing, near its end, does not match
    its key, or lacks a name of :func:`dev_certificate_hosts`, so a client's
    ``ca.pem`` stays valid across restarts and host changes.

    Parameters
    ----------
    directory : Path
        Created with mode 0700 when missing.
    host : str
        The bind host; a name or address (not a wildcard) joins the SANs.
    extra_hosts : sequence of str
        Further names or addresses clients will dial.

    Raises
    ------
    InvalidArgument
        An existing key file is readable by group or others, or the path
        is not a directory.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InvalidArgument(f"--tls-self-signed needs a directory; {directory} is a file")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = {n: directory / n for n in ("ca.pem", "ca.key", "server.pem", "server.key")}
    for name in ("ca.key", "server.key"):
        _refuse_loose_key(paths[name])
    hosts = dev_certificate_hosts(host, extra_hosts)
    now = dt.datetime.now(dt.timezone.utc)
    created = False

    ca = _load_ca(paths["ca.pem"], paths["ca.key"], now)
    if ca is None:
        ca = _new_ca(now)
        _write_atomic(paths["ca.key"], _key_pem(ca[1]), secret=True)
        _write_atomic(paths["ca.pem"], ca[0].public_bytes(serialization.Encoding.PEM))
        created = True
        log.warning("created a development CA in %s: it is for testing, not production", directory)
    ca_cert, ca_key = ca

    if created or not _server_ok(paths["server.pem"], paths["server.key"], ca_cert, hosts, now):
        cert, key = _new_server_cert(ca_cert, ca_key, hosts, now)
        _write_atomic(paths["server.key"], _key_pem(key), secret=True)
        _write_atomic(paths["server.pem"], cert.public_bytes(serialization.Encoding.PEM))
        created = True
        log.info("issued a development server certificate for %s", ", ".join(hosts))
    return DevTLSFiles(
        directory, paths["ca.pem"], paths["ca.key"], paths["server.pem"], paths["server.key"], created
    )


def _refuse_loose_key(path: Path) -> None:
    if path.exists() and path.stat().st_mode & 0o077:
        raise InvalidArgument(f"{path} is readable by group or others; run chmod 600 {path}")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_atomic(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Write via a temporary file and rename; secret files are 0600 from their creation."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not secret:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _read_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _in_validity(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - RENEW_BEFORE > now


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _load_ca(
    cert_path: Path, key_path: Path, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert, key = _read_cert(cert_path), _read_key(key_path)
    if cert is None or key is None or not _same_public_key(cert, key) or not _in_validity(cert, now):
        return None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    return (cert, key) if constraints.ca else None


def _server_ok(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    now: dt.datetime,
) -> bool:
    cert, key = _read_cert(cert_path), _read_key(key_path)
    if cert is None or key is None or not _same_public_key(cert, key) or not _in_validity(cert, now):
        return False
    if cert.issuer != ca_cert.subject:
        return False
    ca_public = ca_cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        ca_public.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (InvalidSignature, x509.ExtensionNotFound):
        return False
    return set(_san_names(hosts)) <= set(sans)


def _san_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def _validity(builder: x509.CertificateBuilder, now: dt.datetime, days: int) -> x509.CertificateBuilder:
    start = now - dt.timedelta(hours=1)  # tolerate a client clock a little behind
    return builder.not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))


def _new_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veilface development CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _validity(builder, now, CA_DAYS).sign(key, hashes.SHA256()), key


def _new_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(_san_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    days = SERVER_DAYS
    ca_left = ca_cert.not_valid_after_utc - now
    if ca_left < dt.timedelta(days=days):
        days = max(1, ca_left.days)  # never outlive the CA
    return _validity(builder, now, days).sign(ca_key, hashes.SHA256()), key


__all__ = [
    "DevTLSFiles",
    "ServerCertificate",
    "check_plaintext_bind",
    "dev_certificate_hosts",
    "ensure_dev_tls",
    "plaintext_refusal",
    "resolve_server_tls",
]
