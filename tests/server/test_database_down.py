"""A PostgreSQL that goes down under a running server: UNAVAILABLE, then service again."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.postgres_server import TestPostgres
from tests.server.conftest import create_tenant
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.errors import VeilfaceError
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def test_a_database_that_goes_down_is_unavailable_then_back(
    postgres: TestPostgres, tmp_path: Path, faces: tuple[np.ndarray, list[str], np.ndarray]
) -> None:
    gallery, names, _ = faces
    own = TestPostgres(postgres.bin_dir).start()  # its own server: this test stops it
    try:
        with LocalServer(own.url, admin_token_file=tmp_path / "admin", workers=1) as srv:
            token = create_tenant(srv, "down")
            state = TenantState.new("down", dim=128)
            with VeilClient(srv.target, state, token=token, encrypt_workers=0) as c:
                c.register_key()
                c.enroll_many(names[:20], gallery[:20])
                own.halt()
                started = time.monotonic()
                with pytest.raises(VeilfaceError) as err:
                    c.describe()
                assert err.value.status == "UNAVAILABLE", err.value.message
                assert own.password not in err.value.message
                assert time.monotonic() - started < 15  # the pool waits POOL_WAIT_S, not forever
                own.resume()
                assert c.describe().keys[0].subjects == 20  # nothing acknowledged was lost
                assert c.identify(gallery[7]).subject_id == names[7]
    finally:
        own.stop()
