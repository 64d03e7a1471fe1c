"""Every store test runs on each implementation: SQLite (a file) and PostgreSQL (a real server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres_server import TestPostgres
from veilface.server.store.base import GalleryStore
from veilface.server.store.factory import open_store


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ``--db`` value of an empty store of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "gallery.db")
    pg: TestPostgres = request.getfixturevalue("postgres")
    return pg.fresh_url()


@pytest.fixture
def store(store_url: str) -> Iterator[GalleryStore]:
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()
