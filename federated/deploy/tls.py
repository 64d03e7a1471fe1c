"""TLS material and SuperNode keys for a Deployment Engine run (``cryptography``).

- :func:`generate_tls`: a throw-away CA and a server certificate for the
  SuperLink (SANs for ``127.0.0.1`` and ``localhost``).
- :func:`generate_node_keys`: one EC (NIST P-384) key pair per SuperNode in
  OpenSSH format, the format ``flwr supernode register`` and
  ``flower-supernode --auth-supernode-private-key`` expect.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from veilface.errors import InvalidArgument

__all__ = ["NodeKeyPair", "TlsFiles", "generate_node_keys", "generate_tls"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the SuperLink's TLS.

    Attributes
    ----------
    ca_cert : Path
        Self-signed CA certificate; give it to SuperNodes (``--root-certificates``)
        and to the Flower CLI (``root-certificates``).
    server_cert, server_key : Path
        SuperLink certificate (signed by the CA) and its unencrypted private key.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


def generate_tls(
    out_dir: str | os.PathLike[str],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 7,
) -> TlsFiles:
    """Create a CA and a SuperLink server certificate for ``hosts`` in ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Folder for ``ca.pem``, ``server.pem``, ``server.key`` (created if missing;
        the key files are written with mode 0600).
    hosts : sequence of str
        Subject alternative names: IP addresses or DNS names the SuperNodes dial.
    days : int
        Validity, from one hour ago.

    Returns
    -------
    TlsFiles
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise InvalidArgument("generate_tls needs at least one host name or IP address")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veilface local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(out / "ca.pem", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode's authentication key pair (OpenSSH format, EC P-384)."""

    name: str
    private_key: Path
    public_key: Path


def generate_node_keys(out_dir: str | os.PathLike[str], name: str) -> NodeKeyPair:
    """Create ``<name>.key`` / ``<name>.pub`` in ``out_dir`` for SuperNode authentication.

    The public key is what ``flwr supernode register`` sends to the SuperLink;
    the private key stays with the SuperNode (``--auth-supernode-private-key``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name:
        raise InvalidArgument(f"node key name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKeyPair(name, out / f"{name}.key", out / f"{name}.pub")
    _write_secret(
        pair.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pair.public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode()
    )
    return pair


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
