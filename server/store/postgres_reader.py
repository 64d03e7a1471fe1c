"""The scoring workers' view of a PostgreSQL store: one read-only connection per process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from veilface.errors import Unavailable
from veilface.server.store.postgres_conn import PgConn, connect, db_errors
from veilface.server.store.records import BinData
from veilface.server.store.sql_reads import read_bin_data, read_key_context, read_version

T = TypeVar("T")


class PostgresBinReader:
    """:class:`~veilface.server.store.base.BinReader` on PostgreSQL.

    A worker is single-threaded: one connection, opened again if the
    database restarted under it (one retry, then Unavailable).
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = connect(dsn)

    def _lost(self) -> bool:
        return self._conn is None or self._conn.closed or self._conn.broken

    def _once(self, fn: Callable[[PgConn], T], snapshot: bool) -> T:
        if self._conn is None or self._lost():
            self._conn = connect(self._dsn)
        conn = self._conn
        with db_errors(self._dsn):
            if not snapshot:
                return fn(PgConn(conn))
            with conn.transaction():
                conn.execute(b"SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return fn(PgConn(conn))

    def _run(self, fn: Callable[[PgConn], T], *, snapshot: bool = False) -> T:
        try:
            return self._once(fn, snapshot)
        except Unavailable:
            if not self._lost():
                raise
            return self._once(fn, snapshot)  # the database restarted: once more, on a new connection

    def load(self, bin_id: int) -> BinData:
        return self._run(lambda c: read_bin_data(c, bin_id), snapshot=True)

    def version(self, bin_id: int) -> int | None:
        return self._run(lambda c: read_version(c, bin_id))

    def key_context(self, tenant_id: str, key_id: str) -> tuple[bytes, str, bytes | None]:
        return self._run(lambda c: read_key_context(c, tenant_id, key_id))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
