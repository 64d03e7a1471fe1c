"""The embedded gallery store: one SQLite file in WAL mode.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL`` means a commit
returns after the WAL is fsynced, so an acknowledged enrollment survives a
SIGKILL or a power cut. Every multi-row change is one transaction (``BEGIN
IMMEDIATE``), so a killed process leaves either all of it or none.

Bins hold their ciphertexts as a *base* blob plus *deltas* (one per
single-template contribution since the last compaction): acknowledging a
single enrollment writes only its own contribution, and compaction later
folds the deltas into the base. A *staged* template (fast single
enrollment) is one row of its own, searched until the tenant folds it into
a bin: the fold writes the bin delta and removes the staged row in one
transaction, so a template is always in exactly one of the two. Bulk imports write whole bins in a
``staged`` state and flip them to ``active`` in one transaction when the
stream ends; staged bins of a dead stream are removed at start-up.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from veilface.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from veilface.server.store.records import (
    BinData,
    BinInfo,
    BinSummary,
    KeyRecord,
    KeyStats,
    Reservation,
    StagedRecord,
    SubjectRef,
    TokenRecord,
)
from veilface.server.store.sqlite_tokens import (
    SQLiteTokens,
    insert_token,
    legacy_hash_placeholder,
    move_tenant_tokens,
)

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
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SQLiteStore(SQLiteTokens):
    """Thread-safe SQLite implementation of :class:`GalleryStore` (API tokens: :class:`SQLiteTokens`)."""

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
                    move_tenant_tokens(c)
                c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"database {self.path} has schema {row[0]}, this server needs {SCHEMA_VERSION}"
                )
        self.cleanup_staged()

    # -- plumbing -------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def _q(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:  # type: ignore[type-arg]
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def cleanup_staged(self) -> None:
        """Remove bins of bulk streams that never completed (crash, cut stream)."""
        with self._tx() as c:
            staged = [r[0] for r in c.execute("SELECT bin_id FROM bins WHERE state='staged'")]
            self._delete_bins(c, staged)
            c.execute("DELETE FROM reservations WHERE expires_at < ?", (time.time(),))

    @staticmethod
    def _delete_bins(c: sqlite3.Connection, bin_ids: Sequence[int]) -> None:
        for bin_id in bin_ids:
            c.execute("DELETE FROM subjects WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM stream_subjects WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM bin_deltas WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM reservations WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM bins WHERE bin_id=?", (bin_id,))

    # -- tenants and keys -----------------------------------------------

    def create_tenant(self, tenant_id: str, first_token: TokenRecord) -> None:
        """The tenant and its first token, in one transaction."""
        try:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO tenants VALUES (?, ?, ?)",
                    (tenant_id, legacy_hash_placeholder(tenant_id), first_token.created_at),
                )
                insert_token(c, first_token)
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"tenant {tenant_id!r} already exists") from None

    def tenant_exists(self, tenant_id: str) -> bool:
        return bool(self._q("SELECT 1 FROM tenants WHERE tenant_id=?", (tenant_id,)))

    def put_key(self, record: KeyRecord) -> KeyRecord:
        with self._tx() as c:
            row = c.execute(
                "SELECT fingerprint FROM keys WHERE tenant_id=? AND key_id=?",
                (record.tenant_id, record.key_id),
            ).fetchone()
            if row is not None:
                if row[0] != record.fingerprint:
                    raise AlreadyExists(
                        f"key {record.key_id!r} is already registered with another context; "
                        "register a new key id to rotate keys"
                    )
                return record
            c.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    record.tenant_id,
                    record.key_id,
                    record.param_set,
                    record.dim,
                    record.presel_dims,
                    record.public_context,
                    record.fingerprint,
                    time.time(),
                ),
            )
        return record

    def get_key(self, tenant_id: str, key_id: str) -> KeyRecord:
        rows = self._q(
            "SELECT param_set, dim, presel_dims, public_context, fingerprint, center_probe FROM keys "
            "WHERE tenant_id=? AND key_id=?",
            (tenant_id, key_id),
        )
        if not rows:
            raise NotFound(f"tenant {tenant_id!r} has no key {key_id!r}; register it first")
        ps, dim, presel, ctx, fp, center = rows[0]
        return KeyRecord(tenant_id, key_id, ps, dim, presel, ctx, fp, center)

    def set_center(self, tenant_id: str, key_id: str, blob: bytes) -> None:
        with self._tx() as c:
            row = c.execute(
                "SELECT center_probe FROM keys WHERE tenant_id=? AND key_id=?", (tenant_id, key_id)
            ).fetchone()
            if row is None:
                raise NotFound(f"tenant {tenant_id!r} has no key {key_id!r}; register it first")
            (bins,) = c.execute(
                "SELECT COUNT(*) FROM bins WHERE tenant_id=? AND key_id=? AND version > 0",
                (tenant_id, key_id),
            ).fetchone()
            if row[0] is not None and bins:
                raise FailedPrecondition(
                    "the key's center is fixed once templates are enrolled; rotate to a new key"
                )
            c.execute(
                "UPDATE keys SET center_probe=? WHERE tenant_id=? AND key_id=?",
                (blob, tenant_id, key_id),
            )

    def list_keys(self, tenant_id: str) -> list[tuple[KeyRecord, KeyStats]]:
        out = []
        for (key_id,) in self._q(
            "SELECT key_id FROM keys WHERE tenant_id=? ORDER BY created_at", (tenant_id,)
        ):
            rec = self.get_key(tenant_id, key_id)
            bins, stored = self._q(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(base)), 0) FROM bins "
                "WHERE tenant_id=? AND key_id=? AND state='active'",
                (tenant_id, key_id),
            )[0]
            (deltas,) = self._q(
                "SELECT COALESCE(SUM(LENGTH(d.blob)), 0) FROM bin_deltas d JOIN bins b "
                "ON d.bin_id=b.bin_id WHERE b.tenant_id=? AND b.key_id=? AND b.state='active'",
                (tenant_id, key_id),
            )[0]
            (subjects,) = self._q(
                "SELECT COUNT(*) FROM subjects s JOIN bins b ON s.bin_id=b.bin_id "
                "WHERE b.tenant_id=? AND b.key_id=? AND b.state='active'",
                (tenant_id, key_id),
            )[0]
            staged, staged_bytes = self._q(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(blob)), 0) FROM staged "
                "WHERE tenant_id=? AND key_id=?",
                (tenant_id, key_id),
            )[0]
            out.append(
                (rec, KeyStats(subjects + staged, bins, stored + deltas + staged_bytes, staged))
            )
        return out

    # -- single enrollment ---------------------------------------------

    def reserve(
        self,
        tenant_id: str,
        key_id: str,
        label: str,
        count: int,
        capacity: int,
        ttl_s: float,
        max_live: int = 0,
    ) -> Reservation:
        """Reserve ``count`` free slots in a bin of ``label`` (a new bin when none has room).

        ``max_live`` (0: no cap) bounds the tenant's unexpired reservations.
        A bin created for a reservation that expired unused (version 0, no
        subject, no other reservation) is removed here, so abandoned
        reservations cannot pile up empty bins.
        """
        now = time.time()
        with self._tx() as c:
            c.execute("DELETE FROM reservations WHERE expires_at < ?", (now,))
            c.execute(
                "DELETE FROM bins WHERE tenant_id=? AND key_id=? AND state='active' AND version=0 "
                "AND bin_id NOT IN (SELECT bin_id FROM reservations) "
                "AND bin_id NOT IN (SELECT bin_id FROM subjects) "
                "AND bin_id NOT IN (SELECT bin_id FROM bin_deltas)",
                (tenant_id, key_id),
            )
            if max_live:
                (live,) = c.execute(
                    "SELECT COUNT(*) FROM reservations WHERE tenant_id=?", (tenant_id,)
                ).fetchone()
                if live >= max_live:
                    raise ResourceExhausted(
                        f"this tenant holds {live} open slot reservations, the limit; "
                        "enroll into them or wait for them to expire"
                    )
            chosen: tuple[int, list[int]] | None = None
            for (bin_id,) in c.execute(
                "SELECT bin_id FROM bins WHERE tenant_id=? AND key_id=? AND label=? "
                "AND state='active' ORDER BY bin_id",
                (tenant_id, key_id, label),
            ).fetchall():
                used = {s for (s,) in c.execute("SELECT slot FROM subjects WHERE bin_id=?", (bin_id,))}
                for (slots_json,) in c.execute(
                    "SELECT slots FROM reservations WHERE bin_id=?", (bin_id,)
                ):
                    used.update(json.loads(slots_json))
                if capacity - len(used) >= count:
                    free = [s for s in range(capacity) if s not in used][:count]
                    chosen = (bin_id, free)
                    break
            if chosen is None:
                cur = c.execute(
                    "INSERT INTO bins (tenant_id, key_id, label, state, version, created_at) "
                    "VALUES (?, ?, ?, 'active', 0, ?)",
                    (tenant_id, key_id, label, now),
                )
                chosen = (int(cur.lastrowid or 0), list(range(count)))
            res = Reservation(
                secrets.token_urlsafe(16), tenant_id, key_id, chosen[0], tuple(chosen[1]), now + ttl_s
            )
            c.execute(
                "INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?)",
                (res.reservation_id, tenant_id, key_id, res.bin_id, json.dumps(chosen[1]), res.expires_at),
            )
        return res

    def get_reservation(self, tenant_id: str, reservation_id: str) -> Reservation:
        rows = self._q(
            "SELECT key_id, bin_id, slots, expires_at FROM reservations "
            "WHERE reservation_id=? AND tenant_id=?",
            (reservation_id, tenant_id),
        )
        if not rows or rows[0][3] < time.time():
            raise NotFound("unknown or expired reservation; reserve slots again")
        key_id, bin_id, slots, exp = rows[0]
        return Reservation(reservation_id, tenant_id, key_id, bin_id, tuple(json.loads(slots)), exp)

    def commit_enroll(
        self, reservation: Reservation, handles: Sequence[str], delta: bytes, staged_id: int = 0
    ) -> int:
        """Write a bin contribution; with ``staged_id``, remove that staged template in the same transaction."""
        with self._tx() as c:
            row = c.execute(
                "SELECT expires_at FROM reservations WHERE reservation_id=?",
                (reservation.reservation_id,),
            ).fetchone()
            if row is None:
                raise NotFound("unknown or expired reservation; reserve slots again")
            if staged_id:
                gone = c.execute(
                    "DELETE FROM staged WHERE staged_id=? AND tenant_id=? AND key_id=? AND handle=?",
                    (staged_id, reservation.tenant_id, reservation.key_id, handles[0] if handles else ""),
                ).rowcount
                if gone != 1 or len(handles) != 1:
                    raise NotFound("no such staged template for this handle (folded or deleted)")
            self._insert_subjects(c, reservation.tenant_id, reservation.bin_id, handles, reservation.slots)
            (version,) = c.execute(
                "SELECT version FROM bins WHERE bin_id=?", (reservation.bin_id,)
            ).fetchone()
            c.execute(
                "INSERT INTO bin_deltas VALUES (?, ?, ?)", (reservation.bin_id, version + 1, delta)
            )
            c.execute("UPDATE bins SET version=? WHERE bin_id=?", (version + 1, reservation.bin_id))
            c.execute("DELETE FROM reservations WHERE reservation_id=?", (reservation.reservation_id,))
        return int(version + 1)

    @staticmethod
    def _insert_subjects(
        c: sqlite3.Connection, tenant_id: str, bin_id: int, handles: Sequence[str], slots: Sequence[int]
    ) -> None:
        hs = list(handles)
        for start in range(0, len(hs), 500):
            part = hs[start : start + 500]
            if c.execute(
                f"SELECT 1 FROM staged WHERE tenant_id=? AND handle IN ({','.join('?' * len(part))})",
                [tenant_id, *part],
            ).fetchone():
                raise AlreadyExists(
                    "a subject handle is already enrolled; delete it first or use another id"
                )
        try:
            c.executemany(
                "INSERT INTO subjects VALUES (?, ?, ?, ?)",
                [(tenant_id, h, bin_id, s) for h, s in zip(handles, slots, strict=True)],
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(
                "a subject handle is already enrolled; delete it first or use another id"
            ) from None

    # -- bulk enrollment -----------------------------------------------

    def stage_bin(
        self,
        tenant_id: str,
        key_id: str,
        label: str,
        stream_id: str,
        handles: Sequence[str],
        slots: Sequence[int],
        blob: bytes,
        *,
        repack: bool = False,
    ) -> int:
        """Write a bin of a bulk stream, invisible until :meth:`activate_stream`.

        ``repack``: the handles belong to bins the stream replaces; they are
        kept aside and take over at activation.
        """
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO bins (tenant_id, key_id, label, state, stream_id, version, base, "
                "base_seq, created_at) VALUES (?, ?, ?, 'staged', ?, 1, ?, 1, ?)",
                (tenant_id, key_id, label, stream_id, blob, time.time()),
            )
            bin_id = int(cur.lastrowid or 0)
            if not repack:
                self._insert_subjects(c, tenant_id, bin_id, handles, slots)
            else:
                try:
                    c.executemany(
                        "INSERT INTO stream_subjects VALUES (?, ?, ?, ?)",
                        [(stream_id, bin_id, h, s) for h, s in zip(handles, slots, strict=True)],
                    )
                except sqlite3.IntegrityError:
                    raise InvalidArgument("a re-pack stream names a handle twice") from None
        return bin_id

    def activate_stream(
        self,
        stream_id: str,
        tenant_id: str = "",
        replaces: Sequence[tuple[int, int]] = (),
        *,
        renew_handles: bool = False,
    ) -> tuple[list[int], int]:
        """Make a stream's bins visible; with ``replaces`` ((bin id, version) pairs), swap them in.

        The replaced bins must belong to the tenant, be unchanged since they
        were fetched, and hold no handle the stream leaves out; with
        ``renew_handles`` (key rotation: every subject under a new handle the
        server cannot match to its old one), hold exactly as many subjects
        as the stream.
        """
        with self._tx() as c:
            if replaces:
                self._swap_out(c, stream_id, tenant_id, replaces, renew_handles)
            bins = [
                r[0]
                for r in c.execute(
                    "SELECT bin_id FROM bins WHERE stream_id=? AND state='staged' ORDER BY bin_id",
                    (stream_id,),
                )
            ]
            c.execute(
                "UPDATE bins SET state='active', stream_id=NULL WHERE stream_id=? AND state='staged'",
                (stream_id,),
            )
            subjects = 0
            for b in bins:
                subjects += c.execute("SELECT COUNT(*) FROM subjects WHERE bin_id=?", (b,)).fetchone()[0]
        return bins, subjects

    def _swap_out(
        self,
        c: sqlite3.Connection,
        stream_id: str,
        tenant_id: str,
        replaces: Sequence[tuple[int, int]],
        renew_handles: bool = False,
    ) -> None:
        old_handles: set[str] = set()
        for bin_id, version in replaces:
            row = c.execute(
                "SELECT tenant_id, version FROM bins WHERE bin_id=? AND state='active'", (bin_id,)
            ).fetchone()
            if row is None or row[0] != tenant_id:
                raise NotFound(f"no bin {bin_id} to replace")
            if row[1] != version:
                raise FailedPrecondition(
                    f"bin {bin_id} changed since it was fetched; re-pack again"
                )
            old_handles.update(
                h for (h,) in c.execute("SELECT handle FROM subjects WHERE bin_id=?", (bin_id,))
            )
        new = c.execute(
            "SELECT bin_id, handle, slot FROM stream_subjects WHERE stream_id=?", (stream_id,)
        ).fetchall()
        if renew_handles:
            if len(new) != len(old_handles):
                raise FailedPrecondition(
                    f"the rotation carries {len(new)} subjects, the bins it replaces hold "
                    f"{len(old_handles)}"
                )
        elif missing := old_handles - {h for _, h, _ in new}:
            raise FailedPrecondition(
                f"the re-pack leaves out {len(missing)} subjects of the bins it replaces"
            )
        self._delete_bins(c, [b for b, _ in replaces])
        for bin_id, handle, slot in new:
            self._insert_subjects(c, tenant_id, bin_id, [handle], [slot])
        c.execute("DELETE FROM stream_subjects WHERE stream_id=?", (stream_id,))

    def key_bins(self, tenant_id: str, key_id: str) -> list[BinSummary]:
        """A key's active bins (id, label, version, subjects), by id."""
        return [
            BinSummary(int(b), str(lab), int(v), int(n))
            for b, lab, v, n in self._q(
                "SELECT b.bin_id, b.label, b.version, "
                "(SELECT COUNT(*) FROM subjects s WHERE s.bin_id=b.bin_id) FROM bins b "
                "WHERE b.tenant_id=? AND b.key_id=? AND b.state='active' ORDER BY b.bin_id",
                (tenant_id, key_id),
            )
        ]

    def bin_subjects(self, bin_id: int) -> list[tuple[int, str]]:
        """(slot, handle) of a bin's subjects, by slot."""
        return [
            (int(s), str(h))
            for s, h in self._q(
                "SELECT slot, handle FROM subjects WHERE bin_id=? ORDER BY slot", (bin_id,)
            )
        ]

    def abort_stream(self, stream_id: str) -> None:
        with self._tx() as c:
            bins = [
                r[0]
                for r in c.execute(
                    "SELECT bin_id FROM bins WHERE stream_id=? AND state='staged'", (stream_id,)
                )
            ]
            self._delete_bins(c, bins)

    # -- reading -------------------------------------------------------

    def list_bins(self, tenant_id: str, key_id: str, labels: Sequence[str] | None) -> list[BinInfo]:
        """Active bins holding ciphertexts, without their occupancy (see :meth:`occupancy`)."""
        sql = (
            "SELECT bin_id, version, label FROM bins WHERE tenant_id=? AND key_id=? "
            "AND state='active' AND version > 0"
        )
        args: list[object] = [tenant_id, key_id]
        if labels is not None:
            if not labels:
                return []
            sql += f" AND label IN ({','.join('?' * len(labels))})"
            args += list(labels)
        return [BinInfo(b, v, lab, ()) for b, v, lab in self._q(sql + " ORDER BY bin_id", args)]

    def occupancy(self, bin_ids: Sequence[int]) -> dict[int, tuple[int, ...]]:
        """Occupied slots of each bin (one indexed query per 500 bins)."""
        out: dict[int, list[int]] = {b: [] for b in bin_ids}
        ids = list(bin_ids)
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            for bin_id, slot in self._q(
                f"SELECT bin_id, slot FROM subjects WHERE bin_id IN ({','.join('?' * len(part))})",
                part,
            ):
                out[bin_id].append(slot)
        return {b: tuple(sorted(v)) for b, v in out.items()}

    def bin_info(self, tenant_id: str, bin_id: int, *, with_occupancy: bool = True) -> BinInfo:
        rows = self._q(
            "SELECT version, label FROM bins WHERE bin_id=? AND tenant_id=? AND state='active'",
            (bin_id, tenant_id),
        )
        if not rows:
            raise NotFound(f"tenant has no bin {bin_id}")
        slots = self.occupancy([bin_id])[bin_id] if with_occupancy else ()
        return BinInfo(bin_id, rows[0][0], rows[0][1], slots)

    def bin_infos(self, tenant_id: str, bin_ids: Sequence[int]) -> list[BinInfo]:
        """Several bins of a tenant (without occupancy); NotFound if any is not the tenant's."""
        ids = [int(b) for b in bin_ids]
        rows = self._q(
            f"SELECT bin_id, version, label FROM bins WHERE tenant_id=? AND state='active' "
            f"AND bin_id IN ({','.join('?' * len(ids))})",
            [tenant_id, *ids],
        )
        found = {b: BinInfo(b, v, lab, ()) for b, v, lab in rows}
        missing = [b for b in ids if b not in found]
        if missing:
            raise NotFound(f"tenant has no bin {missing[0]}")
        return [found[b] for b in ids]

    def bin_owner(self, bin_id: int) -> tuple[str, str]:
        """(tenant id, key id) of a bin."""
        rows = self._q("SELECT tenant_id, key_id FROM bins WHERE bin_id=?", (bin_id,))
        if not rows:
            raise NotFound(f"no bin {bin_id}")
        return str(rows[0][0]), str(rows[0][1])

    def handles_for(self, bin_id: int, slots: Sequence[int]) -> list[str]:
        found: dict[int, str] = {}
        wanted = list(slots)
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            found.update(
                self._q(
                    f"SELECT slot, handle FROM subjects WHERE bin_id=? AND slot IN ({','.join('?' * len(part))})",
                    [bin_id, *part],
                )
            )
        return [found.get(s, "") for s in slots]

    def subject(self, tenant_id: str, handle: str) -> SubjectRef:
        rows = self._q(
            "SELECT b.key_id, s.bin_id, s.slot FROM subjects s JOIN bins b ON s.bin_id=b.bin_id "
            "WHERE s.tenant_id=? AND s.handle=? AND b.state='active'",
            (tenant_id, handle),
        )
        if not rows:
            raise NotFound("unknown subject")
        key_id, bin_id, slot = rows[0]
        return SubjectRef(tenant_id, handle, key_id, bin_id, slot)

    def load_bin_data(self, bin_id: int) -> BinData:
        return load_bin_data(self._conn, bin_id, self._lock)

    # -- staging area ----------------------------------------------------

    def stage_template(
        self, tenant_id: str, key_id: str, label: str, handle: str, blob: bytes, max_staged: int
    ) -> int:
        """Keep one staged template durably; its handle must be new to the tenant."""
        with self._tx() as c:
            (n,) = c.execute(
                "SELECT COUNT(*) FROM staged WHERE tenant_id=? AND key_id=?", (tenant_id, key_id)
            ).fetchone()
            if n >= max_staged:
                raise ResourceExhausted(
                    f"the staging area holds {n} templates (the limit); enroll into a bin directly"
                )
            if c.execute(
                "SELECT 1 FROM subjects WHERE tenant_id=? AND handle=?", (tenant_id, handle)
            ).fetchone():
                raise AlreadyExists("a subject handle is already enrolled; delete it first or use another id")
            try:
                cur = c.execute(
                    "INSERT INTO staged (tenant_id, key_id, label, handle, blob, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (tenant_id, key_id, label, handle, blob, time.time()),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(
                    "a subject handle is already enrolled; delete it first or use another id"
                ) from None
            return int(cur.lastrowid or 0)

    def staged_templates(
        self, tenant_id: str, key_id: str, labels: Sequence[str] | None = None, *, limit: int = 0
    ) -> list[StagedRecord]:
        """Staged templates of a key (of the given labels), oldest first, with their ciphertexts."""
        sql = "SELECT staged_id, handle, label, blob FROM staged WHERE tenant_id=? AND key_id=?"
        args: list[object] = [tenant_id, key_id]
        if labels is not None:
            sql += f" AND label IN ({','.join('?' * len(labels))})"
            args.extend(labels)
        sql += " ORDER BY staged_id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [
            StagedRecord(int(i), tenant_id, key_id, str(lab), str(h), bytes(b))
            for i, h, lab, b in self._q(sql, args)
        ]

    def search_view(
        self, tenant_id: str, key_id: str, labels: Sequence[str] | None
    ) -> tuple[list[BinInfo], list[StagedRecord]]:
        """Bins and staged templates to search, read in one snapshot.

        A fold moves a template from the staging area into a bin in one
        transaction; reading both in one snapshot means a query sees it in
        one place or the other (or, if the bin is scored at a newer version
        than listed, in both: the client keeps the best score per handle),
        never in neither.
        """
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                staged = self.staged_templates(tenant_id, key_id, labels)
                bins = self.list_bins(tenant_id, key_id, labels)
            finally:
                self._conn.execute("COMMIT")
        return bins, staged

    def staged_subject(self, tenant_id: str, handle: str) -> StagedRecord | None:
        rows = self._q(
            "SELECT staged_id, key_id, label, blob FROM staged WHERE tenant_id=? AND handle=?",
            (tenant_id, handle),
        )
        if not rows:
            return None
        i, key_id, label, blob = rows[0]
        return StagedRecord(int(i), tenant_id, str(key_id), str(label), handle, bytes(blob))

    def delete_staged(self, tenant_id: str, handle: str) -> None:
        """Forget a staged subject and its photos."""
        with self._tx() as c:
            gone = c.execute(
                "DELETE FROM staged WHERE tenant_id=? AND handle=?", (tenant_id, handle)
            ).rowcount
            if gone != 1:
                raise NotFound("unknown subject")
            c.execute("DELETE FROM photos WHERE tenant_id=? AND handle=?", (tenant_id, handle))

    # -- maintenance ---------------------------------------------------

    def compact(self, bin_id: int, merged: bytes, upto_seq: int) -> None:
        with self._tx() as c:
            row = c.execute("SELECT base_seq FROM bins WHERE bin_id=?", (bin_id,)).fetchone()
            if row is None or row[0] >= upto_seq:
                return  # deleted, or already compacted further
            c.execute("UPDATE bins SET base=?, base_seq=? WHERE bin_id=?", (merged, upto_seq, bin_id))
            c.execute("DELETE FROM bin_deltas WHERE bin_id=? AND seq<=?", (bin_id, upto_seq))

    def repack_delete(
        self, tenant_id: str, handle: str, bin_id: int, expected_version: int, blob: bytes
    ) -> int:
        with self._tx() as c:
            row = c.execute(
                "SELECT s.bin_id, b.version FROM subjects s JOIN bins b ON s.bin_id=b.bin_id "
                "WHERE s.tenant_id=? AND s.handle=?",
                (tenant_id, handle),
            ).fetchone()
            if row is None:
                raise NotFound("unknown subject")
            if row[0] != bin_id:
                raise FailedPrecondition("the subject is not in that bin; fetch its bin again")
            if row[1] != expected_version:
                raise FailedPrecondition("the bin changed since it was fetched; fetch it again")
            version = row[1] + 1
            c.execute(
                "UPDATE bins SET base=?, base_seq=?, version=? WHERE bin_id=?",
                (blob, version, version, bin_id),
            )
            c.execute("DELETE FROM bin_deltas WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM subjects WHERE tenant_id=? AND handle=?", (tenant_id, handle))
            c.execute("DELETE FROM photos WHERE tenant_id=? AND handle=?", (tenant_id, handle))
        return int(version)

    # -- photos ----------------------------------------------------------

    def add_photo(
        self, tenant_id: str, handle: str, sealed: bytes, protection: str, *, replaces: str = ""
    ) -> str:
        """Keep a sealed photo; with ``replaces``, delete that photo of the tenant in the same transaction."""
        photo_id = secrets.token_urlsafe(16)
        with self._tx() as c:
            row = c.execute(
                "SELECT 1 FROM subjects s JOIN bins b ON s.bin_id=b.bin_id "
                "WHERE s.tenant_id=? AND s.handle=? AND b.state='active'",
                (tenant_id, handle),
            ).fetchone()
            if row is None and not c.execute(
                "SELECT 1 FROM staged WHERE tenant_id=? AND handle=?", (tenant_id, handle)
            ).fetchone():
                raise NotFound("unknown subject: enroll it before keeping its photos")
            if replaces and not c.execute(
                "DELETE FROM photos WHERE tenant_id=? AND photo_id=?", (tenant_id, replaces)
            ).rowcount:
                raise NotFound("no such photo to replace")
            c.execute(
                "INSERT INTO photos VALUES (?, ?, ?, ?, ?, ?)",
                (photo_id, tenant_id, handle, sealed, protection, time.time()),
            )
        return photo_id

    def list_photos(self, tenant_id: str, handle: str) -> list[str]:
        return [
            r[0]
            for r in self._q(
                "SELECT photo_id FROM photos WHERE tenant_id=? AND handle=? ORDER BY created_at",
                (tenant_id, handle),
            )
        ]

    def get_photo(self, tenant_id: str, photo_id: str) -> tuple[str, bytes, str]:
        rows = self._q(
            "SELECT handle, sealed, protection FROM photos WHERE tenant_id=? AND photo_id=?",
            (tenant_id, photo_id),
        )
        if not rows:
            raise NotFound("unknown photo")
        return str(rows[0][0]), bytes(rows[0][1]), str(rows[0][2])


