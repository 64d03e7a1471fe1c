"""What the shared SQL of the gallery store needs from a database (SQLite, PostgreSQL).

The store's SQL is written once (:mod:`sql_gallery`, :mod:`sql_bulk`,
:mod:`sql_reads`, :mod:`sql_tokens`) with ``?`` placeholders and the
subset of SQL both databases share (``RETURNING``, ``ON CONFLICT``). An
implementation provides connections and transactions, and the one place
where the two differ in kind: SQLite serializes every writer on one file
lock (``BEGIN IMMEDIATE``), while several PostgreSQL clients write at once,
so each write transaction first takes its tenant's lock
(:meth:`SqlBase._lock_tenant`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Rows(Protocol):
    """A cursor after ``execute`` (sqlite3 and psycopg cursors both are one)."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """A connection inside a transaction or a read, taking ``?`` placeholders."""

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Rows: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> object: ...


def marks(n: int) -> str:
    """``?, ?, ?`` for an ``IN (...)`` of ``n`` values."""
    return ",".join("?" * n)


class SqlBase:
    """Hooks the shared SQL calls; :class:`SQLiteStore` and :class:`PostgresStore` fill them in."""

    #: Exceptions the database raises for a broken unique or foreign key.
    integrity_errors: tuple[type[Exception], ...] = ()

    def _tx(self) -> AbstractContextManager[Conn]:
        """A write transaction: committed (durably) on exit, rolled back on an exception."""
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Conn]:
        """A connection for reads; each statement sees every committed write."""
        raise NotImplementedError

    def _snapshot(self) -> AbstractContextManager[Conn]:
        """A read-only transaction: its statements all see one snapshot."""
        raise NotImplementedError

    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._read() as c:
            return c.execute(sql, args).fetchall()

    def _lock_tenant(self, c: Conn, tenant_id: str) -> None:
        """Serialize this transaction with the tenant's other writers (until it ends)."""

    def _note_stream(self, c: Conn, stream_id: str) -> None:
        """Record that this store process owns a bulk stream (see ``cleanup_staged``)."""
