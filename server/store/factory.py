"""Pick a gallery store from a ``--db`` value.

=====================================  =========================================
``--db``                               store
=====================================  =========================================
``PATH`` (no scheme)                   SQLite file ``PATH`` (the embedded default)
``sqlite:///rel/path.db``              SQLite, relative path (``sqlite:////abs``: absolute)
``postgresql://user:pw@host:port/db``  PostgreSQL (``postgres://`` too; libpq's
                                       query parameters such as ``sslmode`` pass through)
=====================================  =========================================

:func:`redact` is how a URL appears in logs and errors: its password
(in the authority or a ``password=`` parameter) becomes ``***``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from veilface.errors import FailedPrecondition, InvalidArgument
from veilface.server.store.base import BinReader, GalleryStore

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class StoreURL:
    """A parsed ``--db`` value: ``kind`` is "sqlite" (with ``path``) or "postgresql" (with ``dsn``)."""

    kind: str
    path: Path | None = None
    dsn: str = ""

    @property
    def target(self) -> str:
        """What :func:`open_reader` takes in another process (a path, or the URL)."""
        return str(self.path) if self.kind == "sqlite" else self.dsn

    @property
    def redacted(self) -> str:
        """The URL as shown in logs and errors (no password)."""
        return str(self.path) if self.kind == "sqlite" else redact(self.dsn)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    out = url
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            user = parts.username or ""
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            port = f":{parts.port}" if parts.port is not None else ""
            out = urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:  # an unparsable authority: drop it whole
        out = re.sub(r"//[^/?#]*", "//***", url, count=1)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", out)


def parse_db(value: str | Path) -> StoreURL:
    """What a ``--db`` value names; InvalidArgument for an unknown scheme."""
    if isinstance(value, Path):
        return StoreURL("sqlite", path=value)
    m = _SCHEME.match(value)
    if m is None:
        if not value:
            raise InvalidArgument("--db is empty: give a SQLite file or a postgresql:// URL")
        return StoreURL("sqlite", path=Path(value))
    scheme = m.group(1).lower()
    if scheme == "sqlite":
        rest = value[m.end() :]
        if not rest.startswith("/") or len(rest) < 2:
            raise InvalidArgument("a SQLite URL is sqlite:///relative/path or sqlite:////absolute/path")
        return StoreURL("sqlite", path=Path(rest[1:]))
    if scheme in POSTGRES_SCHEMES:
        return StoreURL("postgresql", dsn=value)
    raise InvalidArgument(
        f"--db {redact(value)!r}: unknown scheme {scheme!r}; use a SQLite path, sqlite:///path "
        "or postgresql://user:password@host:port/database"
    )


def _need_psycopg() -> None:
    import importlib.util

    for module in ("psycopg", "psycopg_pool"):
        if importlib.util.find_spec(module) is None:
            raise FailedPrecondition(
                f"a PostgreSQL store needs {module}: pip install 'veilface[server]' "
                "(psycopg[binary], psycopg-pool)"
            )


def _path(url: StoreURL) -> Path:
    if url.path is None:
        raise InvalidArgument("a SQLite store needs a file path")
    return url.path


def open_store(value: str | Path | StoreURL) -> GalleryStore:
    """Open (and create or migrate) the store ``value`` names.

    A PostgreSQL URL that cannot be reached raises Unavailable naming it
    without its password; psycopg is imported only here.
    """
    url = value if isinstance(value, StoreURL) else parse_db(value)
    if url.kind == "sqlite":
        from veilface.server.store.sqlite_store import SQLiteStore

        return SQLiteStore(_path(url))
    _need_psycopg()
    from veilface.server.store.postgres_store import PostgresStore

    return PostgresStore(url.dsn)


def open_reader(value: str | Path | StoreURL) -> BinReader:
    """A read-only view of the store for a scoring worker process."""
    url = value if isinstance(value, StoreURL) else parse_db(value)
    if url.kind == "sqlite":
        from veilface.server.store.sqlite_store import SQLiteBinReader

        return SQLiteBinReader(_path(url))
    _need_psycopg()
    from veilface.server.store.postgres_reader import PostgresBinReader

    return PostgresBinReader(url.dsn)
