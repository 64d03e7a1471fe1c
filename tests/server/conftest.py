"""A real server process per test module, on a free port, with a fresh SQLite file."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from veilface.bench.synthetic import SyntheticFaces
from veilface.client.admin import AdminClient
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.server.launcher import LocalServer


def eventually(
    check: Callable[[], bool], timeout_s: float = 20.0, interval_s: float = 0.05
) -> bool:
    """Poll ``check`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return False


def create_tenant(srv: LocalServer, tenant_id: str) -> str:
    """A new tenant on ``srv``; its first API token (every scope)."""
    with AdminClient(srv.target, token=srv.admin_token) as admin:
        return admin.create_tenant(tenant_id).api_token


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    db = tmp_path_factory.mktemp("srv") / "gallery.db"
    with LocalServer(db) as srv:
        yield srv


@pytest.fixture(scope="module")
def faces() -> tuple[np.ndarray, list[str], np.ndarray]:
    """300 identities: gallery templates, their names, and a second capture of each."""
    emb, labels = SyntheticFaces().sample(300, 2, seed=11)
    return emb[0::2], [str(x) for x in labels[0::2]], emb[1::2]


def make_client(srv: LocalServer, tenant_id: str, *, workers: int = 0) -> VeilClient:
    token = create_tenant(srv, tenant_id)
    state = TenantState.new(tenant_id, dim=128)
    client = VeilClient(srv.target, state, token=token, encrypt_workers=workers)
    client.register_key()
    return client


def plaintext_top1(gallery: np.ndarray, probe: np.ndarray) -> int:
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return int(np.argmax(g @ (probe / np.linalg.norm(probe))))


def tmp_state_path(tmp: Path) -> Path:
    return tmp / "tenant.vfk"
