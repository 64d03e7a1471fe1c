"""The API-token table of the gallery store (mixed into the SQLite and PostgreSQL stores).

A tenant has several tokens, each stored as the SHA-256 hash of its secret
with an id, a name, its scopes and when it was created and revoked. The
table is the truth: the server's in-memory index is built from
:meth:`SqlTokens.active_tokens` at start-up and updated as tokens are
created and revoked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from veilface.errors import NotFound, ResourceExhausted
from veilface.server.store.records import TokenRecord
from veilface.server.store.sql_base import Conn, SqlBase

#: Revoked tokens kept per tenant for ListTokens (older ones are forgotten).
KEEP_REVOKED_TOKENS = 64


TOKEN_COLUMNS = "token_id, tenant_id, name, token_hash, scopes, created_at, revoked_at"


def insert_token(c: Conn, rec: TokenRecord) -> None:
    c.execute(
        f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL)",
        (
            rec.token_id,
            rec.tenant_id,
            rec.name,
            rec.token_hash,
            ",".join(rec.scopes),
            rec.created_at,
        ),
    )


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


class SqlTokens(SqlBase):
    """Token methods of the gallery store (see :class:`~veilface.server.store.base.GalleryStore`)."""

    def active_tokens(self) -> list[TokenRecord]:
        """Every valid token of every tenant (the server's index at start-up)."""
        return [
            _record(r) for r in self._q(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE revoked_at IS NULL")
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
            self._lock_tenant(c, record.tenant_id)
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

    def tokens_changed_since(self, since: float) -> list[TokenRecord]:
        """Tokens created or revoked at or after ``since``, oldest change first."""
        rows = self._q(
            f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE created_at >= ? OR revoked_at >= ? "
            "ORDER BY COALESCE(revoked_at, created_at), token_id",
            (since, since),
        )
        return [_record(r) for r in rows]

    def list_tokens(self, tenant_id: str, *, include_revoked: bool = True) -> list[TokenRecord]:
        """The tenant's tokens, oldest first."""
        sql = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant_id=?"
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
            self._lock_tenant(c, tenant_id)
            c.execute(
                "UPDATE tokens SET revoked_at=? WHERE tenant_id=? AND token_id=? AND revoked_at IS NULL",
                (time.time(), tenant_id, token_id),
            )
            row = c.execute(
                f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant_id=? AND token_id=?",
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
