"""A process SIGKILLed in the middle of a store transaction leaves none of it (SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.server.store.test_store_contract import BLOB, tenant_with_key
from veilface.server.store.factory import open_store

# Runs in a child: opens the store, and SIGKILLs itself half-way through a write,
# after its first statements ran inside the transaction and before the commit.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from veilface.server.store.factory import open_store
    from veilface.server.store.sql_bulk import SqlBulk

    url, what = sys.argv[1], sys.argv[2]
    store = open_store(url)
    # enroll: the subjects are written, the bin's delta and version not yet;
    # bulk: the staged bin is written, its subjects not yet
    name = "_insert_subjects" if what == "enroll" else "_check_free"
    real = getattr(SqlBulk, name)

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(SqlBulk, name, write_then_die)
    if what == "enroll":
        res = store.reserve("acme", "k1", "", 2, 8, 60.0)
        print(res.bin_id, flush=True)
        store.commit_enroll(res, ["x", "y"], b"never")
    else:
        store.stage_bin("acme", "k1", "", "cut", ["x", "y"], [0, 1], b"never")
    """
)


def _run_child(url: str, what: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, url, what], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == -9, proc.stderr  # it died by SIGKILL, inside the transaction
    return proc.stdout


def test_a_killed_enrollment_leaves_nothing(store_url: str) -> None:
    s = open_store(store_url)
    tenant_with_key(s)
    res = s.reserve("acme", "k1", "", 1, 8, 60.0)
    s.commit_enroll(res, ["kept"], BLOB)
    s.close()
    bin_id = int(_run_child(store_url, "enroll").split()[0])
    s = open_store(store_url)
    try:
        assert bin_id == res.bin_id
        data = s.load_bin_data(bin_id)
        assert data.version == 1 and [seq for seq, _ in data.deltas] == [1]
        assert s.bin_subjects(bin_id) == [(0, "kept")]  # no subject of the killed write
        res2 = s.reserve("acme", "k1", "", 2, 8, 60.0)
        assert s.commit_enroll(res2, ["x", "y"], BLOB) == 2  # its handles were never taken
    finally:
        s.close()


def test_a_killed_bulk_write_leaves_nothing(store_url: str) -> None:
    s = open_store(store_url)
    tenant_with_key(s)
    s.close()
    _run_child(store_url, "bulk")
    s = open_store(store_url)
    try:
        assert s.key_bins("acme", "k1") == []
        s.stage_bin("acme", "k1", "", "again", ["x", "y"], [0, 1], BLOB)  # handles free
    finally:
        s.close()
