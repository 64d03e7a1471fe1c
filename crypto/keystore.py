"""Secret material encrypted at rest (AES-256-GCM under a derived key).

A *sealed blob* is a JSON-serializable dict::

    {"kdf": {"name": "scrypt", "salt": <b64>, "n": 32768, "r": 8, "p": 1}
            | {"name": "hkdf-sha256", "salt": <b64>},
     "aead": "aes-256-gcm",
     "nonce": <b64, 12 bytes>,
     "ciphertext": <b64, payload + 16-byte tag>}

The key is derived either from a passphrase (scrypt, for a person typing it)
or from a key file of at least 32 random bytes (HKDF-SHA256, for a machine;
make one with :func:`generate_key_file`). Every blob has a fresh salt and a
fresh 12-byte nonce. The caller's ``aad`` (for a tenant file: its clear
header) is authenticated but not stored, so a blob opened under a different
header fails exactly like a wrong passphrase. The KDF parameters are not
authenticated separately: changing them changes the derived key, which the
GCM tag then rejects.

Errors are :class:`~veilface.errors.KeystoreError` and never contain the
passphrase, the key file's contents, or the payload.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from veilface.errors import InvalidArgument, KeystoreError

logger = logging.getLogger(__name__)

AEAD_NAME = "aes-256-gcm"
KDF_SCRYPT = "scrypt"
KDF_HKDF = "hkdf-sha256"

#: Default scrypt cost (N = 2^15, r = 8, p = 1: 32 MiB, ~0.1 s; OWASP's minimum).
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
#: Upper bounds accepted when *opening* a blob, so a forged file cannot make
#: the reader allocate gigabytes or spin for minutes.
_MAX_SCRYPT_N = 2**20
_MAX_SCRYPT_R = 32
_MAX_SCRYPT_P = 16
_MAX_SCRYPT_MEMORY = 2**30  # bytes (128 * n * r)

KEY_FILE_MIN_BYTES = 32
_KEY_LEN = 32
_SALT_LEN = 16
_NONCE_LEN = 12
_HKDF_INFO = b"veilface-keystore/1"


def _check_one_secret(passphrase: str | None, key_file: Path | None) -> None:
    if (passphrase is None) == (key_file is None):
        raise InvalidArgument(
            "give exactly one of a passphrase or a key file to seal or open tenant secrets"
        )
    if passphrase is not None and not passphrase:
        raise KeystoreError("the passphrase is empty; use a non-empty passphrase or a key file")


def read_key_file(path: Path) -> bytes:
    """Read the key material of a key file.

    Parameters
    ----------
    path
        A file holding at least 32 bytes: either hex text (surrounding
        whitespace ignored; what :func:`generate_key_file` writes) or raw bytes.

    Returns
    -------
    bytes
        The key material (hex-decoded when the file is hex text).

    Raises
    ------
    KeystoreError
        The file cannot be read or holds fewer than 32 bytes of key material.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeystoreError(
            f"cannot read key file {str(path)!r} ({exc.strerror or type(exc).__name__}); "
            "check the path, or create one with veilface.crypto.keystore.generate_key_file"
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "key file %s is accessible to group or others; restrict it with chmod 600", path
        )
    text = raw.strip()
    material = raw
    if text and len(text) % 2 == 0:
        try:
            material = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            material = raw
    if len(material) < KEY_FILE_MIN_BYTES:
        raise KeystoreError(
            f"key file {str(path)!r} holds {len(material)} bytes of key material, "
            f"at least {KEY_FILE_MIN_BYTES} are needed (raw, or {2 * KEY_FILE_MIN_BYTES} hex "
            "digits); create one with veilface.crypto.keystore.generate_key_file"
        )
    return material


