"""Reads of the gallery store: bins, subjects, staged templates (shared SQL)."""

from __future__ import annotations

from collections.abc import Sequence

from veilface.errors import NotFound
from veilface.server.store.records import (
    BinData,
    BinInfo,
    BinSummary,
    GalleryUsage,
    KeyBins,
    StagedRecord,
    SubjectRef,
)
from veilface.server.store.sql_base import Conn, SqlBase, marks

#: Values per ``IN (...)`` list (SQLite allows 32,766 host parameters; PostgreSQL 65,535).
CHUNK = 500


def read_bin_data(c: Conn, bin_id: int) -> BinData:
    """A bin's base and pending deltas; ``c`` must be a snapshot (both reads see one state)."""
    row = c.execute(
        "SELECT tenant_id, key_id, version, base, base_seq FROM bins WHERE bin_id=?", (bin_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no bin {bin_id}")
    deltas = c.execute(
        "SELECT seq, blob FROM bin_deltas WHERE bin_id=? AND seq>? ORDER BY seq", (bin_id, row[4])
    ).fetchall()
    base = None if row[3] is None else bytes(row[3])
    return BinData(
        bin_id,
        str(row[0]),
        str(row[1]),
        int(row[2]),
        base,
        int(row[4]),
        tuple((int(s), bytes(b)) for s, b in deltas),
    )


def read_key_context(c: Conn, tenant_id: str, key_id: str) -> tuple[bytes, str, bytes | None]:
    row = c.execute(
        "SELECT public_context, fingerprint, center_probe FROM keys WHERE tenant_id=? AND key_id=?",
        (tenant_id, key_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"tenant {tenant_id!r} has no key {key_id!r}")
    return bytes(row[0]), str(row[1]), (bytes(row[2]) if row[2] is not None else None)


def read_version(c: Conn, bin_id: int) -> int | None:
    row = c.execute("SELECT version FROM bins WHERE bin_id=?", (bin_id,)).fetchone()
    return None if row is None else int(row[0])


def _staged(
    c: Conn, tenant_id: str, key_id: str, labels: Sequence[str] | None, limit: int
) -> list[StagedRecord]:
    sql = "SELECT staged_id, handle, label, blob FROM staged WHERE tenant_id=? AND key_id=?"
    args: list[object] = [tenant_id, key_id]
    if labels is not None:
        if not labels:
            return []
        sql += f" AND label IN ({marks(len(labels))})"
        args.extend(labels)
    sql += " ORDER BY staged_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    return [
        StagedRecord(int(i), tenant_id, key_id, str(lab), str(h), bytes(b))
        for i, h, lab, b in c.execute(sql, args).fetchall()
    ]


def _bins(c: Conn, tenant_id: str, key_id: str, labels: Sequence[str] | None) -> list[BinInfo]:
    sql = (
        "SELECT bin_id, version, label FROM bins WHERE tenant_id=? AND key_id=? "
        "AND state='active' AND version > 0"
    )
    args: list[object] = [tenant_id, key_id]
    if labels is not None:
        if not labels:
            return []
        sql += f" AND label IN ({marks(len(labels))})"
        args += list(labels)
    rows = c.execute(sql + " ORDER BY bin_id", args).fetchall()
    return [BinInfo(int(b), int(v), str(lab), ()) for b, v, lab in rows]


class SqlReads(SqlBase):
    """Read methods of the gallery store (see :class:`~veilface.server.store.base.GalleryStore`)."""

    def tenant_exists(self, tenant_id: str) -> bool:
        return bool(self._q("SELECT 1 FROM tenants WHERE tenant_id=?", (tenant_id,)))

    def list_bins(self, tenant_id: str, key_id: str, labels: Sequence[str] | None) -> list[BinInfo]:
        """Active bins holding ciphertexts, without their occupancy (see :meth:`occupancy`)."""
        with self._read() as c:
            return _bins(c, tenant_id, key_id, labels)

    def staged_templates(
        self, tenant_id: str, key_id: str, labels: Sequence[str] | None = None, *, limit: int = 0
    ) -> list[StagedRecord]:
        """Staged templates of a key (of the given labels), oldest first, with their ciphertexts."""
        with self._read() as c:
            return _staged(c, tenant_id, key_id, labels, limit)

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
        with self._snapshot() as c:
            staged = _staged(c, tenant_id, key_id, labels, 0)
            bins = _bins(c, tenant_id, key_id, labels)
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

    def gallery_usage(self, *, count_templates: bool = False) -> GalleryUsage:
        """Bins per key (every tenant, every state) and, if asked, templates, in one snapshot."""
        with self._snapshot() as c:
            keys = tuple(
                KeyBins(str(t), str(k), int(n))
                for t, k, n in c.execute(
                    "SELECT tenant_id, key_id, COUNT(*) FROM bins "
                    "GROUP BY tenant_id, key_id ORDER BY tenant_id, key_id"
                ).fetchall()
            )
            templates = -1
            if count_templates:
                (subjects,) = c.execute("SELECT COUNT(*) FROM subjects").fetchone()
                (streaming,) = c.execute("SELECT COUNT(*) FROM bulk_subjects").fetchone()
                (staged,) = c.execute("SELECT COUNT(*) FROM staged").fetchone()
                templates = int(subjects) + int(streaming) + int(staged)
        return GalleryUsage(keys, templates)

    def bin_subjects(self, bin_id: int) -> list[tuple[int, str]]:
        """(slot, handle) of a bin's subjects, by slot."""
        return [
            (int(s), str(h))
            for s, h in self._q(
                "SELECT slot, handle FROM subjects WHERE bin_id=? ORDER BY slot", (bin_id,)
            )
        ]

    def occupancy(self, bin_ids: Sequence[int]) -> dict[int, tuple[int, ...]]:
        """Occupied slots of each bin (one indexed query per 500 bins)."""
        out: dict[int, list[int]] = {int(b): [] for b in bin_ids}
        ids = list(out)
        with self._read() as c:
            for start in range(0, len(ids), CHUNK):
                part = ids[start : start + CHUNK]
                for bin_id, slot in c.execute(
                    f"SELECT bin_id, slot FROM subjects WHERE bin_id IN ({marks(len(part))})", part
                ).fetchall():
                    out[int(bin_id)].append(int(slot))
        return {b: tuple(sorted(v)) for b, v in out.items()}

    def bin_info(self, tenant_id: str, bin_id: int, *, with_occupancy: bool = True) -> BinInfo:
        rows = self._q(
            "SELECT version, label FROM bins WHERE bin_id=? AND tenant_id=? AND state='active'",
            (bin_id, tenant_id),
        )
        if not rows:
            raise NotFound(f"tenant has no bin {bin_id}")
        slots = self.occupancy([bin_id])[bin_id] if with_occupancy else ()
        return BinInfo(int(bin_id), int(rows[0][0]), str(rows[0][1]), slots)

    def bin_infos(self, tenant_id: str, bin_ids: Sequence[int]) -> list[BinInfo]:
        """Several bins of a tenant (without occupancy); NotFound if any is not the tenant's."""
        ids = [int(b) for b in bin_ids]
        found: dict[int, BinInfo] = {}
        with self._read() as c:
            for start in range(0, len(ids), CHUNK):
                part = ids[start : start + CHUNK]
                for b, v, lab in c.execute(
                    "SELECT bin_id, version, label FROM bins WHERE tenant_id=? AND state='active' "
                    f"AND bin_id IN ({marks(len(part))})",
                    [tenant_id, *part],
                ).fetchall():
                    found[int(b)] = BinInfo(int(b), int(v), str(lab), ())
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
        wanted = [int(s) for s in slots]
        with self._read() as c:
            for start in range(0, len(wanted), CHUNK):
                part = wanted[start : start + CHUNK]
                for s, h in c.execute(
                    f"SELECT slot, handle FROM subjects WHERE bin_id=? AND slot IN ({marks(len(part))})",
                    [bin_id, *part],
                ).fetchall():
                    found[int(s)] = str(h)
        return [found.get(s, "") for s in wanted]

    def subject(self, tenant_id: str, handle: str) -> SubjectRef:
        rows = self._q(
            "SELECT b.key_id, s.bin_id, s.slot FROM subjects s JOIN bins b ON s.bin_id=b.bin_id "
            "WHERE s.tenant_id=? AND s.handle=? AND b.state='active'",
            (tenant_id, handle),
        )
        if not rows:
            raise NotFound("unknown subject")
        key_id, bin_id, slot = rows[0]
        return SubjectRef(tenant_id, handle, str(key_id), int(bin_id), int(slot))

    def load_bin_data(self, bin_id: int) -> BinData:
        with self._snapshot() as c:
            return read_bin_data(c, bin_id)

    def list_photos(self, tenant_id: str, handle: str) -> list[str]:
        return [
            str(r[0])
            for r in self._q(
                "SELECT photo_id FROM photos WHERE tenant_id=? AND handle=? ORDER BY created_at, photo_id",
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
