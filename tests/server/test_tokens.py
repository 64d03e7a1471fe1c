"""Least-privilege API tokens: the scope table, several hashed tokens per tenant, revocation, the query rate limit."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from tests.server.conftest import create_tenant
from veilface.client.admin import AdminClient
from veilface.client.transport import Transport
from veilface.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    VeilfaceError,
)
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.auth import (
    ADMIN_METHODS,
    METHOD_SCOPES,
    Principal,
    _bind,
    current_principal,
    scope_error,
)
from veilface.server.launcher import LocalServer
from veilface.server.store.sqlite_store import SCHEMA, SQLiteStore
from veilface.server.tokens import QueryRateLimiter, Scope, hash_token, parse_scopes

RATE, BURST = 0.05, 4  # the module server's query bucket: 4 calls, then one per 20 s


def _all_rpcs() -> list[str]:
    return [
        f"/{svc.full_name}/{m.name}"
        for svc in pb.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    ]


# -- the scope table (no server) ------------------------------------------------


def test_every_rpc_is_in_the_scope_table_and_nothing_else() -> None:
    rpcs = set(_all_rpcs())
    assert rpcs - set(METHOD_SCOPES) == set(), "give every new RPC a scope in server/auth.py"
    assert set(METHOD_SCOPES) - rpcs == set(), "the table names RPCs that do not exist"
    for method in rpcs:
        if method.startswith("/veilface.v1.Identification/"):
            assert METHOD_SCOPES[method] == {Scope.QUERY}, method
    assert ADMIN_METHODS <= rpcs


def test_scope_decisions_and_fail_closed() -> None:
    kiosk = Principal("acme", token_id="t_1", scopes=frozenset({Scope.QUERY}))
    enroller = Principal("acme", token_id="t_2", scopes=frozenset({Scope.ENROLL}))
    manager = Principal("acme", token_id="t_3", scopes=frozenset({Scope.MANAGE}))
    admin = Principal(None, True, "admin", frozenset({Scope.ADMIN}))
    e, i, t = "/veilface.v1.Enrollment/", "/veilface.v1.Identification/", "/veilface.v1.Tokens/"
    for name in ("FetchBin", "ListBins", "FetchStaged", "FetchSubjectBin", "DeleteSubject"):
        msg = scope_error(e + name, kiosk)
        assert msg is not None and name in msg and "'manage'" in msg
        assert scope_error(e + name, enroller) is not None
        assert scope_error(e + name, manager) is None
    assert scope_error(i + "Verify", kiosk) is None and scope_error(i + "Preselect", kiosk) is None
    assert "'query'" in (scope_error(i + "Verify", enroller) or "")
    assert (
        scope_error(e + "Enroll", enroller) is None and scope_error(e + "Enroll", kiosk) is not None
    )
    assert scope_error("/veilface.v1.Tenants/DescribeTenant", kiosk) is None  # counts only
    assert scope_error("/veilface.v1.Tenants/RegisterKey", kiosk) is not None
    assert (
        scope_error(t + "CreateToken", manager) is None
        and scope_error(t + "CreateToken", kiosk) is not None
    )
    assert scope_error(t + "ListTokens", admin) is None
    assert scope_error("/veilface.v1.Tenants/CreateTenant", manager) is not None
    assert scope_error(i + "Verify", admin) is not None  # the admin reads no gallery
    for who in (kiosk, manager, admin):  # not in the table: refused to everyone
        assert scope_error("/veilface.v1.Enrollment/DumpEverything", who) is not None


def test_principal_is_bound_for_every_handler_shape() -> None:
    """A server-streaming RPC added later still sees its caller (and does not fail open)."""

    async def unary(request: object, context: object) -> str | None:
        return current_principal().tenant_id

    async def streaming(request: object, context: object) -> AsyncIterator[str | None]:
        yield current_principal().tenant_id

    who = Principal("acme", token_id="t_1", scopes=frozenset({Scope.QUERY}))

    async def run() -> tuple[object, list[object]]:
        one = await _bind(grpc.unary_unary_rpc_method_handler(unary), who).unary_unary(None, None)
        many = _bind(grpc.unary_stream_rpc_method_handler(streaming), who).unary_stream(None, None)
        return one, [x async for x in many]

    assert asyncio.run(run()) == ("acme", ["acme"])


def test_scope_names() -> None:
    assert parse_scopes(["query", "enroll"]) == {Scope.QUERY, Scope.ENROLL}
    for bad in ([], ["admin"], ["root"], ["Query"]):
        with pytest.raises(InvalidArgument):
            parse_scopes(bad)


def test_token_bucket() -> None:
    limiter = QueryRateLimiter(2.0, 3)
    assert [limiter.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", now=0.0)  # per token
    assert not limiter.allow("a", now=0.2)
    assert limiter.allow("a", now=0.6)  # refilled 2/s
    assert QueryRateLimiter(0, 0).allow("a")  # 0 disables


# -- the store: several hashed tokens, migration from the one-token schema -------


def test_store_migrates_a_schema_4_database(tmp_path: Path) -> None:
    """An old database opens; its tenant's token keeps working, with every scope, under a token id."""
    db = tmp_path / "old.db"
    old_schema = re.sub(
        r"CREATE TABLE IF NOT EXISTS tokens \(.*?\);\n", "", SCHEMA, flags=re.DOTALL
    )
    old_schema = re.sub(r"CREATE INDEX IF NOT EXISTS tokens_by_tenant[^;]*;\n", "", old_schema)
    assert "TABLE IF NOT EXISTS tokens" not in old_schema and "ON tokens" not in old_schema
    conn = sqlite3.connect(db)
    conn.executescript(old_schema)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    conn.execute("INSERT INTO tenants VALUES ('acme', ?, 1.0)", (hash_token("vf_old-token"),))
    conn.commit()
    conn.close()

    for _ in range(2):  # reopening changes nothing
        store = SQLiteStore(db)
        (tok,) = store.active_tokens()
        assert tok.tenant_id == "acme" and tok.token_hash == hash_token("vf_old-token")
        assert set(tok.scopes) == {"query", "enroll", "manage"} and tok.revoked_at is None
        assert store.list_tokens("acme") == [tok]
        store.close()
    conn = sqlite3.connect(db)
    (legacy,) = conn.execute("SELECT token_hash FROM tenants").fetchone()
    (version,) = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    conn.close()
    assert legacy != hash_token("vf_old-token") and version == "5"  # no hash left outside `tokens`


