"""``AdminClient``: tenant creation and API-token management.

The one place that calls ``CreateTenant`` (the CLI, the demo, the
benchmarks and the tests all go through it). With the operator's admin
token it creates tenants and manages the tokens of any tenant; with a
tenant's ``manage`` token it manages that tenant's tokens::

    with AdminClient(target, token=admin_token) as admin:
        first = admin.create_tenant("acme")           # every scope
    with AdminClient(target, token=first.api_token) as mgr:
        kiosk = mgr.create_token("acme", name="kiosk-1", scopes=["query"])
        mgr.revoke_token("acme", kiosk.info.token_id)

A token's secret is returned once, by the call that creates it; the server
keeps only its SHA-256 and never lists it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import final

from veilface.client.transport import Transport
from veilface.errors import InvalidArgument
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.proto.v1 import veilface_pb2_grpc as pb_grpc

#: Scopes a tenant token can carry (docs/protocol.md, "Token scopes").
SCOPES = ("query", "enroll", "manage")

_TO_PB: dict[str, pb.TokenScope] = {
    "query": pb.TOKEN_SCOPE_QUERY,
    "enroll": pb.TOKEN_SCOPE_ENROLL,
    "manage": pb.TOKEN_SCOPE_MANAGE,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: never its secret.

    ``created_at`` and ``revoked_at`` are Unix seconds; ``revoked_at`` is
    None while the token is valid.
    """

    token_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class IssuedToken:
    """A new token: its description and its secret (shown once; keep it safe)."""

    tenant_id: str
    info: TokenInfo
    api_token: str = field(repr=False)


def _info(msg: pb.TokenInfo) -> TokenInfo:
    return TokenInfo(
        token_id=msg.token_id,
        name=msg.name,
        scopes=tuple(sorted(_FROM_PB.get(s, f"unknown({s})") for s in msg.scopes)),
        created_at=float(msg.created_at),
        revoked_at=float(msg.revoked_at) if msg.revoked_at else None,
    )


def _scopes_to_pb(scopes: Sequence[str]) -> list[pb.TokenScope]:
    if isinstance(scopes, str):
        scopes = [scopes]
    bad = [s for s in scopes if s not in _TO_PB]
    if bad or not scopes:
        raise InvalidArgument(f"token scopes are one or more of {list(SCOPES)}, got {list(scopes)}")
    return [_TO_PB[s] for s in dict.fromkeys(scopes)]


@final
class AdminClient:
    """Tenants and tokens over one channel.

    Parameters
    ----------
    target : ``host:port`` of the server, or several (a list or ``"a:1,b:2"``):
        one channel balanced round-robin over them (front-ends sharing a store)
    token : the operator's admin token, or a tenant's ``manage`` token
    root_cert : PEM root certificate to verify the server (TLS)
    insecure : permit plaintext to a non-loopback target (see :class:`Transport`)
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str,
        root_cert: Path | None = None,
        insecure: bool = False,
        timeout_s: float = 60.0,
    ) -> None:
        self.transport = Transport(
            target, token=token, root_cert=root_cert, insecure=insecure, timeout_s=timeout_s
        )
        self._tokens = pb_grpc.TokensStub(self.transport.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_tenant(self, tenant_id: str) -> IssuedToken:
        """Create a tenant (admin token); returns its first token, with every scope."""
        resp = self.transport.call(
            self.transport.tenants.CreateTenant, pb.CreateTenantRequest(tenant_id=tenant_id)
        )
        return IssuedToken(resp.tenant_id, _info(resp.token), resp.api_token)

    def create_token(self, tenant_id: str, *, name: str, scopes: Sequence[str]) -> IssuedToken:
        """A new token of the tenant with these scopes (e.g. ``["query"]`` for a kiosk)."""
        resp = self.transport.call(
            self._tokens.CreateToken,
            pb.CreateTokenRequest(tenant_id=tenant_id, name=name, scopes=_scopes_to_pb(scopes)),
        )
        return IssuedToken(tenant_id, _info(resp.token), resp.api_token)

    def list_tokens(self, tenant_id: str, *, include_revoked: bool = True) -> list[TokenInfo]:
        """The tenant's tokens, oldest first (ids, names, scopes, times; no secrets)."""
        resp = self.transport.call(
            self._tokens.ListTokens,
            pb.ListTokensRequest(tenant_id=tenant_id, include_revoked=include_revoked),
        )
        return [_info(t) for t in resp.tokens]

    def revoke_token(self, tenant_id: str, token_id: str) -> TokenInfo:
        """Revoke a token; the server refuses it from its next call on."""
        resp = self.transport.call(
            self._tokens.RevokeToken, pb.RevokeTokenRequest(tenant_id=tenant_id, token_id=token_id)
        )
        return _info(resp.token)


__all__ = ["SCOPES", "AdminClient", "IssuedToken", "TokenInfo"]
