"""API-token authentication and scopes, checked by a server interceptor.

Tokens travel as ``authorization: Bearer <token>`` metadata (over TLS in any
real deployment). The server keeps only SHA-256 hashes: the admin token's
from the operator, and each tenant token's from CreateTenant / CreateToken
(:mod:`veilface.server.tokens`). For every call the interceptor

1. resolves the token to a :class:`Principal` (UNAUTHENTICATED if unknown
   or revoked);
2. looks the method up in :data:`METHOD_SCOPES`: a method missing from the
   table is refused (fail closed), and the token must carry the scope the
   table names (PERMISSION_DENIED naming that scope);
3. takes one call from the token's query-rate bucket for query-scope calls
   of a token without the manage scope (RESOURCE_EXHAUSTED when empty);
4. stores the principal in a context variable for the call; servicers then
   require that the request's ``tenant_id`` is the caller's own
   (:func:`require_tenant`).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from veilface.errors import PermissionDenied, Unauthenticated
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server import fair_queue
from veilface.server.errors_map import end_call
from veilface.server.tokens import Grant, QueryRateLimiter, Scope, TokenIndex

log = logging.getLogger(__name__)

# Methods that need no token: health checks and reflection.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_Q, _E, _M = Scope.QUERY, Scope.ENROLL, Scope.MANAGE
_ANY_TENANT_SCOPE = frozenset({_Q, _E, _M})


def _method(service: str, name: str) -> str:
    return f"/{pb.DESCRIPTOR.services_by_name[service].full_name}/{name}"


def _build_table() -> dict[str, frozenset[Scope]]:
    """The scope table: each method -> the scopes of which the token needs one.

    Why each method needs what it needs (docs/protocol.md, "Token scopes"):
    a kiosk (``query``) identifies and verifies; an enrollment station
    (``enroll``) adds templates but cannot read one back; the back office
    (``manage``) reads ciphertexts back (FetchBin, FetchSubjectBin,
    FetchStaged: with the secret key they decrypt to templates), deletes,
    re-packs, rotates keys, keeps photos and manages tokens.
    """
    table: dict[str, frozenset[Scope]] = {
        _method("Tenants", "CreateTenant"): frozenset({Scope.ADMIN}),
        _method("Tenants", "RegisterKey"): frozenset({_M}),
        _method("Tenants", "RegisterCenter"): frozenset({_M}),
        # Counts and key parameters only; every SDK role reads it (the SDK
        # checks the key's centering vector before it enrolls or queries).
        _method("Tenants", "DescribeTenant"): _ANY_TENANT_SCOPE,
        _method("Enrollment", "ReserveSlots"): frozenset({_E}),
        _method("Enrollment", "Enroll"): frozenset({_E}),
        # A stream that replaces bins (re-pack, rotation) needs manage too:
        # checked per stream by the servicer (require_scope).
        _method("Enrollment", "BulkEnroll"): frozenset({_E, _M}),
        _method("Enrollment", "EnrollStaged"): frozenset({_E}),
        # Ciphertexts back to a key holder: templates, once decrypted.
        _method("Enrollment", "FetchStaged"): frozenset({_M}),
        _method("Enrollment", "FetchSubjectBin"): frozenset({_M}),
        _method("Enrollment", "FetchBin"): frozenset({_M}),
        _method("Enrollment", "ListBins"): frozenset({_M}),
        _method("Enrollment", "DeleteSubject"): frozenset({_M}),
        # Write-only (sealed by the tenant): whoever enrolls a subject may keep its photo.
        _method("Photos", "UploadPhoto"): frozenset({_E, _M}),
        _method("Photos", "ListPhotos"): frozenset({_M}),
        _method("Photos", "FetchPhoto"): frozenset({_M}),
    }
    # Every method of these services, present and future, by default.
    defaults = {"Identification": frozenset({_Q}), "Tokens": frozenset({_M})}
    for service, scopes in defaults.items():
        for m in pb.DESCRIPTOR.services_by_name[service].methods:
            table.setdefault(_method(service, m.name), scopes)
    return table


#: Full method name -> the scopes of which a token needs one. A method not
#: in the table is refused for every token.
METHOD_SCOPES: Mapping[str, frozenset[Scope]] = _build_table()

#: Calls that bring a new encrypted probe (a chosen-probe query, the unit of
#: template extraction by a stolen kiosk key): these draw on the per-token
#: query rate. FetchSlotMaps (handles only) and a ScoreCandidates naming a
#: query id do not bring a new probe but are still query calls; only the
#: first two are always counted, ScoreCandidates is counted too (it may carry
#: a fresh probe) so that one identification costs two calls of the budget.
RATE_LIMITED_METHODS = frozenset(
    _method("Identification", m) for m in ("Preselect", "ScoreCandidates", "Verify")
)

#: Methods the operator's admin token may call (tenant creation, and the
#: tokens of any tenant, e.g. to issue a new manage token after a loss).
ADMIN_METHODS = frozenset(
    {_method("Tenants", "CreateTenant")}
    | {_method("Tokens", m.name) for m in pb.DESCRIPTOR.services_by_name["Tokens"].methods}
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant token (its id and scopes) or the admin."""

    tenant_id: str | None  # None for the admin
    is_admin: bool = False
    token_id: str = ""
    scopes: frozenset[Scope] = frozenset()

    @classmethod
    def of(cls, grant: Grant) -> Principal:
        return cls(grant.tenant_id, grant.is_admin, grant.token_id, grant.scopes)


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "veilface_principal", default=None
)