# -- end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    db = tmp_path_factory.mktemp("tokens") / "tokens.db"
    env = {"VEILFACE_QUERY_RATE_PER_S": str(RATE), "VEILFACE_QUERY_BURST": str(BURST)}
    with LocalServer(db, workers=1, env=env) as s:
        yield s


def _tr(s: LocalServer, token: str) -> Transport:
    return Transport(s.target, token=token, timeout_s=20)


def test_create_list_revoke(srv: LocalServer) -> None:
    with AdminClient(srv.target, token=srv.admin_token) as admin:
        first = admin.create_tenant("acme")
        assert set(first.info.scopes) == {"query", "enroll", "manage"}
        assert first.api_token not in repr(first)
    with AdminClient(srv.target, token=first.api_token) as mgr:
        kiosk = mgr.create_token("acme", name="kiosk-1", scopes=["query"])
        enroller = mgr.create_token("acme", name="station", scopes=["enroll"])
        assert kiosk.info.scopes == ("query",) and kiosk.api_token != first.api_token
        listed = mgr.list_tokens("acme")
        assert [t.name for t in listed] == ["initial", "kiosk-1", "station"]
        assert all(not t.revoked for t in listed)
        with pytest.raises(InvalidArgument):
            mgr.create_token("acme", name="bad name!", scopes=["query"])
        with pytest.raises(PermissionDenied):  # a manage token acts on its own tenant only
            mgr.list_tokens("other")

    q = _tr(srv, kiosk.api_token)
    assert (
        q.call(q.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="acme")).tenant_id
        == "acme"
    )
    with (
        AdminClient(srv.target, token=kiosk.api_token) as thief,
        pytest.raises(PermissionDenied, match="manage"),
    ):
        thief.create_token("acme", name="x", scopes=["manage"])  # no better token for a kiosk
    e = _tr(srv, enroller.api_token)
    with pytest.raises(PermissionDenied, match="'query'"):
        e.call(e.identification.Verify, pb.VerifyRequest(tenant_id="acme", handle="h", key_id="k1"))
    with pytest.raises(NotFound):  # allowed through the scope check: no key k1 yet
        e.call(
            e.enrollment.ReserveSlots,
            pb.ReserveSlotsRequest(tenant_id="acme", key_id="k1", count=1),
        )
    replacing = pb.BulkEnrollChunk(
        tenant_id="acme", key_id="k1", replaces=[pb.BinRef(bin_id=1, version=1)]
    )
    with pytest.raises(PermissionDenied, match="manage"):  # a re-pack stream is the back office's
        e.call(e.enrollment.BulkEnroll, iter([replacing]))

    # Revocation: refused from the next call on; the others keep working.
    with AdminClient(srv.target, token=srv.admin_token) as admin:  # the admin may revoke too
        revoked = admin.revoke_token("acme", kiosk.info.token_id)
        assert revoked.revoked and revoked.revoked_at is not None
        assert admin.revoke_token("acme", kiosk.info.token_id).revoked_at == revoked.revoked_at
        with pytest.raises(NotFound):
            admin.revoke_token("acme", "t_0000000000000000")
        assert [t.name for t in admin.list_tokens("acme", include_revoked=False)] == [
            "initial",
            "station",
        ]
    with pytest.raises(Unauthenticated):
        q.call(q.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="acme"))
    assert (
        e.call(e.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="acme")).tenant_id
        == "acme"
    )
    q.close()
    e.close()