def load_bin_data(conn: sqlite3.Connection, bin_id: int, lock: threading.RLock | None = None) -> BinData:
    """Read a bin's base and pending deltas in one consistent snapshot."""

    def read() -> BinData:
        conn.execute("BEGIN")
        try:
            row = conn.execute(
                "SELECT tenant_id, key_id, version, base, base_seq FROM bins WHERE bin_id=?",
                (bin_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no bin {bin_id}")
            deltas = conn.execute(
                "SELECT seq, blob FROM bin_deltas WHERE bin_id=? AND seq>? ORDER BY seq",
                (bin_id, row[4]),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return BinData(bin_id, row[0], row[1], row[2], row[3], row[4], tuple(deltas))

    if lock is None:
        return read()
    with lock:
        return read()


class BinReader:
    """A read-only connection for scoring workers (WAL readers never block the writer)."""

    def __init__(self, path: Path | str) -> None:
        self._conn = _connect(Path(path), readonly=True)

    def load(self, bin_id: int) -> BinData:
        return load_bin_data(self._conn, bin_id)

    def version(self, bin_id: int) -> int | None:
        row = self._conn.execute("SELECT version FROM bins WHERE bin_id=?", (bin_id,)).fetchone()
        return None if row is None else int(row[0])

    def key_context(self, tenant_id: str, key_id: str) -> tuple[bytes, str, bytes | None]:
        row = self._conn.execute(
            "SELECT public_context, fingerprint, center_probe FROM keys WHERE tenant_id=? AND key_id=?",
            (tenant_id, key_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} has no key {key_id!r}")
        return bytes(row[0]), str(row[1]), (bytes(row[2]) if row[2] is not None else None)

    def close(self) -> None:
        self._conn.close()
