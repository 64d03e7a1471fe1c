"""The embedded gallery store: one SQLite file in WAL mode.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL`` means a commit
returns after the WAL is fsynced, so an acknowledged enrollment survives a
SIGKILL or a power cut. Every multi-row change is one transaction (``BEGIN
IMMEDIATE``), which also serializes all writers of the file: the tenant
lock of the shared SQL (:mod:`veilface.server.store.sql_base`) is a no-op
here. The SQL itself is shared with PostgreSQL (:mod:`sql_gallery`).

Staged bins of a bulk stream that never completed are removed when the
store opens: one process owns the file, so any staged bin then is dead.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from veilface.errors import FailedPrecondition
from veilface.server.store.records import BinData
from veilface.server.store.sql_base import Conn
from veilface.server.store.sql_gallery import SqlGallery
from veilface.server.store.sql_reads import read_bin_data, read_key_context, read_version
from veilface.server.store.sql_tokens import TOKEN_COLUMNS as _COLUMNS

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- token_hash: legacy (schema <= 4 kept the tenant's one token here); since
-- schema 5 it holds a placeholder and every token hash lives in `tokens`.
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
-- API tokens, several per tenant: SHA-256 of the secret, never the secret.
-- scopes: comma-separated names; revoked_at NULL while valid.
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS tokens_by_tenant ON tokens(tenant_id, created_at);
-- One row per tenant key; several keys coexist during key rotation.
CREATE TABLE IF NOT EXISTS keys (
    tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
    key_id TEXT NOT NULL,
    param_set TEXT NOT NULL,
    dim INTEGER NOT NULL,
    presel_dims INTEGER NOT NULL,
    public_context BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    center_probe BLOB,
    PRIMARY KEY (tenant_id, key_id)
);
CREATE TABLE IF NOT EXISTS bins (
    bin_id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    label TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'staged')),
    stream_id TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    base BLOB,
    base_seq INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    FOREIGN KEY (tenant_id, key_id) REFERENCES keys(tenant_id, key_id)
);
CREATE INDEX IF NOT EXISTS bins_by_label ON bins(tenant_id, key_id, label, state);
CREATE INDEX IF NOT EXISTS bins_by_stream ON bins(stream_id);
CREATE TABLE IF NOT EXISTS bin_deltas (
    bin_id INTEGER NOT NULL REFERENCES bins(bin_id),
    seq INTEGER NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (bin_id, seq)
);
CREATE TABLE IF NOT EXISTS subjects (
    tenant_id TEXT NOT NULL,
    handle TEXT NOT NULL,
    bin_id INTEGER NOT NULL REFERENCES bins(bin_id),
    slot INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, handle),
    UNIQUE (bin_id, slot)
);
-- Protected photos, sealed by the tenant; deleted with their subject.
CREATE TABLE IF NOT EXISTS photos (
    photo_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    handle TEXT NOT NULL,
    sealed BLOB NOT NULL,
    protection TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_by_subject ON photos(tenant_id, handle);
-- Single enrollments awaiting their fold into a bin (one ciphertext each).
CREATE TABLE IF NOT EXISTS staged (
    staged_id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    label TEXT NOT NULL,
    handle TEXT NOT NULL,
    blob BLOB NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (tenant_id, handle),
    FOREIGN KEY (tenant_id, key_id) REFERENCES keys(tenant_id, key_id)
);
CREATE INDEX IF NOT EXISTS staged_by_key ON staged(tenant_id, key_id, label);
-- Subjects of bins staged by a re-pack stream: they take over their handles
-- only when the stream activates and the replaced bins go, in one transaction.
CREATE TABLE IF NOT EXISTS stream_subjects (
    stream_id TEXT NOT NULL,
    bin_id INTEGER NOT NULL REFERENCES bins(bin_id),
    handle TEXT NOT NULL,
    slot INTEGER NOT NULL,
    PRIMARY KEY (stream_id, handle)
);
-- Subjects of bins staged by a bulk stream, in arrival order (no handle index:
-- they enter subjects, sorted by handle, when the stream activates).
CREATE TABLE IF NOT EXISTS bulk_subjects (
    bin_id INTEGER NOT NULL REFERENCES bins(bin_id),
    handle TEXT NOT NULL,
    slot INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS bulk_subjects_by_bin ON bulk_subjects(bin_id);
CREATE TABLE IF NOT EXISTS reservations (
    reservation_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    bin_id INTEGER NOT NULL REFERENCES bins(bin_id),
    slots TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""

SCHEMA_VERSION = "5"
# Older schemas this one upgrades in place: new tables (CREATE IF NOT EXISTS),
# and, from before schema 5, each tenant's one token moved into `tokens`.
UPGRADABLE_FROM = frozenset({"3", "4"})
# Scopes of a token carried over from a schema without scopes (<= 4): that
# token could do everything, so it keeps every scope. Revoke it once
# narrower tokens are issued.
MIGRATED_TOKEN_SCOPES = ("enroll", "manage", "query")


def legacy_hash_placeholder(tenant_id: str) -> str:
    """What ``tenants.token_hash`` holds since schema 5: unique, and no token's hash."""
    return f"see-tokens-table:{tenant_id}"


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



#: Page cache of the writing connection, KiB (SQLite allocates it as pages are used).
WRITER_CACHE_KIB = 64 * 1024


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
    else:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # The writer's page cache (default 2 MiB): a million subjects' handle
        # index is ~100 MiB of pages written in random order by bulk imports.
        conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SQLiteStore(SqlGallery):
    """Thread-safe SQLite implementation of :class:`~veilface.server.store.base.GalleryStore`.

    One connection, shared by the server's threads under a lock.
    """

    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = _connect(self.path)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.executescript(SCHEMA)
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif row[0] in UPGRADABLE_FROM:
                if int(row[0]) < 5:
                    move_tenant_tokens(self._conn)
                c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"database {self.path} has schema {row[0]}, this server needs {SCHEMA_VERSION}"
                )
        self.cleanup_staged()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- plumbing -------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Conn]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[Conn]:
        with self._lock:
            yield self._conn

    @contextmanager
    def _snapshot(self) -> Iterator[Conn]:
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _insert_tenant(self, c: Conn, tenant_id: str, created_at: float) -> None:
        # Schema 5 keeps the legacy one-token column, filled with a placeholder.
        c.execute(
            "INSERT INTO tenants VALUES (?, ?, ?)",
            (tenant_id, legacy_hash_placeholder(tenant_id), created_at),
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def cleanup_staged(self) -> None:
        """Remove bins of bulk streams that never completed (crash, cut stream)."""
        with self._tx() as c:
            staged = [int(r[0]) for r in c.execute("SELECT bin_id FROM bins WHERE state='staged'").fetchall()]
            self._delete_bins(c, staged)
            c.execute("DELETE FROM reservations WHERE expires_at < ?", (time.time(),))


class SQLiteBinReader:
    """A read-only connection for scoring workers (WAL readers never block the writer)."""

    def __init__(self, path: Path | str) -> None:
        self._conn = _connect(Path(path), readonly=True)

    def load(self, bin_id: int) -> BinData:
        self._conn.execute("BEGIN")
        try:
            return read_bin_data(self._conn, bin_id)
        finally:
            self._conn.execute("COMMIT")

    def version(self, bin_id: int) -> int | None:
        return read_version(self._conn, bin_id)

    def key_context(self, tenant_id: str, key_id: str) -> tuple[bytes, str, bytes | None]:
        return read_key_context(self._conn, tenant_id, key_id)

    def close(self) -> None:
        self._conn.close()


#: The former name of :class:`SQLiteBinReader`.
BinReader = SQLiteBinReader
