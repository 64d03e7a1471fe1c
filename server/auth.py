"""API-token authentication, checked by a server interceptor.

Tokens travel as ``authorization: Bearer <token>`` metadata (over TLS in any
real deployment). The server keeps only SHA-256 hashes: the admin token's
hash from the operator, and each tenant's from CreateTenant. The
interceptor resolves the caller to a :class:`Principal` and stores it in a
context variable for the call; servicers then require that the request's
``tenant_id`` is the caller's own (:func:`require_tenant`).
"""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from veilface.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

# Methods that need no token: health checks and reflection.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHODS = {"/veilface.v1.Tenants/CreateTenant"}


@dataclass(frozen=True)
class Principal:
    tenant_id: str | None  # None for the admin
    is_admin: bool = False


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "veilface_principal", default=None
)


def current_principal() -> Principal:
    p = _principal.get()
    if p is None:
        raise Unauthenticated("missing API token")
    return p


def require_tenant(tenant_id: str) -> None:
    p = current_principal()
    if p.is_admin or p.tenant_id != tenant_id:
        raise PermissionDenied("this token may not act on that tenant")


def require_admin() -> None:
    if not current_principal().is_admin:
        raise PermissionDenied("creating tenants needs the operator's admin token")


class TokenIndex:
    """Maps token hashes to tenants; updated in place when tenants are created."""

    def __init__(self, admin_hash: str | None, tenants: dict[str, str]) -> None:
        self.admin_hash = admin_hash
        self.tenants = dict(tenants)

    def resolve(self, token_hash: str) -> Principal | None:
        if self.admin_hash and hmac.compare_digest(self.admin_hash, token_hash):
            return Principal(None, True)
        tenant = self.tenants.get(token_hash)
        return Principal(tenant) if tenant else None


def _token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, index: TokenIndex, hash_fn: Callable[[str], str]) -> None:
        self.index = index
        self.hash_fn = hash_fn

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        token = _token(details.invocation_metadata)
        principal = self.index.resolve(self.hash_fn(token)) if token else None
        if principal is None:
            log.info("rejected call to %s: %s token", method, "unknown" if token else "no")
            return _deny(handler, "missing or unknown API token")
        if method in ADMIN_METHODS and not principal.is_admin:
            return _deny(handler, "this method needs the operator's admin token", grpc.StatusCode.PERMISSION_DENIED)
        return _bind(handler, principal)


def _deny(
    handler: grpc.RpcMethodHandler, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        unary, handler.request_deserializer, handler.response_serializer
    )


def _bind(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    """Run the behaviour with the principal set in its own task context."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _principal.set(principal)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_s = handler.stream_unary

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            _principal.set(principal)
            return await inner_s(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    return handler
