"""The API-token table of the SQLite store (mixed into :class:`SQLiteStore`).

A tenant has several tokens, each stored as the SHA-256 hash of its secret
with an id, a name, its scopes and when it was created and revoked. The
table is the truth: the server's in-memory index is built from
:meth:`SQLiteTokens.active_tokens` at start-up and updated as tokens are
created and revoked.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager

from veilface.errors import NotFound, ResourceExhausted
from veilface.server.store.records import TokenRecord

# Scopes of a token carried over from a schema without scopes (<= 4): that
# token could do everything, so it keeps every scope. Revoke it once
# narrower tokens are issued.
MIGRATED_TOKEN_SCOPES = ("enroll", "manage", "query")
#: Revoked tokens kept per tenant for ListTokens (older ones are forgotten).
KEEP_REVOKED_TOKENS = 64


_COLUMNS = "token_id, tenant_id, name, token_hash, scopes, created_at, revoked_at"


def legacy_hash_placeholder(tenant_id: str) -> str:
    """What ``tenants.token_hash`` holds since schema 5: unique, and no token's hash."""
    return f"see-tokens-table:{tenant_id}"


def insert_token(c: sqlite3.Connection, rec: TokenRecord) -> None:
    c.execute(
        f"INSERT INTO tokens ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL)",
        (
            rec.token_id,
            rec.tenant_id,
            rec.name,
            rec.token_hash,
            ",".join(rec.scopes),
            rec.created_at,
        ),
    )


def move_tenant_tokens(c: sqlite3.Connection) -> None:
    """Schema <= 4 -> 5: each tenant's one token becomes a row of ``tokens`` (same hash).

    The old column then holds a placeholder, so that no token hash is left
    where revocation would not reach it. Runs inside the upgrade's transaction.
    """
    rows = c.execute("SELECT tenant_id, token_hash, created_at FROM tenants").fetchall()
    for tenant_id, token_hash, created_at in rows:
        placeholder = legacy_hash_placeholder(tenant_id)
        if token_hash == placeholder:
            continue
        c.execute(
            f"INSERT OR IGNORE INTO tokens ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (
                "t_" + secrets.token_hex(8),
                tenant_id,
                "migrated",
                token_hash,
                ",".join(MIGRATED_TOKEN_SCOPES),
                created_at,
            ),
        )
        c.execute("UPDATE tenants SET token_hash=? WHERE tenant_id=?", (placeholder, tenant_id))


def _record(row: Sequence[object]) -> TokenRecord:
    token_id, tenant_id, name, token_hash, scopes, created_at, revoked_at = row
    return TokenRecord(
        token_id=str(token_id),
        tenant_id=str(tenant_id),
        name=str(name),
        token_hash=str(token_hash),
        scopes=tuple(str(scopes).split(",")) if scopes else (),
        created_at=float(str(created_at)),
        revoked_at=None if revoked_at is None else float(str(revoked_at)),
    )


class SQLiteTokens:
    """Token methods of :class:`SQLiteStore`; it provides ``_tx``, ``_q`` and the lock."""

    _lock: threading.RLock

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _q(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:  # type: ignore[type-arg]
        raise NotImplementedError

    def active_tokens(self) -> list[TokenRecord]:
        """Every valid token of every tenant (the server's index at start-up)."""
        return [
            _record(r) for r in self._q(f"SELECT {_COLUMNS} FROM tokens WHERE revoked_at IS NULL")
        ]

    def add_token(self, record: TokenRecord, *, max_active: int) -> None:
        """Store a new token.

        Raises
        ------
        NotFound
            Unknown tenant.
        ResourceExhausted
            The tenant already has ``max_active`` valid tokens.
        """
        with self._tx() as c:
            if not c.execute(
                "SELECT 1 FROM tenants WHERE tenant_id=?", (record.tenant_id,)
            ).fetchone():
                raise NotFound(f"unknown tenant {record.tenant_id!r}")
            (active,) = c.execute(
                "SELECT COUNT(*) FROM tokens WHERE tenant_id=? AND revoked_at IS NULL",
                (record.tenant_id,),
            ).fetchone()
            if active >= max_active:
                raise ResourceExhausted(
                    f"tenant {record.tenant_id!r} has {active} valid tokens, the most allowed; "
                    "revoke one first"
                )
            insert_token(c, record)

    def list_tokens(self, tenant_id: str, *, include_revoked: bool = True) -> list[TokenRecord]:
        """The tenant's tokens, oldest first."""
        sql = f"SELECT {_COLUMNS} FROM tokens WHERE tenant_id=?"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        return [_record(r) for r in self._q(sql + " ORDER BY created_at, token_id", (tenant_id,))]

    def revoke_token(self, tenant_id: str, token_id: str) -> TokenRecord:
        """Revoke one of the tenant's tokens and return it as stored now.

        Revoking a revoked token changes nothing. Only the newest
        :data:`KEEP_REVOKED_TOKENS` revoked tokens of a tenant are kept.

        Raises
        ------
        NotFound
            The tenant has no token of that id.
        """
        with self._tx() as c:
            c.execute(
                "UPDATE tokens SET revoked_at=? WHERE tenant_id=? AND token_id=? AND revoked_at IS NULL",
                (time.time(), tenant_id, token_id),
            )
            row = c.execute(
                f"SELECT {_COLUMNS} FROM tokens WHERE tenant_id=? AND token_id=?",
                (tenant_id, token_id),
            ).fetchone()
            if row is None:
                raise NotFound(f"tenant {tenant_id!r} has no token {token_id!r}")
            c.execute(
                "DELETE FROM tokens WHERE tenant_id=? AND revoked_at IS NOT NULL AND token_id NOT IN "
                "(SELECT token_id FROM tokens WHERE tenant_id=? AND revoked_at IS NOT NULL "
                "ORDER BY revoked_at DESC LIMIT ?)",
                (tenant_id, tenant_id, KEEP_REVOKED_TOKENS),
            )
        return _record(row)
