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
        help="cosine match threshold (default 0.92: dlib on LFW, FAR ~0.2%%, FRR ~5%%)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing state file")
    p.set_defaults(func=keys_init)

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


def tenant_create(args: argparse.Namespace) -> int:
    from veilface.client.transport import Transport
    from veilface.proto.v1 import veilface_pb2 as pb

    admin = args.admin_token_file.read_text().strip()
    tr = Transport(args.server, token=admin, root_cert=args.root_cert)
    try:
        resp = tr.call(tr.tenants.CreateTenant, pb.CreateTenantRequest(tenant_id=args.tenant_id))
    finally:
        tr.close()
    common.emit(
        args,
        {"tenant_id": resp.tenant_id, "api_token": resp.api_token},
        f"tenant {resp.tenant_id} created; API token (shown once):\n{resp.api_token}",
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
    from google.protobuf.json_format import MessageToDict

    with common.client(args) as c:
        resp = c.describe()
    d = MessageToDict(resp, preserving_proto_field_name=True)
    lines = [f"tenant {resp.tenant_id}"] + [
        f"  key {k.key_id}: {k.subjects} subjects in {k.bins} bins, {k.stored_bytes} bytes at rest"
        for k in resp.keys
    ]
    common.emit(args, d, "\n".join(lines))
    return 0
