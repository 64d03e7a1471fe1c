"""``--db`` values: which store they name, and how they appear in logs (no password)."""

from __future__ import annotations

from pathlib import Path

import pytest

from veilface.errors import InvalidArgument
from veilface.server.config import ServerSettings
from veilface.server.store.factory import parse_db, redact


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("gallery.db", Path("gallery.db")),
        ("/var/lib/veilface/g.db", Path("/var/lib/veilface/g.db")),
        ("sqlite:///rel/g.db", Path("rel/g.db")),
        ("sqlite:////abs/g.db", Path("/abs/g.db")),
        (Path("p.db"), Path("p.db")),
    ],
)
def test_sqlite_values(value: str | Path, path: Path) -> None:
    url = parse_db(value)
    assert (url.kind, url.path, url.target) == ("sqlite", path, str(path))


def test_postgres_values() -> None:
    for scheme in ("postgresql", "postgres"):
        url = parse_db(f"{scheme}://u:pw@db.example:5433/gallery?sslmode=require")
        assert url.kind == "postgresql" and url.path is None
        assert url.target == f"{scheme}://u:pw@db.example:5433/gallery?sslmode=require"
        assert url.redacted == f"{scheme}://u:***@db.example:5433/gallery?sslmode=require"


@pytest.mark.parametrize("value", ["mysql://u:pw@h/db", "sqlite://relative", ""])
def test_refused_values(value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_db(value)
    assert "pw" not in err.value.message.replace("password", "")


def test_redact() -> None:
    assert redact("postgresql://u:p%40ss@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u@h:1/db") == "postgresql://u@h:1/db"  # nothing to hide
    assert redact("postgresql://u:x@[::1]:5432/db") == "postgresql://u:***@[::1]:5432/db"
    assert redact("postgresql://h/db?user=u&password=secret&x=1") == (
        "postgresql://h/db?user=u&password=***&x=1"
    )


def test_settings_pick_the_store() -> None:
    assert ServerSettings.from_env(db_path=Path("x.db")).store_url().path == Path("x.db")
    pg = ServerSettings.from_env(db_url="postgresql://u:pw@h/db").store_url()
    assert pg.kind == "postgresql" and pg.redacted == "postgresql://u:***@h/db"


def test_a_missing_psycopg_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from veilface.errors import FailedPrecondition
    from veilface.server.store.factory import open_store

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "psycopg" else real(n, *a))
    with pytest.raises(FailedPrecondition, match=r"pip install 'veilface\[server\]'"):
        open_store("postgresql://u:pw@127.0.0.1:1/db")
