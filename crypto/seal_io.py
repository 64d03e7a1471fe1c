"""Bytes <-> SEAL objects, through an anonymous in-memory file.

TenSEAL's ``sealapi`` exposes SEAL's ``save``/``load`` only through file
paths. Every object (ciphertexts, and the tenant's secret key) is therefore
written to, or read from, a *memfd*: an anonymous file in RAM made by
``memfd_create(MFD_CLOEXEC)``, that SEAL opens by its ``/proc/self/fd/<fd>``
path. It is linked in no directory, so no other process can open it by name
(``/proc/<pid>/fd`` is readable only by the same user with ptrace rights,
who could read this process's memory anyway), nothing is left behind by a
crash, and it is never swapped to a disk file system. Python reads and
writes it with ``pread``/``pwrite`` and truncates it to zero after every use,
so the bytes of one object do not outlive the call.

Each thread has its own memfd (SEAL's calls run concurrently in gRPC's
threads); a process forked from this one (the encryption pool) makes its
own instead of sharing its parent's. Where ``memfd_create`` is absent
(non-Linux) the module falls back, with one warning, to files in a private
0700 directory (on ``/dev/shm`` when present), unlinked after each use.

SEAL's ``load`` validates what it reads: the header, the compressed sizes,
that the parameters id belongs to the context and that every coefficient is
reduced modulo its prime (``is_valid_for``); errors become
:class:`InvalidCiphertext`.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
import weakref
from typing import Protocol, TypeVar

import tenseal.sealapi as seal

from veilface.errors import InvalidCiphertext

logger = logging.getLogger(__name__)

# pread/pwrite move at most this much per call on Linux (0x7ffff000 bytes).
_IO_CHUNK = 1 << 30


class _Saveable(Protocol):
    def save(self, path: str) -> None: ...


# -- the anonymous in-memory file -----------------------------------------------------------------

# Bumped in a forked child: a memfd made before the fork is shared with the parent.
_generation = 0


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _MemFile:
    """One thread's memfd, with the path SEAL opens it by."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("veilface-seal", os.MFD_CLOEXEC)
        self.path = f"/proc/self/fd/{self.fd}"
        self.generation = _generation
        self._close = weakref.finalize(self, os.close, self.fd)  # when the thread ends

    def discard(self) -> None:
        self._close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        os.ftruncate(self.fd, 0)
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done : done + _IO_CHUNK], done)

    def read(self) -> bytes:
        size = os.fstat(self.fd).st_size
        first = os.pread(self.fd, min(size, _IO_CHUNK), 0)
        if len(first) == size:
            return first
        parts = [first]
        done = len(first)
        while done < size:
            part = os.pread(self.fd, min(size - done, _IO_CHUNK), done)
            if not part:
                raise OSError(f"the in-memory file shrank while it was read ({done} of {size})")
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def clear(self) -> None:
        os.ftruncate(self.fd, 0)


_local = threading.local()
_probe_lock = threading.Lock()
_memfd_ok: bool | None = None
_fallback_warned = False


def _memfd_available() -> bool:
    """Whether memfd_create works here and its /proc/self/fd path can be opened (checked once)."""
    global _memfd_ok
    if _memfd_ok is not None:
        return _memfd_ok
    with _probe_lock:
        if _memfd_ok is None:
            try:
                probe = _MemFile()
            except (AttributeError, OSError):  # no os.memfd_create, or ENOSYS / seccomp
                _memfd_ok = False
            else:
                try:
                    os.close(os.open(probe.path, os.O_RDONLY))
                    _memfd_ok = True
                except OSError:  # /proc not mounted
                    _memfd_ok = False
                finally:
                    probe.discard()
        return _memfd_ok


def _memfile() -> _MemFile | None:
    """This thread's memfd, or None where only the fallback works."""
    if not _memfd_available():
        _warn_fallback()
        return None
    mem: _MemFile | None = getattr(_local, "mem", None)
    if mem is not None and mem.generation == _generation:
        return mem
    if mem is not None:  # inherited across a fork: the parent still uses it
        mem.discard()
    mem = _MemFile()
    _local.mem = mem
    return mem


# -- fallback: a private directory, where memfd_create is absent -----------------------------------

_dir_lock = threading.Lock()
_dir: str | None = None
_dir_pid: int | None = None
_counter = itertools.count()


def _warn_fallback() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning(
            "memfd_create is unavailable here: SEAL objects (the secret key included) go "
            "through files in a private 0700 directory, unlinked after each use"
        )


def _shm_base() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _scratch_dir() -> str:
    global _dir, _dir_pid
    with _dir_lock:
        if _dir is None or _dir_pid != os.getpid():
            _dir = tempfile.mkdtemp(prefix="veilface-seal-", dir=_shm_base())
            os.chmod(_dir, 0o700)
            _dir_pid = os.getpid()
        return _dir


def _fallback_path() -> str:
    return os.path.join(_scratch_dir(), f"{threading.get_ident()}-{next(_counter)}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- public API ------------------------------------------------------------------------------------


def to_bytes(obj: _Saveable) -> bytes:
    """Serialize a SEAL object (ciphertext, keys, parameters, Serializable)."""
    mem = _memfile()
    if mem is not None:
        try:
            obj.save(mem.path)
            return mem.read()
        finally:
            mem.clear()
    path = _fallback_path()
    try:
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        _unlink(path)


T = TypeVar("T")


def _seal_load(target: T, path: str, context: seal.SEALContext | None, what: str) -> T:
    try:
        if context is None:
            target.load(path)  # type: ignore[attr-defined]
        else:
            target.load(context, path)  # type: ignore[attr-defined]
    except Exception as exc:  # SEAL raises std exceptions mapped to several types
        raise InvalidCiphertext(f"{what} is malformed or not valid for this context") from exc
    return target


def _load_into(target: T, data: bytes, context: seal.SEALContext | None, what: str) -> T:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidCiphertext(f"{what} must be bytes")
    if len(data) < 16:
        raise InvalidCiphertext(f"{what} is truncated ({len(data)} bytes)")
    mem = _memfile()
    if mem is not None:
        try:
            mem.write(data)
            return _seal_load(target, mem.path, context, what)
        finally:
            mem.clear()
    path = _fallback_path()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return _seal_load(target, path, context, what)
    finally:
        _unlink(path)


def load_ciphertext(context: seal.SEALContext, data: bytes, what: str = "ciphertext") -> seal.Ciphertext:
    return _load_into(seal.Ciphertext(context), data, context, what)


def load_parameters(data: bytes) -> seal.EncryptionParameters:
    return _load_into(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS), data, None, "parameters")


def load_relin_keys(context: seal.SEALContext, data: bytes) -> seal.RelinKeys:
    return _load_into(seal.RelinKeys(), data, context, "relinearization keys")


def load_galois_keys(context: seal.SEALContext, data: bytes) -> seal.GaloisKeys:
    return _load_into(seal.GaloisKeys(), data, context, "Galois keys")


def load_public_key(context: seal.SEALContext, data: bytes) -> seal.PublicKey:
    return _load_into(seal.PublicKey(), data, context, "public key")


def load_secret_key(context: seal.SEALContext, data: bytes) -> seal.SecretKey:
    return _load_into(seal.SecretKey(), data, context, "secret key")
