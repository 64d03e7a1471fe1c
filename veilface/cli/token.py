"""``veilface token create|list|revoke``: a tenant's API tokens.

Authenticated with a ``manage`` token of the tenant (``--token-env`` /
``--token-file``, as the other tenant commands) or with the operator's
admin token (``--admin-token-file``)::

    veilface token create --tenant acme --scope query --name kiosk-1 --json
    veilface token list --tenant acme
    veilface token revoke --tenant acme t_0123456789abcdef

``create`` prints the new token's secret once; the server keeps only its
hash, and ``list`` never shows it.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from veilface.cli import common


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = sub.add_parser("token", help="a tenant's API tokens (scopes: query, enroll, manage)")
    cmds = t.add_subparsers(dest="token_cmd", required=True)

    p = cmds.add_parser("create", help="a new token with the given scopes; prints its secret once")
    _common(p)
    p.add_argument(
        "--scope",
        action="append",
        required=True,
        help="query, enroll or manage; repeat it or separate by commas (--scope query,enroll)",
    )
    p.add_argument("--name", required=True, help="a name for people: kiosk-1, back-office ...")
    p.set_defaults(func=token_create)

    p = cmds.add_parser("list", help="the tenant's tokens: id, name, scopes, created, revoked")
    _common(p)
    p.add_argument("--valid-only", action="store_true", help="leave revoked tokens out")
    p.set_defaults(func=token_list)

    p = cmds.add_parser("revoke", help="revoke a token by id; refused from its next call on")
    _common(p)
    p.add_argument("token_id", help="the id shown by create and list (t_...)")
    p.set_defaults(func=token_revoke)


def _common(p: argparse.ArgumentParser) -> None:
    common.add_server_options(p)
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument(
        "--admin-token-file",
        type=Path,
        help="use the operator's admin token instead of a manage token of the tenant",
    )


def _admin(args: argparse.Namespace) -> Any:
    from veilface.client.admin import AdminClient

    if args.admin_token_file is not None:
        token = args.admin_token_file.read_text().strip()
    else:
        token = common.token(args)
    return AdminClient(
        args.server,
        token=token,
        root_cert=args.root_cert,
        insecure=getattr(args, "insecure", False),
    )


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _row(info: Any) -> dict[str, Any]:
    return {
        "token_id": info.token_id,
        "name": info.name,
        "scopes": list(info.scopes),
        "created": _when(info.created_at),
        "revoked": None if info.revoked_at is None else _when(info.revoked_at),
    }


def token_create(args: argparse.Namespace) -> int:
    scopes = [s.strip() for arg in args.scope for s in arg.split(",") if s.strip()]
    with _admin(args) as admin:
        issued = admin.create_token(args.tenant, name=args.name, scopes=scopes)
    row = _row(issued.info)
    common.emit(
        args,
        {**row, "tenant_id": args.tenant, "api_token": issued.api_token},
        f"token {row['token_id']} ({row['name']}, scopes {','.join(row['scopes'])}) created; "
        f"its secret, shown once:\n{issued.api_token}",
    )
    return 0


def token_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        found = admin.list_tokens(args.tenant, include_revoked=not args.valid_only)
    rows = [_row(t) for t in found]
    lines = [f"{'id':<20} {'name':<20} {'scopes':<22} {'created':<26} revoked"]
    lines += [
        f"{r['token_id']:<20} {r['name'][:20]:<20} {','.join(r['scopes']):<22} "
        f"{r['created']:<26} {r['revoked'] or '-'}"
        for r in rows
    ]
    common.emit(args, {"tenant_id": args.tenant, "tokens": rows}, "\n".join(lines))
    return 0


def token_revoke(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        info = admin.revoke_token(args.tenant, args.token_id)
    row = _row(info)
    common.emit(args, row, f"token {row['token_id']} ({row['name']}) revoked at {row['revoked']}")
    return 0
