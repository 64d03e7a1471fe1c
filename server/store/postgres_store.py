"""The shared gallery store: one PostgreSQL database behind several front-ends.

Same SQL and semantics as the SQLite store (:mod:`sql_gallery`); what
differs is how writers are kept apart and how a dead server's work is found:

Durability
    Every write method is one transaction committed before it returns;
    with PostgreSQL's ``synchronous_commit=on`` (the default; a warning is
    logged at start if the server runs with it or ``fsync`` off) the commit
    waits for its WAL flush.
Writers
    SQLite serializes writers on its file lock. Here each write transaction
    first takes its tenant's transaction-scoped advisory lock, so the checks
    a write depends on (free slots, a bin's version, limits, whether a
    handle is taken) hold until it commits, across processes; tenants do not
    wait for each other. Reads are plain MVCC reads; the reads that need one
    view of several tables (``search_view``, ``load_bin_data``) run in a
    ``REPEATABLE READ`` snapshot.
Dead streams
    Each store holds a session advisory lock (``LOCK_OWNER``, a random key)
    on a connection of its own for its lifetime, and records the key of
    every bulk stream it writes (``stream_owners``). A store that opens
    removes the staged bins of streams whose owner's lock is free: their
    server died (PostgreSQL drops a dead client's session, and its locks).
Faults
    A database that is down, restarting or aborting a transaction for a
    retry raises :class:`~veilface.errors.Unavailable` (gRPC UNAVAILABLE);
    the pool replaces broken connections on the next call.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from veilface.server.store.factory import redact
from veilface.server.store.postgres_conn import (
    CONNECT_TIMEOUT_S,
    PgConn,
    connect,
    db_errors,
    unreachable,
)
from veilface.server.store.postgres_schema import LOCK_OWNER, LOCK_TENANT, migrate
from veilface.server.store.sql_base import Conn
from veilface.server.store.sql_gallery import SqlGallery

log = logging.getLogger(__name__)

#: Connections the pool may open (the server's blocking calls run on asyncio's
#: default thread pool, min(32, cores + 4) threads).
POOL_MAX = 8
#: Seconds a call waits for a connection before Unavailable.
POOL_WAIT_S = 5.0


class PostgresStore(SqlGallery):
    """PostgreSQL implementation of :class:`~veilface.server.store.base.GalleryStore`.

    Parameters
    ----------
    dsn
        A libpq URL, ``postgresql://user:password@host:port/database``.
    pool_max
        Most connections held at once (threads beyond wait for one).

    Raises
    ------
    Unavailable
        The database cannot be reached (the message names it without its password).
    FailedPrecondition
        Its schema is newer than this code.
    """

    integrity_errors = (psycopg.IntegrityError,)

    def __init__(self, dsn: str, *, pool_max: int = POOL_MAX) -> None:
        self._dsn = dsn
        self.redacted = redact(dsn)
        # The owner connection first: it fails fast, with libpq's reason, on a bad URL.
        self._owner_lock = threading.Lock()
        self._owner_conn = connect(dsn)
        self.owner = self._take_owner_key(self._owner_conn)
        self._check_durability(self._owner_conn)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max(1, pool_max),
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            check=ConnectionPool.check_connection,
            open=False,
            name="veilface-store",
            # How long a call waits for a connection: with more connections than
            # the server has threads, only a database that is down makes it wait.
            timeout=POOL_WAIT_S,
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S + 5)
        except PoolTimeout as err:
            self._owner_conn.close()
            raise unreachable(dsn, err) from None
        try:
            with self._tx() as c:
                found, now = migrate(c, self.redacted)
            if found != now:
                log.info("database %s: schema %d -> %d", self.redacted, found, now)
            self.cleanup_staged()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({self.redacted!r})"

    # -- plumbing -------------------------------------------------------

    @staticmethod
    def _take_owner_key(conn: psycopg.Connection[Any]) -> int:
        while True:
            key = secrets.randbelow(2**31 - 1) + 1
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_OWNER, key)
            ).fetchone()
            if row is not None and row[0]:
                return key

    def _check_durability(self, conn: psycopg.Connection[Any]) -> None:
        for name in ("fsync", "synchronous_commit"):
            row = conn.execute(f"SHOW {name}".encode()).fetchone()
            if row is not None and str(row[0]).lower() == "off":
                log.warning(
                    "database %s runs with %s=off: acknowledged writes may be lost if it crashes",
                    self.redacted,
                    name,
                )

    def _ensure_owner(self) -> None:
        """Hold the owner lock again if its connection was lost (the database restarted)."""
        with self._owner_lock:
            if not self._owner_conn.closed and not self._owner_conn.broken:
                try:
                    self._owner_conn.execute(b"SELECT 1")
                    return
                except psycopg.Error:
                    pass
            self._owner_conn.close()
            self._owner_conn = connect(self._dsn)
            with db_errors(self._dsn):
                self.owner = self._take_owner_key(self._owner_conn)
            log.warning("database %s: the owner session was lost and is held again", self.redacted)

    @contextmanager
    def _tx(self) -> Iterator[Conn]:
        with db_errors(self._dsn):
            try:
                with self._pool.connection() as conn, conn.transaction():
                    yield PgConn(conn)
            except PoolTimeout as err:
                raise unreachable(self._dsn, err) from None

    @contextmanager
    def _read(self) -> Iterator[Conn]:
        with db_errors(self._dsn):
            try:
                with self._pool.connection() as conn:
                    yield PgConn(conn)
            except PoolTimeout as err:
                raise unreachable(self._dsn, err) from None

    @contextmanager
    def _snapshot(self) -> Iterator[Conn]:
        with self._read() as c:
            c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            else:
                c.execute("COMMIT")

    def _lock_tenant(self, c: Conn, tenant_id: str) -> None:
        c.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (LOCK_TENANT, tenant_id))

    def _note_stream(self, c: Conn, stream_id: str) -> None:
        self._ensure_owner()
        c.execute(
            "INSERT INTO stream_owners VALUES (?, ?, ?) ON CONFLICT (stream_id) DO NOTHING",
            (stream_id, self.owner, time.time()),
        )

    def abort_stream(self, stream_id: str) -> None:
        super().abort_stream(stream_id)
        with self._tx() as c:
            c.execute("DELETE FROM stream_owners WHERE stream_id=?", (stream_id,))

    def activate_stream(
        self,
        stream_id: str,
        tenant_id: str = "",
        replaces: Sequence[tuple[int, int]] = (),
        *,
        renew_handles: bool = False,
    ) -> tuple[list[int], int]:
        self._ensure_owner()
        out = super().activate_stream(stream_id, tenant_id, replaces, renew_handles=renew_handles)
        with self._tx() as c:
            c.execute("DELETE FROM stream_owners WHERE stream_id=?", (stream_id,))
        return out

    def cleanup_staged(self) -> None:
        """Remove staged bins of streams whose server died, and expired reservations."""
        with self._tx() as c:
            dead: list[str] = []
            for (owner,) in c.execute(
                "SELECT DISTINCT owner FROM stream_owners WHERE owner <> ?", (self.owner,)
            ).fetchall():
                # Free (we get it) only if the owner's session is gone; released at commit.
                (free,) = c.execute(
                    "SELECT pg_try_advisory_xact_lock(?, ?)", (LOCK_OWNER, int(owner))
                ).fetchone()
                if free:
                    dead += [
                        str(s)
                        for (s,) in c.execute(
                            "SELECT stream_id FROM stream_owners WHERE owner=?", (owner,)
                        ).fetchall()
                    ]
            orphans = c.execute(
                "SELECT bin_id FROM bins b WHERE state='staged' AND NOT EXISTS "
                "(SELECT 1 FROM stream_owners o WHERE o.stream_id=b.stream_id)"
            ).fetchall()
            bins = [int(b) for (b,) in orphans]
            for stream_id in dead:
                bins += [
                    int(b)
                    for (b,) in c.execute(
                        "SELECT bin_id FROM bins WHERE stream_id=? AND state='staged'", (stream_id,)
                    ).fetchall()
                ]
                c.execute("DELETE FROM stream_owners WHERE stream_id=?", (stream_id,))
            self._delete_bins(c, bins)
            c.execute("DELETE FROM reservations WHERE expires_at < ?", (time.time(),))
        if bins:
            log.info("removed %d staged bins of %d dead bulk streams", len(bins), len(dead))

    def close(self) -> None:
        self._pool.close()
        with self._owner_lock:
            self._owner_conn.close()
