"""The tenant's sealed state file: round trip, every way opening must fail, mixing matrix."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import numpy as np
import pytest

from veilface.client.tenant_state import TenantState, resolve_secret
from veilface.crypto.keystore import generate_key_file
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import InvalidArgument, KeystoreError

DIM = 16
N = 2**4  # tiny scrypt cost for tests


@pytest.fixture(scope="module")
def state() -> TenantState:
    st = TenantState.new("acme", dim=DIM)
    rng = np.random.default_rng(0)
    st.train_router(rng.standard_normal((200, DIM)), nlist=4)
    st.threshold = 0.42
    st.center = rng.standard_normal(DIM) * 0.1
    return st


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    return generate_key_file(tmp_path / "tenant.key")


def test_new(state: TenantState) -> None:
    assert state.tenant_id == "acme" and state.key_id == "k1" and state.param_set == "n4096"
    assert len(state.label_key) == 32 and len(state.handle_key) == 64
    assert state.router is not None and state.router.label_key == state.label_key
    assert state.created_at.endswith("+00:00")
    text = repr(state)
    assert "secret_key" not in text and "label_key" not in text and "mixing_seed" not in text


def test_round_trip_key_file(state: TenantState, tmp_path: Path, key_file: Path) -> None:
    path = tmp_path / "acme.tenant"
    state.save(path, key_file=key_file)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = TenantState.load(path, key_file=key_file)
    for name in (
        "tenant_id",
        "key_id",
        "param_set",
        "dim",
        "presel_dims",
        "created_at",
        "secret_key",
        "label_key",
        "handle_key",
        "mixing_seed",
        "threshold",
    ):
        assert getattr(back, name) == getattr(state, name), name
    assert back.center is not None and state.center is not None
    assert np.array_equal(back.center, state.center) and back.center.dtype == np.float64
    assert back.router is not None and state.router is not None
    assert np.array_equal(back.router.centroids, state.router.centroids)
    assert back.router.labels(range(4)) == state.router.labels(range(4))
    assert back.handles().decode(state.handles().encode("alice")) == "alice"
    # The reloaded secret key decrypts what the original one encrypted.
    template = np.random.default_rng(1).standard_normal(DIM)
    blobs = TenantCrypto(state.keys()).encrypt_contribution(template[None, :], [0])
    assert len(blobs) == back.keys().layout.n_ciphertexts
    recovered = TenantCrypto(back.keys()).decrypt_bin(blobs, [0])
    assert np.allclose(recovered.reshape(-1)[:DIM], template, atol=1e-3)


def test_round_trip_passphrase_and_overwrite(state: TenantState, tmp_path: Path) -> None:
    path = tmp_path / "acme.tenant"
    state.save(path, passphrase="pw one", scrypt_n=N)
    state.save(path, passphrase="pw two", scrypt_n=N)  # atomic replace
    assert TenantState.load(path, passphrase="pw two").secret_key == state.secret_key
    assert [p.name for p in tmp_path.iterdir()] == ["acme.tenant"]  # no temp file left
    with pytest.raises(KeystoreError, match="wrong passphrase or key file"):
        TenantState.load(path, passphrase="pw one")


def test_file_holds_no_secret_in_clear(state: TenantState, tmp_path: Path, key_file: Path) -> None:
    path = tmp_path / "acme.tenant"
    state.save(path, key_file=key_file)
    raw = path.read_bytes()
    doc = json.loads(raw)
    assert set(doc) == {
        "format",
        "tenant_id",
        "key_id",
        "param_set",
        "dim",
        "presel_dims",
        "created_at",
        "layout_version",
        "sealed",
    }
    assert doc["format"] == "veilface-tenant/1"
    assert doc["layout_version"] == 2
    for secret in (state.secret_key, state.label_key, state.handle_key):
        assert secret[:64] not in raw
        assert base64.b64encode(secret)[:40] not in raw
        assert secret.hex()[:40].encode() not in raw
    assert str(state.mixing_seed).encode() not in raw


@pytest.mark.parametrize(
    ("field", "value"),
    [("tenant_id", "evil"), ("key_id", "k2"), ("dim", DIM + 1), ("created_at", "2000-01-01")],
)
def test_tampered_header(
    state: TenantState, tmp_path: Path, key_file: Path, field: str, value: object
) -> None:
    path = tmp_path / "acme.tenant"
    state.save(path, key_file=key_file)
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="the file was modified"):
        TenantState.load(path, key_file=key_file)


def test_truncated_missing_foreign(state: TenantState, tmp_path: Path, key_file: Path) -> None:
    path = tmp_path / "acme.tenant"
    state.save(path, key_file=key_file)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(KeystoreError, match="truncated"):
        TenantState.load(path, key_file=key_file)
    with pytest.raises(KeystoreError, match="cannot read tenant file"):
        TenantState.load(tmp_path / "absent", key_file=key_file)
    path.write_text(json.dumps({"format": "something-else/1"}))
    with pytest.raises(KeystoreError, match="not a veilface tenant file"):
        TenantState.load(path, key_file=key_file)
    doc = json.loads(raw)
    del doc["sealed"]
    path.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="lacks fields"):
        TenantState.load(path, key_file=key_file)


def test_wrong_key_file(state: TenantState, tmp_path: Path, key_file: Path) -> None:
    path = tmp_path / "acme.tenant"
    state.save(path, key_file=key_file)
    other = generate_key_file(tmp_path / "other.key")
    with pytest.raises(KeystoreError, match="wrong passphrase or key file"):
        TenantState.load(path, key_file=other)


def test_mixing_matrix(state: TenantState) -> None:
    q = state.mixing_matrix()
    assert q.shape == (DIM, DIM) and q.dtype == np.float64
    assert np.allclose(q @ q.T, np.eye(DIM), atol=1e-12)
    assert state.mixing_matrix() is q and not q.flags.writeable
    twin = TenantState(
        tenant_id="t",
        key_id="k",
        param_set="n4096",
        dim=DIM,
        presel_dims=0,
        secret_key=state.secret_key,
        label_key=state.label_key,
        handle_key=state.handle_key,
        mixing_seed=state.mixing_seed,
    )
    assert np.array_equal(twin.mixing_matrix(), q)
    twin.mixing_seed += 1
    twin._mixing = None
    assert not np.allclose(twin.mixing_matrix(), q)
    x, y = np.random.default_rng(2).standard_normal((2, DIM))
    assert np.isclose((q @ x) @ (q @ y), x @ y)


def test_router_must_match(state: TenantState) -> None:
    assert state.router is not None
    with pytest.raises(InvalidArgument, match="label key"):
        TenantState(
            tenant_id="t",
            key_id="k",
            param_set="n4096",
            dim=DIM,
            presel_dims=0,
            secret_key=state.secret_key,
            label_key=bytes(32),
            handle_key=state.handle_key,
            mixing_seed=1,
            router=state.router,
        )


def test_resolve_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VF_TEST_PASS", "s3cret")
    assert resolve_secret("VF_TEST_PASS", None) == ("s3cret", None)
    assert resolve_secret(None, tmp_path / "k") == (None, tmp_path / "k")
    with pytest.raises(InvalidArgument, match="exactly one"):
        resolve_secret(None, None)
    with pytest.raises(InvalidArgument, match="exactly one"):
        resolve_secret("VF_TEST_PASS", tmp_path / "k")
    monkeypatch.delenv("VF_TEST_PASS")
    with pytest.raises(KeystoreError, match="VF_TEST_PASS"):
        resolve_secret("VF_TEST_PASS", None)


def test_layout_version_round_trips_and_old_files_keep_layout_1(tmp_path: Path, key_file: Path) -> None:
    """A state of layout 1 is written exactly as before complex packing (no field) and reads back as 1."""
    old = TenantState.new("old-co", dim=128, layout_version=1)
    path = tmp_path / "old.tenant"
    old.save(path, key_file=key_file)
    assert "layout_version" not in json.loads(path.read_bytes())
    back = TenantState.load(path, key_file=key_file)
    assert back.layout_version == 1
    assert (back.keys().layout.version, back.keys().layout.capacity) == (1, 2048)
    new = TenantState.new("new-co", dim=128)
    new.save(path, key_file=key_file)
    again = TenantState.load(path, key_file=key_file)
    assert (again.layout_version, again.keys().layout.capacity) == (2, 4096)
    assert old.rotated("k2").layout_version == 2  # a rotation moves the gallery to the new layout
    for st in (old, new):  # a kiosk holds the key's layout too
        st.center = np.zeros(128)
        assert st.export_kiosk().layout_version == st.layout_version
