"""Files that hold secrets: key files, passphrase files, tenant files.

Every read goes through :func:`read_private_file`, which refuses a regular
file that its group or others may read or write (the fix is ``chmod 600``)
rather than warning about it: a readable key file is a leaked key, and a
writable one lets another account swap the key the next save seals under.
The mode is checked on the opened descriptor, so the file read is the file
checked. Key files are created 0600 with ``O_EXCL`` (:func:`generate_key_file`).

Errors are :class:`~veilface.errors.KeystoreError` and never contain a
file's contents.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import stat
from pathlib import Path

from veilface.errors import KeystoreError

logger = logging.getLogger(__name__)

KEY_FILE_MIN_BYTES = 32
#: Largest key or passphrase file read (a guard against pointing it at a big file).
SMALL_SECRET_FILE_MAX_BYTES = 64 * 1024
_KEY_LEN = 32


def _mode_text(mode: int) -> str:
    return format(stat.S_IMODE(mode), "04o")


def read_private_file(path: Path, *, what: str, max_bytes: int | None = None) -> bytes:
    """Read a file that holds secrets, refusing it when others may read or change it.

    Parameters
    ----------
    path
        The file. A regular file must grant nothing to its group or to
        others (mode 0600 or 0400); a pipe or character device (``<(...)``,
        ``/dev/stdin``) holds nothing at rest and is read as it is.
    what
        What the file is, for error messages ("key file", "tenant file").
    max_bytes
        Refuse a file larger than this.

    Returns
    -------
    bytes
        The file's contents.

    Raises
    ------
    KeystoreError
        The file cannot be opened or read, is not a regular file, pipe or
        character device, is accessible to group or others (the message names
        the fix, ``chmod 600``), or is larger than ``max_bytes``.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise KeystoreError(
            f"cannot read {what} {str(path)!r} ({exc.strerror or type(exc).__name__})"
        ) from exc
    try:
        mode = os.fstat(fd).st_mode  # of the file opened, not of a path checked earlier
        if stat.S_ISREG(mode):
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise KeystoreError(
                    f"{what} {str(path)!r} is accessible to group or others (mode "
                    f"{_mode_text(mode)}); it holds secrets: restrict it with "
                    f"`chmod 600 {shlex.quote(str(path))}` and try again"
                )
        elif not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise KeystoreError(f"cannot read {what} {str(path)!r} (not a regular file)")
        limit = None if max_bytes is None else max_bytes + 1
        chunks: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            chunk = os.read(fd, 1 << 20 if limit is None else min(1 << 20, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise KeystoreError(
            f"cannot read {what} {str(path)!r} ({exc.strerror or type(exc).__name__})"
        ) from exc
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise KeystoreError(f"{what} {str(path)!r} holds more than {max_bytes} bytes")
    return data


def read_key_file(path: Path) -> bytes:
    """Read the key material of a key file.

    Parameters
    ----------
    path
        A file holding at least 32 bytes: either hex text (surrounding
        whitespace ignored; what :func:`generate_key_file` writes) or raw bytes.
        It must grant nothing to group or others (see :func:`read_private_file`).

    Returns
    -------
    bytes
        The key material (hex-decoded when the file is hex text).

    Raises
    ------
    KeystoreError
        The file cannot be read, is accessible to group or others, or holds
        fewer than 32 bytes of key material.
    """
    path = Path(path)
    try:
        raw = read_private_file(path, what="key file", max_bytes=SMALL_SECRET_FILE_MAX_BYTES)
    except KeystoreError as exc:
        if "cannot read" not in exc.message:
            raise
        raise KeystoreError(
            f"{exc.message}; check the path, or create one with "
            "veilface.crypto.keystore.generate_key_file"
        ) from exc.__cause__
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


def read_passphrase_file(path: Path) -> str:
    """Read a passphrase from a file (the CLI's ``--passphrase-file``).

    The whole file is the passphrase, less one trailing line ending (LF or
    CRLF); other whitespace is kept. The file must grant nothing to
    group or others (see :func:`read_private_file`).

    Raises
    ------
    KeystoreError
        The file cannot be read, is accessible to group or others, is not
        UTF-8 text, or holds an empty passphrase.
    """
    raw = read_private_file(path, what="passphrase file", max_bytes=SMALL_SECRET_FILE_MAX_BYTES)
    for ending in (b"\r\n", b"\n"):
        if raw.endswith(ending):
            raw = raw[: -len(ending)]
            break
    try:
        passphrase = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeystoreError(f"passphrase file {str(path)!r} is not UTF-8 text") from exc
    if not passphrase:
        raise KeystoreError(f"passphrase file {str(path)!r} holds an empty passphrase")
    return passphrase


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


__all__ = [
    "KEY_FILE_MIN_BYTES",
    "SMALL_SECRET_FILE_MAX_BYTES",
    "generate_key_file",
    "read_key_file",
    "read_passphrase_file",
    "read_private_file",
]
