"""Tenant API tokens: scopes, minting, the in-memory index, the query rate limit.

A token is ``vf_`` + 256 random bits (URL-safe base64). The server keeps
only its SHA-256 (one hash is enough for a secret of that entropy: there is
nothing to brute-force), with an id, a name, its scopes and its creation
and revocation times (:class:`~veilface.server.store.records.TokenRecord`).
The store is the truth; :class:`TokenIndex` is the server's copy of the
valid tokens, built from the store at start-up and updated in place by
:class:`TokenService`, so a revocation takes effect on the next call.

Which scope each RPC needs is the table in :mod:`veilface.server.auth`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from veilface.errors import InvalidArgument, NotFound, VeilfaceError
from veilface.server.config import ServerSettings
from veilface.server.store.base import GalleryStore
from veilface.server.store.records import TokenRecord
from veilface.server.validation import check_tenant_id

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN_ID = re.compile(r"t_[0-9a-f]{16}")


class Scope(str, Enum):
    """What a tenant token may do; a token carries one or more, none implies another.

    ``ADMIN`` is not a tenant scope: only the operator's admin token holds
    it, and no token can be created with it.
    """

    QUERY = "query"
    ENROLL = "enroll"
    MANAGE = "manage"
    ADMIN = "admin"


#: The scopes a tenant token can carry; CreateTenant's first token has them all.
TENANT_SCOPES: frozenset[Scope] = frozenset({Scope.QUERY, Scope.ENROLL, Scope.MANAGE})


def hash_token(token: str) -> str:
    """SHA-256 hex of an API token (tokens are 256-bit random strings)."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(names: Iterable[str]) -> frozenset[Scope]:
    """Scope names ("query", "enroll", "manage") to scopes; at least one, tenant scopes only.

    Raises
    ------
    InvalidArgument
        No scope, or a name that is not a tenant scope.
    """
    out: set[Scope] = set()
    for name in names:
        try:
            scope = Scope(name)
        except ValueError:
            scope = Scope.ADMIN  # refused below, same message
        if scope not in TENANT_SCOPES:
            raise InvalidArgument(
                f"unknown token scope {str(name)[:20]!r}; scopes are {sorted(s.value for s in TENANT_SCOPES)}"
            )
        out.add(scope)
    if not out:
        raise InvalidArgument("a token needs at least one scope (query, enroll, manage)")
    return frozenset(out)


def check_token_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument("a token name is 1 to 64 characters of [A-Za-z0-9._-]")


def check_token_id(token_id: str) -> None:
    if not _TOKEN_ID.fullmatch(token_id):
        raise InvalidArgument("a token id looks like t_ and 16 hex digits")


@dataclass(frozen=True)
class IssuedToken:
    """A freshly minted token: its record and the secret (shown to the caller once)."""

    record: TokenRecord
    secret: str = field(repr=False)


def mint_token(tenant_id: str, name: str, scopes: Iterable[Scope]) -> IssuedToken:
    """A new random token of the tenant (not yet stored)."""
    check_token_name(name)
    secret = "vf_" + secrets.token_urlsafe(32)
    record = TokenRecord(
        token_id="t_" + secrets.token_hex(8),
        tenant_id=tenant_id,
        name=name,
        token_hash=hash_token(secret),
        scopes=tuple(sorted(s.value for s in scopes)),
        created_at=time.time(),
    )
    return IssuedToken(record, secret)


@dataclass(frozen=True)
class Grant:
    """What a valid token resolves to."""

    tenant_id: str | None  # None for the admin
    token_id: str
    scopes: frozenset[Scope]

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes


ADMIN_GRANT = Grant(None, "admin", frozenset({Scope.ADMIN}))


class TokenIndex:
    """Token hash -> :class:`Grant` for every valid token, plus the admin token's hash.

    Updated in place when a token is created or revoked (the event loop's
    thread only reads it, the servicers change it: a lock keeps the two
    dicts consistent).
    """

    def __init__(self, admin_hash: str | None, tokens: Iterable[TokenRecord]) -> None:
        self.admin_hash = admin_hash
        self._by_hash: dict[str, Grant] = {}
        self._hash_of: dict[str, str] = {}
        self._lock = threading.Lock()
        for rec in tokens:
            self.add(rec)

    def add(self, rec: TokenRecord) -> None:
        if rec.revoked_at is not None:
            return
        grant = Grant(rec.tenant_id, rec.token_id, frozenset(Scope(s) for s in rec.scopes))
        with self._lock:
            self._by_hash[rec.token_hash] = grant
            self._hash_of[rec.token_id] = rec.token_hash

    def remove(self, token_id: str) -> None:
        with self._lock:
            h = self._hash_of.pop(token_id, None)
            if h is not None:
                self._by_hash.pop(h, None)

    def apply(self, records: Iterable[TokenRecord]) -> None:
        """Bring the index up to date with records read from the store (revoked ones leave it)."""
        for rec in records:
            if rec.revoked_at is None:
                self.add(rec)
            else:
                self.remove(rec.token_id)

    def reconcile(self, active: Iterable[TokenRecord]) -> None:
        """Replace every tenant token by ``active`` (the store's valid tokens), atomically."""
        by_hash: dict[str, Grant] = {}
        hash_of: dict[str, str] = {}
        for rec in active:
            if rec.revoked_at is None:
                by_hash[rec.token_hash] = Grant(
                    rec.tenant_id, rec.token_id, frozenset(Scope(s) for s in rec.scopes)
                )
                hash_of[rec.token_id] = rec.token_hash
        with self._lock:
            self._by_hash, self._hash_of = by_hash, hash_of

    def resolve(self, token_hash: str) -> Grant | None:
        if self.admin_hash and hmac.compare_digest(self.admin_hash, token_hash):
            return ADMIN_GRANT
        with self._lock:
            return self._by_hash.get(token_hash)

    def __len__(self) -> int:
        return len(self._by_hash)


