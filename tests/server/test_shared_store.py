"""Two server processes over one PostgreSQL: what one acknowledges, the other serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.postgres_server import TestPostgres
from tests.server.conftest import create_tenant, eventually
from veilface.client.admin import AdminClient
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.errors import VeilfaceError
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def test_two_front_ends_share_one_postgres(
    postgres: TestPostgres, tmp_path: Path, faces: tuple[np.ndarray, list[str], np.ndarray]
) -> None:
    gallery, names, _ = faces
    url, admin = postgres.fresh_url(), tmp_path / "admin-token"
    env = {"VEILFACE_TOKEN_SYNC_S": "0.5"}
    with LocalServer(url, admin_token_file=admin, workers=1, env=env) as a, LocalServer(
        url, admin_token_file=admin, workers=1, env=env
    ) as b:
        assert a.proc is not None
        assert postgres.password not in Path(f"/proc/{a.proc.pid}/cmdline").read_text()  # env, not argv
        token = create_tenant(a, "shared")  # b started before the tenant existed
        state = TenantState.new("shared", dim=128)
        with VeilClient(a.target, state, token=token, encrypt_workers=0) as ca:
            ca.register_key()
            ca.enroll_many(names[:40], gallery[:40])
            ca.enroll(names[40], gallery[40])
            ca.flush()
        with VeilClient(b.target, state, token=token, encrypt_workers=0) as cb:

            def b_knows_the_token() -> bool:
                try:
                    cb.describe()
                    return True
                except VeilfaceError:
                    return False

            assert eventually(b_knows_the_token, 15.0, 0.2), "b never learnt a's new token"
            assert cb.describe().keys[0].subjects == 41
            for i in (0, 17, 39, 40):
                r = cb.identify(gallery[i])
                assert r.subject_id == names[i] and r.score == pytest.approx(1.0, abs=1e-3)
            cb.enroll(names[41], gallery[41])  # and the other way round
            cb.flush()
        with VeilClient(a.target, state, token=token, encrypt_workers=0) as ca:
            assert ca.identify(gallery[41]).subject_id == names[41]

        with AdminClient(a.target, token=a.admin_token) as admin_a:
            kiosk = admin_a.create_token("shared", name="kiosk", scopes=["query"])
            with VeilClient(b.target, state, token=kiosk.api_token, encrypt_workers=0) as kb:
                assert eventually(lambda: _works(kb), 15.0, 0.2), "b never learnt the kiosk token"
                admin_a.revoke_token("shared", kiosk.info.token_id)  # through a
                assert eventually(lambda: not _works(kb), 15.0, 0.2), "b still accepts a revoked token"


def _works(client: VeilClient) -> bool:
    try:
        client.describe()
        return True
    except VeilfaceError:
        return False
