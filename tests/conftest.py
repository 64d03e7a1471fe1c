"""Shared fixtures: the data root, and small helpers."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres_server import INSTALL_HINT, TestPostgres, find_binaries

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path | None:
    env = os.environ.get("VEILFACE_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("face data not found: set VEILFACE_DATA to the folder holding lfw/ and orl/")
    return root


@pytest.fixture(scope="session")
def postgres() -> Iterator[TestPostgres]:
    """A real PostgreSQL server on 127.0.0.1 for the session (skips, naming the install, without one)."""
    if importlib.util.find_spec("psycopg") is None or importlib.util.find_spec("psycopg_pool") is None:
        pytest.skip("psycopg not installed: pip install -e '.[server]' (psycopg[binary], psycopg-pool)")
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip(INSTALL_HINT)
    server = TestPostgres(bin_dir).start()
    try:
        yield server
    finally:
        server.stop()
