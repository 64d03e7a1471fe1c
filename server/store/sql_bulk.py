"""Bulk imports and re-packs of the gallery store (shared SQL).

A bulk stream writes whole bins in a ``staged`` state, invisible to
searches, and flips them to ``active`` in one transaction when the stream
ends. Its subjects wait in ``bulk_subjects``, a table with no index on the
handle, and enter ``subjects`` at activation, sorted by handle: inserting
each bin's 4,096 random handles into the handle index as the bin arrived
dirtied one index page per handle once the gallery was large (a staging
commit took 37 ms at the first bins and 108 ms at a million; 25 s of a
million's import). Each chunk's handles are still looked up as it arrives,
so a taken handle fails the stream early; the index decides at activation
(a handle enrolled meanwhile, or twice in the stream). A re-pack stream
(routing retrained, key rotation) also names the bins it replaces: its
subjects are kept aside (``stream_subjects``) and take over their handles
when the stream activates and the replaced bins go, in the same transaction. Staged bins of a stream that never ended are removed by
``cleanup_staged`` when a store opens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from veilface.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from veilface.server.store.sql_base import Conn, SqlBase, marks
from veilface.server.store.sql_reads import CHUNK

TAKEN = "a subject handle is already enrolled; delete it first or use another id"


class SqlBulk(SqlBase):
    """Bulk-stream methods (see :class:`~veilface.server.store.base.GalleryStore`)."""

    def _insert_subjects(
        self, c: Conn, tenant_id: str, bin_id: int, handles: Sequence[str], slots: Sequence[int]
    ) -> None:
        """Subjects of a bin; AlreadyExists if a handle is taken (in a bin or staged)."""
        self._check_free(c, tenant_id, handles, tables=("staged",))
        try:
            c.executemany(
                "INSERT INTO subjects VALUES (?, ?, ?, ?)",
                [(tenant_id, h, bin_id, s) for h, s in zip(handles, slots, strict=True)],
            )
        except self.integrity_errors:
            raise AlreadyExists(TAKEN) from None

    def _check_free(self, c: Conn, tenant_id: str, handles: Sequence[str], tables: Sequence[str]) -> None:
        """AlreadyExists if one of ``handles`` is in one of ``tables`` (``subjects``, ``staged``)."""
        hs = list(handles)
        for table in tables:
            for start in range(0, len(hs), CHUNK):
                part = hs[start : start + CHUNK]
                if c.execute(
                    f"SELECT 1 FROM {table} WHERE tenant_id=? AND handle IN ({marks(len(part))})",
                    [tenant_id, *part],
                ).fetchone():
                    raise AlreadyExists(TAKEN)

    def _activate_subjects(self, c: Conn, bins: Sequence[int]) -> None:
        """Move a bulk stream's subjects into ``subjects``, sorted by handle (one pass of its index)."""
        if not bins:
            return
        where = f"bin_id IN ({marks(len(bins))})"
        try:
            c.execute(
                "INSERT INTO subjects (tenant_id, handle, bin_id, slot) "
                "SELECT b.tenant_id, s.handle, s.bin_id, s.slot FROM bulk_subjects s "
                f"JOIN bins b ON b.bin_id=s.bin_id WHERE s.{where} ORDER BY s.handle",
                list(bins),
            )
        except self.integrity_errors:
            raise AlreadyExists(TAKEN) from None
        tenants = [
            str(t)
            for (t,) in c.execute(f"SELECT DISTINCT tenant_id FROM bins WHERE {where}", list(bins))
        ]
        # Staged single enrollments are few: look each up in subjects (written
        # as EXISTS so that the planner walks staged, not the tenant's subjects).
        for tenant_id in tenants:
            if c.execute(
                "SELECT 1 FROM staged s WHERE s.tenant_id=? AND EXISTS (SELECT 1 FROM subjects j "
                f"WHERE j.tenant_id=s.tenant_id AND j.handle=s.handle AND j.{where}) LIMIT 1",
                [tenant_id, *bins],
            ).fetchone():
                raise AlreadyExists(TAKEN)
        c.execute(f"DELETE FROM bulk_subjects WHERE {where}", list(bins))

    @staticmethod
    def _delete_bins(c: Conn, bin_ids: Sequence[int]) -> None:
        for bin_id in bin_ids:
            c.execute("DELETE FROM subjects WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM bulk_subjects WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM stream_subjects WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM bin_deltas WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM reservations WHERE bin_id=?", (bin_id,))
            c.execute("DELETE FROM bins WHERE bin_id=?", (bin_id,))

    def _stream_tenants(self, c: Conn, stream_id: str) -> list[str]:
        return [
            str(t)
            for (t,) in c.execute(
                "SELECT DISTINCT tenant_id FROM bins WHERE stream_id=? ORDER BY tenant_id", (stream_id,)
            ).fetchall()
        ]

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
            self._lock_tenant(c, tenant_id)
            self._note_stream(c, stream_id)
            (bin_id,) = c.execute(
                "INSERT INTO bins (tenant_id, key_id, label, state, stream_id, version, base, "
                "base_seq, created_at) VALUES (?, ?, ?, 'staged', ?, 1, ?, 1, ?) RETURNING bin_id",
                (tenant_id, key_id, label, stream_id, blob, time.time()),
            ).fetchone()
            bin_id = int(bin_id)
            if not repack:
                self._check_free(c, tenant_id, handles, tables=("subjects", "staged"))
                c.executemany(
                    "INSERT INTO bulk_subjects (bin_id, handle, slot) VALUES (?, ?, ?)",
                    [(bin_id, h, s) for h, s in zip(handles, slots, strict=True)],
                )
            else:
                try:
                    c.executemany(
                        "INSERT INTO stream_subjects VALUES (?, ?, ?, ?)",
                        [(stream_id, bin_id, h, s) for h, s in zip(handles, slots, strict=True)],
                    )
                except self.integrity_errors:
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
            for t in sorted({tenant_id, *self._stream_tenants(c, stream_id)} - {""}):
                self._lock_tenant(c, t)
            if replaces:
                self._swap_out(c, stream_id, tenant_id, replaces, renew_handles)
            bins = [
                int(r[0])
                for r in c.execute(
                    "SELECT bin_id FROM bins WHERE stream_id=? AND state='staged' ORDER BY bin_id",
                    (stream_id,),
                ).fetchall()
            ]
            if not replaces:
                self._activate_subjects(c, bins)
            # stream_id stays: a row rewritten at its own size keeps its blob's
            # pages (SQLite rewrites a row whose record changes size, its
            # 4 MB base included: a million templates' activation wrote 1 GB).
            c.execute(
                "UPDATE bins SET state='active' WHERE stream_id=? AND state='staged'",
                (stream_id,),
            )
            subjects = 0
            for b in bins:
                subjects += int(
                    c.execute("SELECT COUNT(*) FROM subjects WHERE bin_id=?", (b,)).fetchone()[0]
                )
        return bins, subjects

    def _swap_out(
        self,
        c: Conn,
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
                str(h)
                for (h,) in c.execute("SELECT handle FROM subjects WHERE bin_id=?", (bin_id,)).fetchall()
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
        elif missing := old_handles - {str(h) for _, h, _ in new}:
            raise FailedPrecondition(
                f"the re-pack leaves out {len(missing)} subjects of the bins it replaces"
            )
        self._delete_bins(c, [b for b, _ in replaces])
        for bin_id, handle, slot in new:
            self._insert_subjects(c, tenant_id, int(bin_id), [str(handle)], [int(slot)])
        c.execute("DELETE FROM stream_subjects WHERE stream_id=?", (stream_id,))

    def abort_stream(self, stream_id: str) -> None:
        with self._tx() as c:
            for t in self._stream_tenants(c, stream_id):
                self._lock_tenant(c, t)
            bins = [
                int(r[0])
                for r in c.execute(
                    "SELECT bin_id FROM bins WHERE stream_id=? AND state='staged'", (stream_id,)
                ).fetchall()
            ]
            self._delete_bins(c, bins)