def current_principal() -> Principal:
    p = _principal.get()
    if p is None:
        raise Unauthenticated("missing API token")
    return p


def require_tenant(tenant_id: str, *, allow_admin: bool = False) -> None:
    """The caller must be a token of ``tenant_id`` (or, with ``allow_admin``, the admin)."""
    p = current_principal()
    if p.is_admin and allow_admin:
        return
    if p.is_admin or p.tenant_id != tenant_id:
        raise PermissionDenied("this token may not act on that tenant")


def require_admin() -> None:
    if not current_principal().is_admin:
        raise PermissionDenied("creating tenants needs the operator's admin token")


def require_scope(scope: Scope, what: str) -> None:
    """A check inside a method whose table entry is wider (e.g. BulkEnroll that replaces bins)."""
    p = current_principal()
    if scope not in p.scopes:
        raise PermissionDenied(f"{what} needs a token with the {scope.value!r} scope")


def scope_error(method: str, principal: Principal) -> str | None:
    """Why ``principal`` may not call ``method`` (None if it may)."""
    name = method.rsplit("/", 1)[-1] or "this method"
    needed = METHOD_SCOPES.get(method)
    if needed is None:
        return f"{name} is not open to any token"
    if principal.is_admin:
        if method in ADMIN_METHODS:
            return None
        return f"the admin token only creates tenants and manages their tokens; {name} needs a tenant token"
    if Scope.ADMIN in needed:
        return f"{name} needs the operator's admin token"
    if needed & principal.scopes:
        return None
    names = " or ".join(repr(s.value) for s in sorted(needed, key=lambda s: s.value))
    return f"{name} needs a token with the {names} scope"


def _token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        index: TokenIndex,
        hash_fn: Callable[[str], str],
        limiter: QueryRateLimiter | None = None,
    ) -> None:
        self.index = index
        self.hash_fn = hash_fn
        self.limiter = limiter

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
        grant = self.index.resolve(self.hash_fn(token)) if token else None
        if grant is None:
            log.info("rejected call to %s: %s token", method, "unknown" if token else "no")
            return _deny(handler, "missing, unknown or revoked API token")
        principal = Principal.of(grant)
        refused = scope_error(method, principal)
        if refused is not None:
            log.info("refused %s to token %s: %s", method, principal.token_id, refused)
            return _deny(handler, refused, grpc.StatusCode.PERMISSION_DENIED)
        if (
            self.limiter is not None
            and method in RATE_LIMITED_METHODS
            and Scope.MANAGE not in principal.scopes
            and not self.limiter.allow(principal.token_id)
        ):
            return _deny(
                handler,
                f"this token is over its query rate ({self.limiter.rate:g}/s, bursts of "
                f"{self.limiter.burst:g}); retry later",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        return _bind(handler, principal)


def _deny(
    handler: grpc.RpcMethodHandler,
    message: str,
    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only ends the call with ``code``.

    It returns rather than ``context.abort``s (:func:`end_call`), so a refused
    request, however large, is freed at once (no exception cycle holds it).
    """

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        end_call(context, code, message)
        return None

    async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        end_call(context, code, message)
        return
        yield  # pragma: no cover  (makes this an async generator)

    make = {
        (False, False): (grpc.unary_unary_rpc_method_handler, unary),
        (True, False): (grpc.stream_unary_rpc_method_handler, unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, streamed),
        (True, True): (grpc.stream_stream_rpc_method_handler, streamed),
    }
    factory, behaviour = make[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(behaviour, handler.request_deserializer, handler.response_serializer)


def _bind(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    """Run the behaviour with the principal set in its own task context."""
    inner: Any
    if handler.unary_unary is not None or handler.stream_unary is not None:
        inner = handler.unary_unary or handler.stream_unary
        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.stream_unary_rpc_method_handler
        )

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _principal.set(principal)
            fair_queue.share.set(principal.tenant_id or "")
            return await inner(request, context)

        return factory(call, handler.request_deserializer, handler.response_serializer)
    inner = handler.unary_stream or handler.stream_stream
    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        _principal.set(principal)
        fair_queue.share.set(principal.tenant_id or "")
        result = inner(request, context)
        if hasattr(result, "__aiter__"):  # an async generator behaviour
            async for item in result:
                yield item
        else:  # a coroutine writing with context.write()
            await result

    return factory(stream, handler.request_deserializer, handler.response_serializer)