def generate_key_file(path: Path) -> Path:
    """Write 32 random bytes as hex to a new file with mode 0600.

    Parameters
    ----------
    path
        Where to create the key file; it must not exist.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    KeystoreError
        The file already exists (it is never overwritten) or cannot be created.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeystoreError(
            f"key file {str(path)!r} already exists; refusing to overwrite it "
            "(remove it yourself only if nothing is sealed under it)"
        ) from exc
    except OSError as exc:
        raise KeystoreError(
            f"cannot create key file {str(path)!r} ({exc.strerror or type(exc).__name__})"
        ) from exc
    try:
        os.fchmod(fd, 0o600)  # the umask may have narrowed the mode; make it exact
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(_KEY_LEN) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    logger.info("created key file %s", path)
    return path


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeystoreError(f"sealed blob field {what!r} is missing or not a string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise KeystoreError(f"sealed blob field {what!r} is not valid base64") from exc


def _scrypt_key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    try:
        kdf = Scrypt(salt=salt, length=_KEY_LEN, n=n, r=r, p=p)
        return kdf.derive(passphrase.encode("utf-8"))
    except (ValueError, MemoryError) as exc:
        raise KeystoreError(f"scrypt refused its parameters (n={n}, r={r}, p={p})") from exc


def _hkdf_key(material: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_LEN, salt=salt, info=_HKDF_INFO).derive(
        material
    )


def seal_blob(
    payload: bytes,
    *,
    aad: bytes,
    passphrase: str | None = None,
    key_file: Path | None = None,
    scrypt_n: int = SCRYPT_N,
) -> dict[str, Any]:
    """Encrypt ``payload`` under a passphrase or a key file.

    Parameters
    ----------
    payload
        The secret bytes.
    aad
        Associated data, authenticated but not stored: pass the same bytes
        to :func:`open_blob`.
    passphrase, key_file
        Exactly one of them. A passphrase goes through scrypt; a key file
        (at least 32 bytes, raw or hex) through HKDF-SHA256.
    scrypt_n
        scrypt cost parameter, a power of two (default 2^15). Lower it only
        in tests.

    Returns
    -------
    dict
        The JSON-serializable sealed blob (see the module docstring).

    Raises
    ------
    InvalidArgument
        Neither or both of ``passphrase`` and ``key_file``; a bad ``scrypt_n``.
    KeystoreError
        The key file is unreadable or too short; the passphrase is empty.
    """
    _check_one_secret(passphrase, key_file)
    salt = secrets.token_bytes(_SALT_LEN)
    kdf: dict[str, Any]
    if passphrase is not None:
        if scrypt_n < 2 or scrypt_n & (scrypt_n - 1) or scrypt_n > _MAX_SCRYPT_N:
            raise InvalidArgument(
                f"scrypt_n must be a power of two between 2 and 2^20, got {scrypt_n}"
            )
        key = _scrypt_key(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
        kdf = {"name": KDF_SCRYPT, "salt": _b64e(salt), "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P}
    else:
        key = _hkdf_key(read_key_file(cast(Path, key_file)), salt)
        kdf = {"name": KDF_HKDF, "salt": _b64e(salt)}
    nonce = secrets.token_bytes(_NONCE_LEN)
    ciphertext = AESGCM(key).encrypt(nonce, payload, aad)
    return {"kdf": kdf, "aead": AEAD_NAME, "nonce": _b64e(nonce), "ciphertext": _b64e(ciphertext)}


def _int_param(kdf: dict[str, Any], name: str, upper: int) -> int:
    value = kdf.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= upper:
        raise KeystoreError(
            f"sealed blob has an invalid scrypt parameter {name!r} (must be an integer "
            f"from 1 to {upper}); the file is corrupt or was not written by veilface"
        )
    return value


def open_blob(
    sealed: dict[str, Any],
    *,
    aad: bytes,
    passphrase: str | None = None,
    key_file: Path | None = None,
) -> bytes:
    """Decrypt a blob made by :func:`seal_blob`.

    Parameters
    ----------
    sealed
        The sealed blob dict.
    aad
        The associated data given to :func:`seal_blob`.
    passphrase, key_file
        Exactly one of them; it must be of the kind the blob was sealed with.

    Returns
    -------
    bytes
        The payload.

    Raises
    ------
    InvalidArgument
        Neither or both of ``passphrase`` and ``key_file``.
    KeystoreError
        Missing or malformed fields, an unknown KDF or AEAD, the wrong kind of
        secret, or authentication failure (wrong passphrase or key file,
        modified ciphertext or associated data).
    """
    _check_one_secret(passphrase, key_file)
    if not isinstance(sealed, dict):
        raise KeystoreError("sealed blob is not a JSON object; the file is corrupt")
    aead = sealed.get("aead")
    if aead != AEAD_NAME:
        raise KeystoreError(
            f"sealed blob uses an unsupported cipher {str(aead)[:40]!r}; this version reads "
            f"{AEAD_NAME!r} only (upgrade veilface?)"
        )
    kdf = sealed.get("kdf")
    if not isinstance(kdf, dict):
        raise KeystoreError("sealed blob has no 'kdf' object; the file is corrupt")
    salt = _b64d(kdf.get("salt"), "kdf.salt")
    nonce = _b64d(sealed.get("nonce"), "nonce")
    ciphertext = _b64d(sealed.get("ciphertext"), "ciphertext")
    if len(nonce) != _NONCE_LEN:
        raise KeystoreError(f"sealed blob nonce has {len(nonce)} bytes, expected {_NONCE_LEN}")
    name = kdf.get("name")
    if name == KDF_SCRYPT:
        if passphrase is None:
            raise KeystoreError("these secrets were sealed with a passphrase; give the passphrase")
        n = _int_param(kdf, "n", _MAX_SCRYPT_N)
        r = _int_param(kdf, "r", _MAX_SCRYPT_R)
        p = _int_param(kdf, "p", _MAX_SCRYPT_P)
        if n < 2 or n & (n - 1):
            raise KeystoreError("sealed blob scrypt 'n' is not a power of two; the file is corrupt")
        if 128 * n * r > _MAX_SCRYPT_MEMORY:
            raise KeystoreError(
                f"sealed blob asks scrypt for {128 * n * r >> 20} MiB (n={n}, r={r}), more than "
                f"the {_MAX_SCRYPT_MEMORY >> 20} MiB this version allows; the file is corrupt"
            )
        key = _scrypt_key(passphrase, salt, n, r, p)
    elif name == KDF_HKDF:
        if key_file is None:
            raise KeystoreError("these secrets were sealed with a key file; give the key file")
        key = _hkdf_key(read_key_file(key_file), salt)
    else:
        raise KeystoreError(
            f"sealed blob uses an unsupported key derivation {str(name)[:40]!r}; "
            f"this version reads {KDF_SCRYPT!r} and {KDF_HKDF!r} (upgrade veilface?)"
        )
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag as exc:
        raise KeystoreError(
            "cannot open the sealed secrets: wrong passphrase or key file, or the file was modified"
        ) from exc


__all__ = [
    "KEY_FILE_MIN_BYTES",
    "SCRYPT_N",
    "generate_key_file",
    "open_blob",
    "read_key_file",
    "seal_blob",
]
