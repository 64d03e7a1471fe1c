"""Writes of the gallery store: tenants, keys, single enrollment, staging, photos (shared SQL).

Bins hold their ciphertexts as a *base* blob plus *deltas* (one per
single-template contribution since the last compaction): acknowledging a
single enrollment writes only its own contribution, and compaction later
folds the deltas into the base. A *staged* template (fast single
enrollment) is one row of its own, searched until the tenant folds it into
a bin: the fold writes the bin delta and removes the staged row in one
transaction, so a template is always in exactly one of the two.

Every write transaction that checks before it writes (free slots, a bin's
version, a limit, whether a handle is taken) first takes its tenant's lock
(:meth:`SqlBase._lock_tenant`), so the check still holds at commit with
several writers.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence

from veilface.errors import (
    AlreadyExists,
    FailedPrecondition,
    GalleryFull,
    NotFound,
    ResourceExhausted,
)
from veilface.server.store.records import KeyRecord, KeyStats, Reservation, TokenRecord
from veilface.server.store.sql_base import Conn
from veilface.server.store.sql_bulk import TAKEN, SqlBulk
from veilface.server.store.sql_reads import SqlReads
from veilface.server.store.sql_tokens import SqlTokens, insert_token


class SqlGallery(SqlBulk, SqlReads, SqlTokens):
    """The gallery store's SQL; a subclass supplies the connections (:class:`SqlBase`)."""

    # -- tenants and keys -----------------------------------------------

    def _insert_tenant(self, c: Conn, tenant_id: str, created_at: float) -> None:
        c.execute("INSERT INTO tenants (tenant_id, created_at) VALUES (?, ?)", (tenant_id, created_at))

    def create_tenant(self, tenant_id: str, first_token: TokenRecord) -> None:
        """The tenant and its first token, in one transaction."""
        try:
            with self._tx() as c:
                self._insert_tenant(c, tenant_id, first_token.created_at)
                insert_token(c, first_token)
        except self.integrity_errors:
            raise AlreadyExists(f"tenant {tenant_id!r} already exists") from None

    def put_key(self, record: KeyRecord, *, max_keys: int = 0, replaces: str = "") -> KeyRecord:
        with self._tx() as c:
            self._lock_tenant(c, record.tenant_id)
            row = c.execute(
                "SELECT fingerprint FROM keys WHERE tenant_id=? AND key_id=?",
                (record.tenant_id, record.key_id),
            ).fetchone()
            if row is not None:
                if replaces and row[0] == replaces and row[0] != record.fingerprint:
                    c.execute(
                        "UPDATE keys SET public_context=?, fingerprint=? WHERE tenant_id=? AND key_id=?",
                        (record.public_context, record.fingerprint, record.tenant_id, record.key_id),
                    )
                    return record
                if row[0] != record.fingerprint:
                    raise AlreadyExists(
                        f"key {record.key_id!r} is already registered with another context; "
                        "register a new key id to rotate keys"
                    )
                return record
            if max_keys:
                (n,) = c.execute(
                    "SELECT COUNT(*) FROM keys WHERE tenant_id=?", (record.tenant_id,)
                ).fetchone()
                if n >= max_keys:
                    raise ResourceExhausted(
                        f"this tenant has {n} keys, the most allowed ({max_keys}); "
                        "re-use or re-pack into an existing key"
                    )
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
        return KeyRecord(
            tenant_id,
            key_id,
            str(ps),
            int(dim),
            int(presel),
            bytes(ctx),
            str(fp),
            None if center is None else bytes(center),
        )

    def set_center(self, tenant_id: str, key_id: str, blob: bytes) -> None:
        with self._tx() as c:
            self._lock_tenant(c, tenant_id)
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
            "SELECT key_id FROM keys WHERE tenant_id=? ORDER BY created_at, key_id", (tenant_id,)
        ):
            rec = self.get_key(tenant_id, str(key_id))
            with self._snapshot() as c:
                bins, stored = c.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(base)), 0) FROM bins "
                    "WHERE tenant_id=? AND key_id=? AND state='active'",
                    (tenant_id, key_id),
                ).fetchone()
                (deltas,) = c.execute(
                    "SELECT COALESCE(SUM(LENGTH(d.blob)), 0) FROM bin_deltas d JOIN bins b "
                    "ON d.bin_id=b.bin_id WHERE b.tenant_id=? AND b.key_id=? AND b.state='active'",
                    (tenant_id, key_id),
                ).fetchone()
                (subjects,) = c.execute(
                    "SELECT COUNT(*) FROM subjects s JOIN bins b ON s.bin_id=b.bin_id "
                    "WHERE b.tenant_id=? AND b.key_id=? AND b.state='active'",
                    (tenant_id, key_id),
                ).fetchone()
                staged, staged_bytes = c.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(blob)), 0) FROM staged "
                    "WHERE tenant_id=? AND key_id=?",
                    (tenant_id, key_id),
                ).fetchone()
            out.append(
                (
                    rec,
                    KeyStats(
                        int(subjects) + int(staged),
                        int(bins),
                        int(stored) + int(deltas) + int(staged_bytes),
                        int(staged),
                    ),
                )
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
        no_new_bin: str = "",
    ) -> Reservation:
        """Reserve ``count`` free slots in a bin of ``label`` (a new bin when none has room).

        ``max_live`` (0: no cap) bounds the tenant's unexpired reservations;
        ``no_new_bin`` (a message) forbids a new bin (GalleryFull instead).
        A bin created for a reservation that expired unused (version 0, no
        subject, no other reservation) is removed here, so abandoned
        reservations cannot pile up empty bins.
        """
        now = time.time()
        with self._tx() as c:
            self._lock_tenant(c, tenant_id)
            c.execute("DELETE FROM reservations WHERE tenant_id=? AND expires_at < ?", (tenant_id, now))
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
            # Newest first (bulk bins are full, the last one is where the room
            # is), and a bin's slots are read only when its count leaves room:
            # a strict million is 245 full bins of 4,096 subjects each.
            for (bin_id,) in c.execute(
                "SELECT bin_id FROM bins WHERE tenant_id=? AND key_id=? AND label=? "
                "AND state='active' ORDER BY bin_id DESC",
                (tenant_id, key_id, label),
            ).fetchall():
                (taken,) = c.execute("SELECT COUNT(*) FROM subjects WHERE bin_id=?", (bin_id,)).fetchone()
                if capacity - int(taken) < count:
                    continue
                used = {
                    int(s)
                    for (s,) in c.execute("SELECT slot FROM subjects WHERE bin_id=?", (bin_id,)).fetchall()
                }
                for (slots_json,) in c.execute(
                    "SELECT slots FROM reservations WHERE bin_id=?", (bin_id,)
                ).fetchall():
                    used.update(json.loads(slots_json))
                if capacity - len(used) >= count:
                    free = [s for s in range(capacity) if s not in used][:count]
                    chosen = (int(bin_id), free)
                    break
            if chosen is None and no_new_bin:
                raise GalleryFull(no_new_bin)  # rolls back: the expired rows above stay
            if chosen is None:
                (new_bin,) = c.execute(
                    "INSERT INTO bins (tenant_id, key_id, label, state, version, created_at) "
                    "VALUES (?, ?, ?, 'active', 0, ?) RETURNING bin_id",
                    (tenant_id, key_id, label, now),
                ).fetchone()
                chosen = (int(new_bin), list(range(count)))
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
        return Reservation(
            reservation_id, tenant_id, str(key_id), int(bin_id), tuple(json.loads(slots)), float(exp)
        )

    def commit_enroll(
        self, reservation: Reservation, handles: Sequence[str], delta: bytes, staged_id: int = 0
    ) -> int:
        """Write a bin contribution; with ``staged_id``, remove that staged template in the same transaction."""
        with self._tx() as c:
            self._lock_tenant(c, reservation.tenant_id)
            row = c.execute(
                "SELECT expires_at FROM reservations WHERE reservation_id=? AND tenant_id=?",
                (reservation.reservation_id, reservation.tenant_id),
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

    # -- staging area ----------------------------------------------------

    def stage_template(
        self, tenant_id: str, key_id: str, label: str, handle: str, blob: bytes, max_staged: int
    ) -> int:
        """Keep one staged template durably; its handle must be new to the tenant."""
        with self._tx() as c:
            self._lock_tenant(c, tenant_id)
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
                raise AlreadyExists(TAKEN)
            try:
                (staged_id,) = c.execute(
                    "INSERT INTO staged (tenant_id, key_id, label, handle, blob, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) RETURNING staged_id",
                    (tenant_id, key_id, label, handle, blob, time.time()),
                ).fetchone()
            except self.integrity_errors:
                raise AlreadyExists(TAKEN) from None
            return int(staged_id)

    def delete_staged(self, tenant_id: str, handle: str) -> None:
        """Forget a staged subject and its photos."""
        with self._tx() as c:
            self._lock_tenant(c, tenant_id)
            gone = c.execute(
                "DELETE FROM staged WHERE tenant_id=? AND handle=?", (tenant_id, handle)
            ).rowcount
            if gone != 1:
                raise NotFound("unknown subject")
            c.execute("DELETE FROM photos WHERE tenant_id=? AND handle=?", (tenant_id, handle))

    # -- maintenance ---------------------------------------------------

    def compact(self, bin_id: int, merged: bytes, upto_seq: int) -> None:
        with self._tx() as c:
            owner = c.execute("SELECT tenant_id FROM bins WHERE bin_id=?", (bin_id,)).fetchone()
            if owner is None:
                return  # deleted
            self._lock_tenant(c, str(owner[0]))
            row = c.execute("SELECT base_seq FROM bins WHERE bin_id=?", (bin_id,)).fetchone()
            if row is None or row[0] >= upto_seq:
                return  # deleted, or already compacted further
            c.execute("UPDATE bins SET base=?, base_seq=? WHERE bin_id=?", (merged, upto_seq, bin_id))
            c.execute("DELETE FROM bin_deltas WHERE bin_id=? AND seq<=?", (bin_id, upto_seq))

    def repack_delete(
        self, tenant_id: str, handle: str, bin_id: int, expected_version: int, blob: bytes
    ) -> int:
        with self._tx() as c:
            self._lock_tenant(c, tenant_id)
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
            version = int(row[1]) + 1
            c.execute(
                "UPDATE bins SET base=?, base_seq=?, version=? WHERE bin_id=?",
                (blob, version, version, bin_id),
            )
            c.execute("DELETE FROM bin_deltas WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM subjects WHERE tenant_id=? AND handle=?", (tenant_id, handle))
            c.execute("DELETE FROM photos WHERE tenant_id=? AND handle=?", (tenant_id, handle))
        return version

    # -- photos ----------------------------------------------------------

    def add_photo(
        self, tenant_id: str, handle: str, sealed: bytes, protection: str, *, replaces: str = ""
    ) -> str:
        """Keep a sealed photo; with ``replaces``, delete that photo of the tenant in the same transaction."""
        photo_id = secrets.token_urlsafe(16)
        with self._tx() as c:
            self._lock_tenant(c, tenant_id)
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
