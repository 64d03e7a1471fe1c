"""What only the PostgreSQL store has: schema versions, several front-ends, a database that goes away."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from tests.postgres_server import TestPostgres, free_port
from tests.server.store.test_store_contract import BLOB, enroll, tenant_with_key, token
from veilface.errors import FailedPrecondition, NotFound, Unavailable
from veilface.server.store import postgres_schema
from veilface.server.store.factory import open_reader
from veilface.server.store.postgres_store import PostgresStore


@pytest.fixture
def url(postgres: TestPostgres) -> str:
    return postgres.fresh_url()


def _versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [int(r[0]) for r in conn.execute(b"SELECT version FROM schema_version ORDER BY version")]


def test_schema_is_created_once_and_versioned(url: str) -> None:
    PostgresStore(url).close()
    PostgresStore(url).close()
    assert _versions(url) == [v for v, _ in postgres_schema.MIGRATIONS]


def test_a_later_step_is_applied_on_open(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    PostgresStore(url).close()
    step = (postgres_schema.latest_version() + 1, "ALTER TABLE photos ADD COLUMN note TEXT")
    monkeypatch.setattr(postgres_schema, "MIGRATIONS", (*postgres_schema.MIGRATIONS, step))
    s = PostgresStore(url)
    s.close()
    assert _versions(url)[-1] == step[0]
    with psycopg.connect(url) as conn:
        conn.execute(b"SELECT note FROM photos")  # the column is there


def test_a_newer_schema_is_refused(url: str) -> None:
    PostgresStore(url).close()
    with psycopg.connect(url) as conn:
        conn.execute(b"INSERT INTO schema_version VALUES (999, 0)")
    with pytest.raises(FailedPrecondition, match="schema 999") as err:
        PostgresStore(url)
    assert "upgrade veilface" in err.value.message


def test_front_ends_starting_together_migrate_once(url: str) -> None:
    stores: list[PostgresStore] = []
    threads = [threading.Thread(target=lambda: stores.append(PostgresStore(url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert len(stores) == 3 and _versions(url) == [v for v, _ in postgres_schema.MIGRATIONS]


def test_an_unreachable_url_is_named_without_its_password() -> None:
    dead = f"postgresql://veilface:s3cret-pw@127.0.0.1:{free_port()}/veilface"
    with pytest.raises(Unavailable) as err:
        PostgresStore(dead)
    assert "s3cret-pw" not in err.value.message
    assert "postgresql://veilface:***@127.0.0.1:" in err.value.message


def test_a_wrong_password_is_named_without_it(postgres: TestPostgres) -> None:
    wrong = postgres.url.replace(postgres.password, "not-the-password")
    with pytest.raises(Unavailable) as err:
        PostgresStore(wrong)
    assert "not-the-password" not in err.value.message and "password" in err.value.message


def test_serve_refuses_an_unreachable_url_at_start(tmp_path: Path) -> None:
    dead = f"postgresql://veilface:s3cret-pw@127.0.0.1:{free_port()}/veilface"
    proc = subprocess.run(
        [sys.executable, "-m", "veilface.cli.main", "serve", "--db", dead, "--port", "0",
         "--workers", "1", "--admin-token-file", str(tmp_path / "admin")],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach the PostgreSQL database postgresql://veilface:***@127.0.0.1" in proc.stderr
    assert "s3cret-pw" not in proc.stderr + proc.stdout


def test_two_front_ends_never_share_a_slot(url: str) -> None:
    """Two stores on one database (two servers) reserving and enrolling at once."""
    a, b = PostgresStore(url), PostgresStore(url)
    try:
        tenant_with_key(a)
        errors: list[BaseException] = []

        def work(store: PostgresStore, name: str) -> None:
            try:
                for i in range(15):
                    res = store.reserve("acme", "k1", "", 2, 8, 60.0)
                    store.commit_enroll(res, [f"{name}{i}a", f"{name}{i}b"], BLOB)
            except BaseException as exc:  # noqa: BLE001 - the test asserts there is none
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s, n)) for s, n in ((a, "a"), (b, "b"), (a, "c"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        total = 0
        for summary in b.key_bins("acme", "k1"):
            data = b.load_bin_data(summary.bin_id)
            subjects = b.bin_subjects(summary.bin_id)
            assert len({slot for slot, _ in subjects}) == len(subjects) == summary.subjects
            assert [seq for seq, _ in data.deltas] == list(range(1, data.version + 1))
            total += len(subjects)
        assert total == 90
    finally:
        a.close()
        b.close()


def test_a_live_front_ends_stream_survives_another_starting(url: str) -> None:
    a = PostgresStore(url)
    tenant_with_key(a)
    staged = a.stage_bin("acme", "k1", "", "st", ["x"], [0], BLOB)
    PostgresStore(url).close()  # another front-end starts: a's stream is alive
    assert a.activate_stream("st", "acme") == ([staged], 1)
    dead = a.stage_bin("acme", "k1", "", "st2", ["y"], [0], BLOB)
    a._owner_conn.close()  # a's session ends (as when its process is killed)
    c = PostgresStore(url)
    try:
        with pytest.raises(NotFound):
            c.load_bin_data(dead)
    finally:
        c.close()
        a.close()


def test_a_restarted_connection_is_replaced(postgres: TestPostgres, url: str) -> None:
    """The database drops every session (a restart): the next calls reconnect."""
    s = PostgresStore(url)
    reader = open_reader(url)
    try:
        tenant_with_key(s)
        b = enroll(s, ["a"])
        assert reader.version(b) == 1
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute(
                b"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                b"WHERE datname='veilface' AND pid <> pg_backend_pid()"
            )
        assert reader.version(b) == 1
        assert s.bin_subjects(b) == [(0, "a")]
        s.add_token(token("acme", 1), max_active=4)
        s.stage_bin("acme", "k1", "", "after", ["z"], [0], BLOB)  # the owner lock is taken again
        assert s.activate_stream("after", "acme")[1] == 1
    finally:
        reader.close()
        s.close()


def test_ciphertext_columns_skip_compression(url: str) -> None:
    """v2: incompressible blobs are stored out of line without pglz (attstorage 'e')."""
    PostgresStore(url).close()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            b"SELECT c.relname, a.attname, a.attstorage FROM pg_attribute a "
            b"JOIN pg_class c ON a.attrelid = c.oid "
            b"WHERE c.relnamespace = current_schema()::regnamespace "
            b"AND a.attname IN ('public_context', 'base', 'blob', 'sealed') AND c.relkind = 'r'"
        ).fetchall()
    storage = {(t, col): s for t, col, s in rows}
    for key in [("keys", "public_context"), ("bins", "base"), ("bin_deltas", "blob"),
                ("photos", "sealed"), ("staged", "blob")]:
        assert storage[key] == "e", key
