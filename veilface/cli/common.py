"""Options shared by the tenant-side commands: server, token, tenant state file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from veilface.errors import InvalidArgument


def add_state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=Path, default=Path("tenant.vfk"), help="tenant state file")
    p.add_argument(
        "--passphrase-env",
        default="VEILFACE_PASSPHRASE",
        help="environment variable holding the state passphrase (default VEILFACE_PASSPHRASE)",
    )
    p.add_argument("--key-file", type=Path, help="key file instead of a passphrase")


def add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of the service")
    p.add_argument("--token-env", default="VEILFACE_TOKEN", help="variable holding the API token")
    p.add_argument("--token-file", type=Path, help="file holding the API token")
    p.add_argument("--root-cert", type=Path, help="PEM root certificate (enables TLS)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def secret_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.key_file is not None:
        return {"key_file": args.key_file}
    value = os.environ.get(args.passphrase_env)
    if not value:
        raise InvalidArgument(
            f"set the state passphrase in ${args.passphrase_env} or pass --key-file"
        )
    return {"passphrase": value}


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


def client(args: argparse.Namespace) -> Any:
    from veilface.client.sdk import VeilClient

    return VeilClient(args.server, load_state(args), token=token(args), root_cert=args.root_cert)


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text)
