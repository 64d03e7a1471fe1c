"""``veilface keys`` and ``veilface tenant``: tenant keys and registration."""

from __future__ import annotations

import argparse
from pathlib import Path

from veilface.cli import common


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="tenant key management").add_subparsers(dest="keys_cmd", required=True)
    p = keys.add_parser("init", help="generate CKKS keys and a tenant state file (encrypted at rest)")
    common.add_state_options(p)
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument("--dim", type=int, default=128, help="template dimension (dlib: 128)")
    p.add_argument("--param-set", default="n4096", help="CKKS parameter set")
    p.add_argument("--key-id", default="k1")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.92,
        help="1:1 cosine threshold of verify (default 0.92: dlib on LFW, FAR ~0.2%%, FRR ~5%%); "
        "identify raises it for the gallery's size to a 1%% FPIR (docs/client.md)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing state file")
    p.set_defaults(func=keys_init)

    p = keys.add_parser(
        "export",
        help="write a narrower copy of a state for a device of a given role (--role kiosk)",
    )
    common.add_state_options(p)  # --state: the full state to read
    p.add_argument("--role", required=True, choices=["kiosk"], help="kiosk: identify and verify only")
    p.add_argument("--out", type=Path, required=True, help="the state file to write")
    p.add_argument(
        "--no-router",
        action="store_true",
        help="leave the routing lists and label key out too (a kiosk that only searches strict)",
    )
    p.add_argument("--out-key-file", type=Path, help="seal the output with this key file")
    p.add_argument(
        "--out-passphrase-env",
        metavar="NAME",
        help="seal the output with the passphrase in this variable (default: same secret as --state)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=keys_export)

    t = sub.add_parser("tenant", help="tenant administration").add_subparsers(dest="tenant_cmd", required=True)
    p = t.add_parser("create", help="create a tenant (operator's admin token); prints its API token")
    common.add_server_options(p)
    p.add_argument("tenant_id")
    p.add_argument("--admin-token-file", type=Path, required=True)
    p.set_defaults(func=tenant_create)

    p = t.add_parser("register", help="register this tenant's public context with the server")
    common.add_state_options(p)
    common.add_server_options(p)
    p.set_defaults(func=tenant_register)

    p = t.add_parser("describe", help="keys, bins and subjects the server holds for this tenant")
    common.add_state_options(p)
    common.add_server_options(p)
    p.set_defaults(func=tenant_describe)


def keys_init(args: argparse.Namespace) -> int:
    from veilface.client.tenant_state import TenantState
    from veilface.errors import AlreadyExists

    if args.state.exists() and not args.force:
        raise AlreadyExists(f"{args.state} exists; pass --force to replace it")
    state = TenantState.new(args.tenant, dim=args.dim, param_set=args.param_set, key_id=args.key_id)
    if args.threshold is not None:
        state.threshold = args.threshold
    state.save(args.state, **common.secret_args(args))
    print(f"wrote {args.state} (tenant {state.tenant_id}, key {state.key_id}, dim {state.dim})")
    return 0


def keys_export(args: argparse.Namespace) -> int:
    from veilface.errors import AlreadyExists, InvalidArgument

    if args.out.exists() and not args.force:
        raise AlreadyExists(f"{args.out} exists; pass --force to replace it")
    if args.out.resolve() == args.state.resolve():
        raise InvalidArgument("--out must not be the --state file it is exported from")
    state = common.load_state(args)
    kiosk = state.export_kiosk(keep_router=not args.no_router)
    if args.out_key_file is not None and args.out_passphrase_env:
        raise InvalidArgument("give one of --out-key-file and --out-passphrase-env")
    if args.out_key_file is not None:
        secret: dict[str, object] = {"key_file": args.out_key_file}
    elif args.out_passphrase_env:
        value = common.take_env_passphrase(args.out_passphrase_env)
        if not value:
            raise InvalidArgument(f"${args.out_passphrase_env} is unset or empty")
        secret = {"passphrase": value}
    else:
        secret = common.secret_args(args)
    kiosk.save(args.out, **secret)
    common.emit(
        args,
        {"out": str(args.out), "role": kiosk.role, "key_id": kiosk.key_id, "router": kiosk.router is not None},
        f"wrote {args.out} (role {kiosk.role}, tenant {kiosk.tenant_id}, key {kiosk.key_id}; "
        f"no photo key{'' if kiosk.router is not None else ', no routing lists'}); "
        "give the kiosk a token with only the query scope (veilface token create --scope query)",
    )
    return 0


def tenant_create(args: argparse.Namespace) -> int:
    from veilface.client.admin import AdminClient

    admin_token = args.admin_token_file.read_text().strip()
    with AdminClient(
        args.server, token=admin_token, root_cert=args.root_cert, insecure=getattr(args, "insecure", False)
    ) as admin:
        issued = admin.create_tenant(args.tenant_id)
    common.emit(
        args,
        {"tenant_id": issued.tenant_id, "api_token": issued.api_token, "token_id": issued.info.token_id},
        f"tenant {issued.tenant_id} created; API token with every scope (shown once):\n{issued.api_token}",
    )
    return 0


def tenant_register(args: argparse.Namespace) -> int:
    with common.client(args) as c:
        info = c.register_key()
    common.emit(
        args,
        {"key_id": info.key_id, "fingerprint": info.fingerprint, "capacity": info.capacity},
        f"registered key {info.key_id} ({info.param_set}, dim {info.dim}, fingerprint {info.fingerprint})",
    )
    return 0


def tenant_describe(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    with common.client(args) as c:
        resp = c.describe()
    d = asdict(resp)
    lines = [f"tenant {resp.tenant_id}"] + [
        f"  key {k.key_id}: {k.subjects} subjects in {k.bins} bins, {k.stored_bytes} bytes at rest"
        for k in resp.keys
    ]
    common.emit(args, d, "\n".join(lines))
    return 0
