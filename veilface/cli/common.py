"""Options shared by the tenant-side commands: server, token, tenant state file."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from veilface.errors import InvalidArgument, PresentationAttackDetected, VeilfaceError

#: Exit status of a command whose photo the liveness gate refused as a presentation
#: attack; every other veilface error exits with :data:`EXIT_ERROR`.
EXIT_ATTACK = 3
EXIT_ERROR = 2

#: Where the state passphrase is looked for when ``--passphrase-env`` is not given.
DEFAULT_PASSPHRASE_ENV = "VEILFACE_PASSPHRASE"
# Where secret_args keeps what it resolved, so a command that loads then saves
# asks once (the environment variable is gone after the first read).
_SECRET_CACHE = "_veilface_unlock"


def add_state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=Path, default=Path("tenant.vfk"), help="tenant state file")
    p.add_argument(
        "--passphrase-env",
        default=None,
        metavar="NAME",
        help=f"environment variable holding the state passphrase (default {DEFAULT_PASSPHRASE_ENV}); "
        "it is removed from the environment once read, so child processes do not inherit it",
    )
    p.add_argument(
        "--passphrase-file",
        type=Path,
        help="file holding the state passphrase (mode 0600; one trailing newline ignored)",
    )
    p.add_argument("--key-file", type=Path, help="key file instead of a passphrase (mode 0600)")


def add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default="127.0.0.1:50051",
        help="host:port of the service, or several (a,b: round-robin over front-ends sharing a store)",
    )
    p.add_argument("--token-env", default="VEILFACE_TOKEN", help="variable holding the API token")
    p.add_argument("--token-file", type=Path, help="file holding the API token")
    p.add_argument(
        "--root-cert",
        type=Path,
        help="PEM root certificate to verify the server (TLS); without it a non-loopback "
        "server is verified against the system roots",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext to a non-loopback server without --root-cert (tokens in clear)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def take_env_passphrase(name: str = DEFAULT_PASSPHRASE_ENV) -> str | None:
    """Read a passphrase from the environment and delete it there.

    ``os.environ.pop`` also unsets the variable in the C environment, so no
    process started afterwards (encryption workers, a server launched by the
    command, anything ``subprocess`` runs) inherits it.
    """
    return os.environ.pop(name, None) or None


def _interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _prompt(state: Path | None, confirm: bool) -> str:
    where = f" for {state}" if state is not None else ""
    first = getpass.getpass(f"passphrase{where}: ")
    if confirm and getpass.getpass("repeat it: ") != first:
        raise InvalidArgument("the passphrases do not match; nothing was written")
    return first


def secret_args(args: argparse.Namespace, *, confirm: bool | None = None) -> dict[str, Any]:
    """The ``passphrase=`` or ``key_file=`` keyword for ``TenantState.load``/``save``.

    In order: ``--key-file``; ``--passphrase-file``; the variable named by
    ``--passphrase-env`` (default ``VEILFACE_PASSPHRASE``); a prompt when
    stdin is a terminal. The variable is deleted from the environment in
    every case, so child processes never inherit it. The answer is kept on
    ``args``: a command that loads and then saves resolves it once.

    Parameters
    ----------
    args
        Parsed options of :func:`add_state_options`.
    confirm
        Ask for a prompted passphrase twice. Default: when ``--state`` does
        not exist yet (the passphrase is being chosen).

    Raises
    ------
    InvalidArgument
        Conflicting options, no source of the passphrase, or prompted
        passphrases that differ.
    KeystoreError
        The passphrase file is unreadable, empty or accessible to others.
    """
    from veilface.client.unlock import resolve_secret

    cached = getattr(args, _SECRET_CACHE, None)
    if cached is not None:
        return dict(cached)
    env_name = args.passphrase_env or DEFAULT_PASSPHRASE_ENV
    passphrase_file = getattr(args, "passphrase_file", None)
    from_env = take_env_passphrase(env_name)
    if passphrase_file is not None and (args.key_file is not None or args.passphrase_env):
        raise InvalidArgument(
            "--passphrase-file cannot be combined with --key-file or --passphrase-env; give one"
        )
    secret: dict[str, Any]
    if args.key_file is not None or passphrase_file is not None:
        passphrase, key_file = resolve_secret(
            None, args.key_file, passphrase_file=passphrase_file
        )
        secret = {"key_file": key_file} if key_file is not None else {"passphrase": passphrase}
    elif from_env:
        secret = {"passphrase": from_env}
    elif _interactive():
        state = getattr(args, "state", None)
        if confirm is None:
            confirm = state is not None and not Path(state).exists()
        secret = {"passphrase": _prompt(state, confirm)}
    else:
        raise InvalidArgument(
            f"set the state passphrase in ${env_name}, pass --passphrase-file or --key-file, "
            "or run in a terminal to be prompted"
        )
    setattr(args, _SECRET_CACHE, secret)
    return dict(secret)


def token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        return str(args.token_file.read_text().strip())
    value = os.environ.get(args.token_env)
    if not value:
        raise InvalidArgument(f"set the API token in ${args.token_env} or pass --token-file")
    return value


def load_state(args: argparse.Namespace) -> Any:
    from veilface.client.tenant_state import TenantState

    return TenantState.load(args.state, **secret_args(args))


def client(args: argparse.Namespace, **options: Any) -> Any:
    """The ``VeilClient`` the options name; ``options`` go to it (``liveness=``...)."""
    from veilface.client.sdk import VeilClient

    return VeilClient(
        args.server,
        load_state(args),
        token=token(args),
        root_cert=args.root_cert,
        insecure=getattr(args, "insecure", False),
        **options,
    )


def error_exit(exc: VeilfaceError) -> tuple[int, str]:
    """The exit status and the line printed for an error that ended a command."""
    if isinstance(exc, PresentationAttackDetected):
        return EXIT_ATTACK, (
            f"veilface: refused: {exc.message} (liveness score {exc.score:.3f}, below the "
            f"threshold {exc.threshold:.3f} of model {exc.model_fingerprint[:12]})"
        )
    return EXIT_ERROR, f"veilface: error: {exc.message}"


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text)


def load_embeddings(path: Path) -> tuple[Any, list[str]]:
    """``emb`` float32 [n, d] and ``labels`` [n] of an npz from ``veilface embed`` (a clear error otherwise)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            emb = np.asarray(data["emb"], dtype=np.float32)
            labels = [str(x) for x in data["labels"]]
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidArgument(f"{path}: expected an npz with arrays 'emb' and 'labels' ({exc})") from None
    if emb.ndim != 2 or len(labels) != len(emb):
        raise InvalidArgument(f"{path}: 'emb' must be [n, d] with one label per row")
    return emb, labels