def test_admin_reaches_no_gallery_and_tenants_no_admin_rpc(srv: LocalServer) -> None:
    token = create_tenant(srv, "iso")
    admin = _tr(srv, srv.admin_token)
    for method, req in (
        (admin.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="iso")),
        (admin.enrollment.ListBins, pb.ListBinsRequest(tenant_id="iso", key_id="k1")),
        (admin.identification.Preselect, pb.PreselectRequest(tenant_id="iso", key_id="k1")),
    ):
        with pytest.raises(PermissionDenied):
            admin.call(method, req)
    admin.close()
    with (
        AdminClient(srv.target, token=token) as tenant,
        pytest.raises(PermissionDenied, match="admin"),
    ):
        tenant.create_tenant("iso2")


def test_query_rate_limit_per_token(srv: LocalServer) -> None:
    first = create_tenant(srv, "rated")
    with AdminClient(srv.target, token=first) as mgr:
        kiosks = [mgr.create_token("rated", name=f"kiosk-{i}", scopes=["query"]) for i in range(2)]
    req = pb.VerifyRequest(tenant_id="rated", handle="h", key_id="k1")

    def outcome(tr: Transport) -> type[VeilfaceError]:
        try:
            tr.call(tr.identification.Verify, req)
        except VeilfaceError as exc:
            return type(exc)
        raise AssertionError("an empty Verify cannot succeed")

    k0, k1, full = _tr(srv, kiosks[0].api_token), _tr(srv, kiosks[1].api_token), _tr(srv, first)
    got = [outcome(k0) for _ in range(BURST + 2)]
    assert ResourceExhausted not in got[:BURST]  # refused by the service itself (no such key)
    assert got[BURST:] == [ResourceExhausted, ResourceExhausted]
    assert outcome(k1) is not ResourceExhausted  # buckets are per token
    # A manage token can fetch whole bins anyway: its queries are not limited.
    assert ResourceExhausted not in [outcome(full) for _ in range(BURST + 2)]
    for tr in (k0, k1, full):
        tr.close()


def test_tokens_survive_a_restart(tmp_path: Path) -> None:
    """The store is the truth: a revoked token stays revoked, a created one valid."""
    db = tmp_path / "restart.db"
    with LocalServer(db, workers=1) as s:
        first = create_tenant(s, "keep")
        with AdminClient(s.target, token=first) as mgr:
            kept = mgr.create_token("keep", name="kept", scopes=["query"])
            gone = mgr.create_token("keep", name="gone", scopes=["query"])
            mgr.revoke_token("keep", gone.info.token_id)
    with LocalServer(db, workers=1) as s:
        ok, bad = _tr(s, kept.api_token), _tr(s, gone.api_token)
        assert (
            ok.call(ok.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="keep")).tenant_id
            == "keep"
        )
        with pytest.raises(Unauthenticated):
            bad.call(bad.tenants.DescribeTenant, pb.DescribeTenantRequest(tenant_id="keep"))
        ok.close()
        bad.close()


def _vf(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veilface.cli.main", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_token_cli(srv: LocalServer) -> None:
    env = {"VEILFACE_TOKEN": create_tenant(srv, "cli-tok")}
    common = ["--server", srv.target, "--tenant", "cli-tok"]
    out = _vf(
        "token", "create", *common, "--scope", "query", "--name", "kiosk-1", "--json", env=env
    )
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["scopes"] == ["query"] and made["api_token"].startswith("vf_")
    out = _vf(
        "token", "create", *common, "--scope", "query,enroll", "--name", "gate", "--json", env=env
    )
    assert json.loads(out.stdout)["scopes"] == ["enroll", "query"]

    out = _vf("token", "revoke", *common, made["token_id"], "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["revoked"], out.stderr
    out = _vf("token", "list", *common, "--json", env=env)
    rows = {r["name"]: r for r in json.loads(out.stdout)["tokens"]}
    assert set(rows) == {"initial", "kiosk-1", "gate"} and rows["kiosk-1"]["revoked"]
    assert rows["gate"]["revoked"] is None and rows["gate"]["created"].endswith("+00:00")
    assert made["api_token"] not in out.stdout  # never listed
    out = _vf("token", "list", *common, env=env)  # the table, for people
    assert out.returncode == 0 and "kiosk-1" in out.stdout and "query" in out.stdout

    # the revoked kiosk token, and a kiosk-scoped one, cannot manage tokens
    bad = _vf("token", "list", *common, env={"VEILFACE_TOKEN": made["api_token"]})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    out = _vf(
        "token", "list", *common, "--admin-token-file", str(srv.admin_token_path), "--json", env={}
    )
    assert out.returncode == 0 and len(json.loads(out.stdout)["tokens"]) == 3
