"""Unlocking a tenant state: which passphrase or key file opens it.

:func:`resolve_secret` turns the CLI's ways of naming the secret (an
environment variable holding the passphrase, a passphrase file, a key file)
into the ``(passphrase, key_file)`` pair :meth:`TenantState.load
<veilface.client.tenant_state.TenantState.load>` and ``save`` take. (Also
importable from :mod:`veilface.client.tenant_state`, where it used to live.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

from veilface.crypto.keystore import read_passphrase_file
from veilface.errors import InvalidArgument, KeystoreError


def resolve_secret(
    passphrase_env: str | None,
    key_file: Path | None,
    *,
    passphrase_file: Path | None = None,
    remove_env: bool = False,
) -> tuple[str | None, Path | None]:
    """The ``(passphrase, key_file)`` pair to pass to :meth:`TenantState.load`/``save``.

    Parameters
    ----------
    passphrase_env
        Name of an environment variable holding the passphrase (the CLI's
        ``--passphrase-env``); the passphrase itself never goes on a
        command line.
    key_file
        Path of a key file.
    passphrase_file
        Path of a file holding the passphrase (mode 0600; see
        :func:`veilface.crypto.keystore.read_passphrase_file`).
    remove_env
        Delete the variable from ``os.environ`` once read, so that child
        processes started later do not inherit the passphrase (the CLI does
        this). Off by default for callers that read it more than once.

    Returns
    -------
    tuple
        ``(passphrase, None)`` or ``(None, key_file)``.

    Raises
    ------
    InvalidArgument
        Not exactly one of the three given.
    KeystoreError
        The environment variable is unset or empty; the passphrase file is
        unreadable, empty or accessible to group or others.
    """
    given = sum(x is not None for x in (passphrase_env, key_file, passphrase_file))
    if given != 1:
        raise InvalidArgument(
            "give exactly one way to unlock the tenant secrets: the name of an environment "
            "variable holding the passphrase, a passphrase file, or a key file"
        )
    if key_file is not None:
        return None, Path(key_file)
    if passphrase_file is not None or passphrase_env is None:
        return read_passphrase_file(Path(cast(Path, passphrase_file))), None
    value = os.environ.pop(passphrase_env, None) if remove_env else os.environ.get(passphrase_env)
    if not value:
        raise KeystoreError(
            f"environment variable {passphrase_env!r} is unset or empty; "
            "export the passphrase in it, or use a passphrase file or a key file"
        )
    return value, None


__all__ = ["resolve_secret"]
