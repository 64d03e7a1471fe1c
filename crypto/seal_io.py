"""Bytes <-> SEAL objects.

TenSEAL's ``sealapi`` exposes SEAL's ``save``/``load`` only through file
paths, so this module round-trips through a private directory on a RAM file
system (``/dev/shm`` when present). SEAL's ``load`` validates what it reads:
the header, the compressed sizes, that the parameters id belongs to the
context and that every coefficient is reduced modulo its prime
(``is_valid_for``); errors become :class:`InvalidCiphertext`.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from typing import Protocol, TypeVar

import tenseal.sealapi as seal

from veilface.errors import InvalidCiphertext


class _Saveable(Protocol):
    def save(self, path: str) -> None: ...


_dir_lock = threading.Lock()
_dir: str | None = None
_dir_pid: int | None = None
_counter = itertools.count()


def _scratch_dir() -> str:
    global _dir, _dir_pid
    with _dir_lock:
        if _dir is None or _dir_pid != os.getpid():
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            _dir = tempfile.mkdtemp(prefix="veilface-seal-", dir=base)
            os.chmod(_dir, 0o700)
            _dir_pid = os.getpid()
        return _dir


def _path() -> str:
    return os.path.join(_scratch_dir(), f"{threading.get_ident()}-{next(_counter)}")


def to_bytes(obj: _Saveable) -> bytes:
    """Serialize a SEAL object (ciphertext, keys, parameters, Serializable)."""
    path = _path()
    try:
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


T = TypeVar("T")


def _load_into(target: T, data: bytes, context: seal.SEALContext | None, what: str) -> T:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidCiphertext(f"{what} must be bytes")
    if len(data) < 16:
        raise InvalidCiphertext(f"{what} is truncated ({len(data)} bytes)")
    path = _path()
    try:
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            if context is None:
                target.load(path)  # type: ignore[attr-defined]
            else:
                target.load(context, path)  # type: ignore[attr-defined]
        except Exception as exc:  # SEAL raises std exceptions mapped to several types
            raise InvalidCiphertext(f"{what} is malformed or not valid for this context") from exc
        return target
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def load_ciphertext(context: seal.SEALContext, data: bytes, what: str = "ciphertext") -> seal.Ciphertext:
    return _load_into(seal.Ciphertext(context), data, context, what)


def load_parameters(data: bytes) -> seal.EncryptionParameters:
    return _load_into(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS), data, None, "parameters")


def load_relin_keys(context: seal.SEALContext, data: bytes) -> seal.RelinKeys:
    return _load_into(seal.RelinKeys(), data, context, "relinearization keys")


def load_galois_keys(context: seal.SEALContext, data: bytes) -> seal.GaloisKeys:
    return _load_into(seal.GaloisKeys(), data, context, "Galois keys")


def load_secret_key(context: seal.SEALContext, data: bytes) -> seal.SecretKey:
    return _load_into(seal.SecretKey(), data, context, "secret key")
