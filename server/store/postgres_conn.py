"""psycopg plumbing shared by the PostgreSQL store and its worker reader.

:class:`PgConn` lets the shared SQL (``?`` placeholders) run on psycopg
(``%s``); :func:`db_errors` turns what psycopg raises when the database is
down, restarting or asks for a retry into :class:`~veilface.errors.Unavailable`
naming the database without its password (and a value PostgreSQL cannot
store, such as text with a NUL character, into InvalidArgument).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from veilface.errors import InvalidArgument, Unavailable
from veilface.server.store.factory import redact
from veilface.server.store.sql_base import Rows

#: Seconds to wait for a connection (a database that is down fails within this).
CONNECT_TIMEOUT_S = 10


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PgConn:
    """A psycopg connection taking the shared SQL's ``?`` placeholders."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Rows:
        if not args:  # no parameters: sent as is (a DDL script may hold several statements)
            return self.raw.execute(sql.encode())
        return self.raw.execute(_pg_sql(sql).encode(), list(args))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> object:
        with self.raw.cursor() as cur:
            cur.executemany(_pg_sql(sql).encode(), [list(r) for r in rows])
        return None


def _reason(err: BaseException, dsn: str) -> str:
    """The first line of a libpq error, with the password scrubbed should it appear."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    try:
        password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text


def unreachable(dsn: str, err: BaseException) -> Unavailable:
    return Unavailable(
        f"cannot reach the PostgreSQL database {redact(dsn)}: {_reason(err, dsn)}; "
        "check that it is running and the URL (host, port, user, password, database)"
    )


@contextmanager
def db_errors(dsn: str) -> Iterator[None]:
    """Map psycopg's operational failures to Unavailable (the caller may retry)."""
    try:
        yield
    except psycopg.DataError:
        # A value PostgreSQL cannot hold (text with a NUL character, a number out of
        # range) that the boundary checks let through: the request's fault.
        raise InvalidArgument("a value in the request cannot be stored (a NUL character?)") from None
    except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected):
        raise Unavailable("the gallery database asked for a retry (a concurrent write); retry") from None
    except psycopg.OperationalError as err:
        raise unreachable(dsn, err) from None
    except psycopg.InterfaceError as err:  # a connection closed under us
        raise unreachable(dsn, err) from None


def connect(dsn: str) -> psycopg.Connection[Any]:
    """One autocommit connection (transactions are explicit), or Unavailable."""
    with db_errors(dsn):
        return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