class QueryRateLimiter:
    """A token bucket per API token id: ``rate`` calls per second, bursts of ``burst``.

    Buckets live only in memory (a restart refills them) and are dropped
    with their token (:meth:`forget`); their number is bounded by the
    number of valid tokens.
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s < 0 or burst < 0:
            raise InvalidArgument("the query rate and burst cannot be negative")
        self.rate = float(rate_per_s)
        self.burst = float(max(burst, 1))
        self._buckets: dict[str, tuple[float, float]] = {}  # token id -> (tokens, last time)
        self._lock = threading.Lock()
        self._warned: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, token_id: str, *, now: float | None = None) -> bool:
        """Take one call from the token's bucket; False when it is empty."""
        if not self.enabled:
            return True
        t = time.monotonic() if now is None else now
        with self._lock:
            level, last = self._buckets.get(token_id, (self.burst, t))
            level = min(self.burst, level + (t - last) * self.rate)
            if level < 1.0:
                self._buckets[token_id] = (level, t)
                if t - self._warned.get(token_id, -1e9) > 60.0:  # once a minute per token
                    self._warned[token_id] = t
                    log.warning("token %s is over its query rate (%.3g/s)", token_id, self.rate)
                return False
            self._buckets[token_id] = (level - 1.0, t)
            return True

    def forget(self, token_id: str) -> None:
        with self._lock:
            self._buckets.pop(token_id, None)
            self._warned.pop(token_id, None)


class TokenSync:
    """Keeps a front-end's :class:`TokenIndex` in step with tokens other front-ends change.

    With several servers on one database, a token created or revoked
    through one must reach the others: every ``interval_s`` this reads the
    tokens changed since the last read (with ``overlap_s`` of slack for the
    writers' clocks; applying a record twice changes nothing). A revocation
    made elsewhere takes effect here within ``interval_s``; one made
    through this server, on the next call (:class:`TokenService`). Every
    ``full_every`` rounds the whole index is rebuilt from the valid tokens
    (a revoked row the store already forgot cannot be missed for long).
    """

    def __init__(
        self,
        store: GalleryStore,
        index: TokenIndex,
        limiter: QueryRateLimiter | None = None,
        *,
        interval_s: float = 2.0,
        overlap_s: float = 300.0,
        full_every: int = 150,
    ) -> None:
        self.store = store
        self.index = index
        self.limiter = limiter
        self.interval_s = interval_s
        self.overlap_s = overlap_s
        self.full_every = max(1, full_every)
        self._since = time.time()
        self._rounds = 0

    def sync_once(self) -> int:
        """One read of the store (blocking); returns how many records were applied."""
        started = time.time()
        self._rounds += 1
        if self._rounds % self.full_every == 0:
            self.index.reconcile(self.store.active_tokens())
        records = self.store.tokens_changed_since(self._since - self.overlap_s)
        self.index.apply(records)
        if self.limiter is not None:
            for rec in records:
                if rec.revoked_at is not None:
                    self.limiter.forget(rec.token_id)
        self._since = started
        return len(records)

    async def run(self) -> None:
        """Sync until cancelled; a database that is unreachable is retried next round."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.sync_once)
            except VeilfaceError as err:
                log.warning("token sync failed (retrying): %s", err.message)


class TokenService:
    """Create, list and revoke a tenant's tokens: the store first, then the index."""

    def __init__(
        self,
        store: GalleryStore,
        index: TokenIndex,
        settings: ServerSettings,
        limiter: QueryRateLimiter | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.settings = settings
        self.limiter = limiter

    async def create(self, tenant_id: str, name: str, scopes: Iterable[str]) -> IssuedToken:
        check_tenant_id(tenant_id)
        issued = mint_token(tenant_id, name, parse_scopes(scopes))
        await asyncio.to_thread(
            self.store.add_token, issued.record, max_active=self.settings.max_tokens_per_tenant
        )
        self.index.add(issued.record)
        log.info(
            "tenant %s: created token %s (%s)",
            tenant_id,
            issued.record.token_id,
            ",".join(issued.record.scopes),
        )
        return issued

    async def list(self, tenant_id: str, *, include_revoked: bool = True) -> list[TokenRecord]:
        check_tenant_id(tenant_id)
        if not await asyncio.to_thread(self.store.tenant_exists, tenant_id):
            raise NotFound(f"unknown tenant {tenant_id!r}")
        return await asyncio.to_thread(
            self.store.list_tokens, tenant_id, include_revoked=include_revoked
        )

    async def revoke(self, tenant_id: str, token_id: str) -> TokenRecord:
        """Revoke in the store, then drop it from the index: refused from the next call on."""
        check_tenant_id(tenant_id)
        check_token_id(token_id)
        rec = await asyncio.to_thread(self.store.revoke_token, tenant_id, token_id)
        self.index.remove(token_id)
        if self.limiter is not None:
            self.limiter.forget(token_id)
        log.info("tenant %s: revoked token %s", tenant_id, token_id)
        return rec


__all__ = [
    "ADMIN_GRANT",
    "TENANT_SCOPES",
    "Grant",
    "IssuedToken",
    "QueryRateLimiter",
    "Scope",
    "TokenIndex",
    "TokenService",
    "TokenSync",
    "check_token_id",
    "check_token_name",
    "hash_token",
    "mint_token",
    "parse_scopes",
]
