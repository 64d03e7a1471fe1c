"""Secret material encrypted at rest (AES-256-GCM under a derived key).

A *sealed blob* is a JSON-serializable dict::

    {"kdf": {"name": "argon2id", "salt": <b64>, "memory_kib": 65536,
             "iterations": 3, "lanes": 4, "version": 19}
            | {"name": "scrypt", "salt": <b64>, "n": 131072, "r": 8, "p": 1}
            | {"name": "hkdf-sha256", "salt": <b64>},
     "aead": "aes-256-gcm",
     "nonce": <b64, 12 bytes>,
     "ciphertext": <b64, payload + 16-byte tag>}

The key is derived either from a passphrase (Argon2id by default, RFC 9106's
second recommended setting: 64 MiB, 3 passes, 4 lanes, about 0.1 s; scrypt
at N = 2^17 where the installed ``cryptography`` or its OpenSSL lacks
Argon2id) or from a key file of at least 32 random bytes (HKDF-SHA256, for a
machine; make one with :func:`generate_key_file`). Every KDF records its
parameters in the blob, so older blobs (scrypt at N = 2^15) still open, and
opening refuses parameters beyond fixed bounds (1 GiB of memory, a bounded
amount of work) so a forged file cannot make the reader allocate gigabytes.

Every blob has a fresh salt and a fresh 12-byte nonce. The caller's ``aad``
(for a tenant file: its clear header) is authenticated but not stored, so a
blob opened under a different header fails exactly like a wrong passphrase.
The KDF parameters are not authenticated separately: changing them changes
the derived key, which the GCM tag then rejects.

Files holding secrets (key files, passphrase files, tenant files) are read
with :func:`~veilface.crypto.secret_files.read_private_file` (re-exported
here), which refuses a regular file that its group or others may read or
write: the fix is ``chmod 600``.

Errors are :class:`~veilface.errors.KeystoreError` and never contain the
passphrase, the key file's contents, or the payload.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from veilface.crypto.secret_files import (
    KEY_FILE_MIN_BYTES,
    generate_key_file,
    read_key_file,
    read_passphrase_file,
    read_private_file,
)
from veilface.errors import InvalidArgument, KeystoreError

logger = logging.getLogger(__name__)

AEAD_NAME = "aes-256-gcm"
KDF_ARGON2ID = "argon2id"
KDF_SCRYPT = "scrypt"
KDF_HKDF = "hkdf-sha256"

#: Default Argon2id cost: RFC 9106 section 4, second recommended option
#: (m = 64 MiB, t = 3, p = 4), above OWASP's floor; about 0.1-0.15 s here.
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4
#: Argon2 version 1.3, the only one ``cryptography`` implements.
ARGON2_VERSION = 0x13
#: scrypt cost where Argon2id is unavailable (N = 2^17, r = 8, p = 1: 128 MiB, ~0.3 s).
#: Blobs sealed before Argon2id used N = 2^15 and still open.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1

# Upper bounds accepted when sealing and when *opening* a blob, so a forged
# file cannot make the reader allocate gigabytes or spin for minutes.
_MAX_ARGON2_MEMORY_KIB = 2**20  # 1 GiB
_MAX_ARGON2_ITERATIONS = 64
_MAX_ARGON2_LANES = 16
_MAX_ARGON2_WORK_KIB = 2**21  # memory x passes: 2 GiB of passes, ~10x the default
_MAX_SCRYPT_N = 2**20
_MAX_SCRYPT_R = 32
_MAX_SCRYPT_P = 16
_MAX_SCRYPT_MEMORY = 2**30  # bytes (128 * n * r)
_MAX_SCRYPT_WORK = 2**31  # bytes of passes (128 * n * r * p)

_KEY_LEN = 32
_SALT_LEN = 16
_NONCE_LEN = 12
_HKDF_INFO = b"veilface-keystore/1"


@dataclass(frozen=True)
class Argon2idParams:
    """Argon2id cost of a passphrase-sealed blob.

    Attributes
    ----------
    memory_kib
        Memory in KiB (at least 8 per lane, at most 1 GiB).
    iterations
        Passes over the memory (1 to 64).
    lanes
        Degree of parallelism (1 to 16).
    """

    memory_kib: int = ARGON2_MEMORY_KIB
    iterations: int = ARGON2_ITERATIONS
    lanes: int = ARGON2_LANES


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost of a passphrase-sealed blob (``n`` a power of two)."""

    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P


#: The cost of a passphrase KDF: Argon2id or scrypt.
PassphraseKdf = Argon2idParams | ScryptParams


@functools.cache
def _argon2id_probe() -> bool:
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError:  # cryptography < 44
        return False
    try:
        Argon2id(salt=bytes(16), length=32, iterations=1, lanes=1, memory_cost=8).derive(b"x")
    except UnsupportedAlgorithm:  # built against an OpenSSL without Argon2 (< 3.2)
        return False
    return True


def argon2id_supported() -> bool:
    """Whether the installed ``cryptography`` (and its OpenSSL) can derive Argon2id keys."""
    return _argon2id_probe()


def default_passphrase_kdf() -> PassphraseKdf:
    """Argon2id at the default cost, or scrypt at N = 2^17 where Argon2id is unavailable."""
    if argon2id_supported():
        return Argon2idParams()
    return ScryptParams()


def _check_one_secret(passphrase: str | None, key_file: Path | None) -> None:
    if (passphrase is None) == (key_file is None):
        raise InvalidArgument(
            "give exactly one of a passphrase or a key file to seal or open tenant secrets"
        )
    if passphrase is not None and not passphrase:
        raise KeystoreError("the passphrase is empty; use a non-empty passphrase or a key file")


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeystoreError(f"sealed blob field {what!r} is missing or not a string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise KeystoreError(f"sealed blob field {what!r} is not valid base64") from exc


def _scrypt_key(passphrase: str, salt: bytes, params: ScryptParams) -> bytes:
    try:
        kdf = Scrypt(salt=salt, length=_KEY_LEN, n=params.n, r=params.r, p=params.p)
        return kdf.derive(passphrase.encode("utf-8"))
    except (ValueError, MemoryError) as exc:
        raise KeystoreError(
            f"scrypt refused its parameters (n={params.n}, r={params.r}, p={params.p})"
        ) from exc


def _argon2id_key(passphrase: str, salt: bytes, params: Argon2idParams) -> bytes:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    try:
        kdf = Argon2id(
            salt=salt,
            length=_KEY_LEN,
            iterations=params.iterations,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
        )
        return kdf.derive(passphrase.encode("utf-8"))
    except (ValueError, MemoryError, UnsupportedAlgorithm) as exc:
        raise KeystoreError(
            f"argon2id refused its parameters (memory {params.memory_kib} KiB, "
            f"{params.iterations} iterations, {params.lanes} lanes)"
        ) from exc


def _hkdf_key(material: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_LEN, salt=salt, info=_HKDF_INFO).derive(
        material
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _argon2id_problem(params: Argon2idParams) -> str | None:
    """Why these Argon2id parameters are out of bounds, or None when they are fine."""
    m, t, lanes = params.memory_kib, params.iterations, params.lanes
    if not all(_is_int(v) for v in (m, t, lanes)):
        return "must be integers"
    if not 1 <= lanes <= _MAX_ARGON2_LANES:
        return f"need 1 to {_MAX_ARGON2_LANES} lanes, not {lanes}"
    if not 1 <= t <= _MAX_ARGON2_ITERATIONS:
        return f"need 1 to {_MAX_ARGON2_ITERATIONS} iterations, not {t}"
    if not 8 * lanes <= m <= _MAX_ARGON2_MEMORY_KIB:
        return (
            f"need 8 KiB per lane to {_MAX_ARGON2_MEMORY_KIB >> 10} MiB of memory, "
            f"not {m} KiB for {lanes} lanes"
        )
    if m * t > _MAX_ARGON2_WORK_KIB:
        return (
            f"ask for {m * t >> 10} MiB of passes (memory x iterations), more than the "
            f"{_MAX_ARGON2_WORK_KIB >> 10} MiB this version allows"
        )
    return None


def _scrypt_problem(params: ScryptParams) -> str | None:
    """Why these scrypt parameters are out of bounds, or None when they are fine."""
    n, r, p = params.n, params.r, params.p
    if not all(_is_int(v) for v in (n, r, p)):
        return "must be integers"
    if not 2 <= n <= _MAX_SCRYPT_N or n & (n - 1):
        return f"need n a power of two from 2 to 2^20, not {n}"
    if not 1 <= r <= _MAX_SCRYPT_R or not 1 <= p <= _MAX_SCRYPT_P:
        return f"need r from 1 to {_MAX_SCRYPT_R} and p from 1 to {_MAX_SCRYPT_P}"
    if 128 * n * r > _MAX_SCRYPT_MEMORY:
        return (
            f"ask for {128 * n * r >> 20} MiB of memory (n={n}, r={r}), more than the "
            f"{_MAX_SCRYPT_MEMORY >> 20} MiB this version allows"
        )
    if 128 * n * r * p > _MAX_SCRYPT_WORK:
        return (
            f"ask for {128 * n * r * p >> 20} MiB of passes (n={n}, r={r}, p={p}), more than "
            f"the {_MAX_SCRYPT_WORK >> 20} MiB this version allows"
        )
    return None


def _below_default(params: PassphraseKdf) -> bool:
    if isinstance(params, Argon2idParams):
        return params.memory_kib < ARGON2_MEMORY_KIB or params.iterations < ARGON2_ITERATIONS
    return params.n < SCRYPT_N or params.r < SCRYPT_R


def _passphrase_kdf(kdf: PassphraseKdf | None, scrypt_n: int | None) -> PassphraseKdf:
    if kdf is not None and scrypt_n is not None:
        raise InvalidArgument("give the passphrase KDF as kdf= or scrypt_n=, not both")
    if kdf is None:
        return default_passphrase_kdf() if scrypt_n is None else ScryptParams(n=scrypt_n)
    if not isinstance(kdf, (Argon2idParams, ScryptParams)):
        raise InvalidArgument("kdf must be Argon2idParams or ScryptParams")
    return kdf


def seal_blob(
    payload: bytes,
    *,
    aad: bytes,
    passphrase: str | None = None,
    key_file: Path | None = None,
    kdf: PassphraseKdf | None = None,
    scrypt_n: int | None = None,
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
        Exactly one of them. A passphrase goes through Argon2id (or scrypt);
        a key file (at least 32 bytes, raw or hex, mode 0600) through
        HKDF-SHA256.
    kdf
        Cost of the passphrase KDF; default :func:`default_passphrase_kdf`.
        A cost below the default is logged as a warning: lower it only in
        tests.
    scrypt_n
        Older knob, kept for callers that used it: scrypt with this ``n``
        (``r = 8``, ``p = 1``). Give ``kdf`` or ``scrypt_n``, not both.

    Returns
    -------
    dict
        The JSON-serializable sealed blob (see the module docstring).

    Raises
    ------
    InvalidArgument
        Neither or both of ``passphrase`` and ``key_file``; KDF parameters
        out of the bounds :func:`open_blob` accepts; Argon2id asked for where
        it is unavailable.
    KeystoreError
        The key file is unreadable, too short or accessible to others; the
        passphrase is empty.
    """
    _check_one_secret(passphrase, key_file)
    salt = secrets.token_bytes(_SALT_LEN)
    header: dict[str, Any]
    if passphrase is not None:
        params = _passphrase_kdf(kdf, scrypt_n)
        if _below_default(params):
            logger.warning("sealing with a passphrase KDF cost below the default: %s", params)
        if isinstance(params, Argon2idParams):
            problem = _argon2id_problem(params)
            if problem:
                raise InvalidArgument(f"Argon2id parameters {problem}")
            if not argon2id_supported():
                raise InvalidArgument(
                    "Argon2id is not available (cryptography >= 44 built with OpenSSL >= 3.2 "
                    "is needed); upgrade cryptography or seal with ScryptParams"
                )
            key = _argon2id_key(passphrase, salt, params)
            header = {
                "name": KDF_ARGON2ID,
                "salt": _b64e(salt),
                "memory_kib": params.memory_kib,
                "iterations": params.iterations,
                "lanes": params.lanes,
                "version": ARGON2_VERSION,
            }
        else:
            problem = _scrypt_problem(params)
            if problem:
                raise InvalidArgument(f"scrypt parameters {problem}")
            key = _scrypt_key(passphrase, salt, params)
            header = {
                "name": KDF_SCRYPT,
                "salt": _b64e(salt),
                "n": params.n,
                "r": params.r,
                "p": params.p,
            }
    else:
        key = _hkdf_key(read_key_file(cast(Path, key_file)), salt)
        header = {"name": KDF_HKDF, "salt": _b64e(salt)}
    nonce = secrets.token_bytes(_NONCE_LEN)
    ciphertext = AESGCM(key).encrypt(nonce, payload, aad)
    return {
        "kdf": header,
        "aead": AEAD_NAME,
        "nonce": _b64e(nonce),
        "ciphertext": _b64e(ciphertext),
    }


def _int_param(kdf: dict[str, Any], name: str, upper: int, kdf_name: str) -> int:
    value = kdf.get(name)
    if not _is_int(value) or not 1 <= cast(int, value) <= upper:
        raise KeystoreError(
            f"sealed blob has an invalid {kdf_name} parameter {name!r} (must be an integer "
            f"from 1 to {upper}); the file is corrupt or was not written by veilface"
        )
    return cast(int, value)


def _opening_argon2id_params(kdf: dict[str, Any]) -> Argon2idParams:
    if kdf.get("version") != ARGON2_VERSION:
        raise KeystoreError(
            f"sealed blob asks for argon2id version {str(kdf.get('version'))[:10]!r}; "
            f"this version reads {ARGON2_VERSION} (1.3) only; the file is corrupt"
        )
    params = Argon2idParams(
        memory_kib=_int_param(kdf, "memory_kib", _MAX_ARGON2_MEMORY_KIB, KDF_ARGON2ID),
        iterations=_int_param(kdf, "iterations", _MAX_ARGON2_ITERATIONS, KDF_ARGON2ID),
        lanes=_int_param(kdf, "lanes", _MAX_ARGON2_LANES, KDF_ARGON2ID),
    )
    problem = _argon2id_problem(params)
    if problem:
        raise KeystoreError(f"sealed blob's argon2id parameters {problem}; the file is corrupt")
    if not argon2id_supported():
        raise KeystoreError(
            "these secrets were sealed with Argon2id, which the installed cryptography "
            "cannot derive (cryptography >= 44 built with OpenSSL >= 3.2 is needed); upgrade it"
        )
    return params


def _opening_scrypt_params(kdf: dict[str, Any]) -> ScryptParams:
    params = ScryptParams(
        n=_int_param(kdf, "n", _MAX_SCRYPT_N, KDF_SCRYPT),
        r=_int_param(kdf, "r", _MAX_SCRYPT_R, KDF_SCRYPT),
        p=_int_param(kdf, "p", _MAX_SCRYPT_P, KDF_SCRYPT),
    )
    problem = _scrypt_problem(params)
    if problem:
        raise KeystoreError(f"sealed blob's scrypt parameters {problem}; the file is corrupt")
    return params


def open_blob(
    sealed: dict[str, Any],
    *,
    aad: bytes,
    passphrase: str | None = None,
    key_file: Path | None = None,
) -> bytes:
    """Decrypt a blob made by :func:`seal_blob` (by this version or an older one).

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
        Missing or malformed fields, an unknown KDF or AEAD, KDF parameters
        beyond the bounds (checked before any derivation), the wrong kind of
        secret, a key file accessible to others, or authentication failure
        (wrong passphrase or key file, modified ciphertext or associated data).
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
    if name in (KDF_ARGON2ID, KDF_SCRYPT):
        if passphrase is None:
            raise KeystoreError("these secrets were sealed with a passphrase; give the passphrase")
        if name == KDF_ARGON2ID:
            key = _argon2id_key(passphrase, salt, _opening_argon2id_params(kdf))
        else:
            key = _scrypt_key(passphrase, salt, _opening_scrypt_params(kdf))
    elif name == KDF_HKDF:
        if key_file is None:
            raise KeystoreError("these secrets were sealed with a key file; give the key file")
        key = _hkdf_key(read_key_file(key_file), salt)
    else:
        raise KeystoreError(
            f"sealed blob uses an unsupported key derivation {str(name)[:40]!r}; this version "
            f"reads {KDF_ARGON2ID!r}, {KDF_SCRYPT!r} and {KDF_HKDF!r} (upgrade veilface?)"
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
    "Argon2idParams",
    "PassphraseKdf",
    "ScryptParams",
    "argon2id_supported",
    "default_passphrase_kdf",
    "generate_key_file",
    "open_blob",
    "read_key_file",
    "read_passphrase_file",
    "read_private_file",
    "seal_blob",
]
