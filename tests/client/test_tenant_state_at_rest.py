"""The tenant file at rest: its KDF, its permissions, and how the secret that opens it is found."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from veilface.client.tenant_state import TenantState, resolve_secret
from veilface.crypto.keystore import Argon2idParams, generate_key_file
from veilface.errors import InvalidArgument, KeystoreError

DIM = 16
CHEAP = Argon2idParams(memory_kib=64, iterations=1, lanes=1)  # tests check logic, not hardness


@pytest.fixture(scope="module")
def state() -> TenantState:
    return TenantState.new("acme", dim=DIM)


def test_default_save_uses_argon2id(state: TenantState, tmp_path: Path) -> None:
    path = tmp_path / "acme.vfk"
    state.save(path, passphrase="a passphrase")
    kdf = json.loads(path.read_text())["sealed"]["kdf"]
    assert kdf["name"] == "argon2id" and kdf["memory_kib"] >= 64 * 1024
    assert TenantState.load(path, passphrase="a passphrase").secret_key == state.secret_key


def test_kdf_parameters_can_be_given(state: TenantState, tmp_path: Path) -> None:
    path = tmp_path / "acme.vfk"
    state.save(path, passphrase="pw", kdf=CHEAP)
    assert json.loads(path.read_text())["sealed"]["kdf"]["memory_kib"] == 64
    state.save(path, passphrase="pw", scrypt_n=2**4)  # the older knob still works
    assert json.loads(path.read_text())["sealed"]["kdf"]["name"] == "scrypt"
    assert TenantState.load(path, passphrase="pw").key_id == "k1"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_loose_state_file_is_refused(state: TenantState, tmp_path: Path, mode: int) -> None:
    path = tmp_path / "acme.vfk"
    state.save(path, passphrase="pw", kdf=CHEAP)
    path.chmod(mode)
    with pytest.raises(KeystoreError, match="chmod 600") as info:
        TenantState.load(path, passphrase="pw")
    assert str(path) in str(info.value)
    path.chmod(0o600)
    assert TenantState.load(path, passphrase="pw").tenant_id == "acme"


def test_save_is_0600_whatever_the_umask_and_replaces_a_loose_file(
    state: TenantState, tmp_path: Path
) -> None:
    path = tmp_path / "acme.vfk"
    path.write_text("old")
    path.chmod(0o666)
    old = os.umask(0)
    try:
        state.save(path, passphrase="pw", kdf=CHEAP)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["acme.vfk"]


def test_loose_key_file_is_refused_on_save_and_load(state: TenantState, tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k")
    path = tmp_path / "acme.vfk"
    state.save(path, key_file=key)
    key.chmod(0o640)
    with pytest.raises(KeystoreError, match="chmod 600"):
        TenantState.load(path, key_file=key)
    with pytest.raises(KeystoreError, match="chmod 600"):
        state.save(path, key_file=key)


def test_resolve_secret_from_a_passphrase_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from a file\n")
    pw.chmod(0o600)
    assert resolve_secret(None, None, passphrase_file=pw) == ("from a file", None)
    with pytest.raises(InvalidArgument, match="exactly one"):
        resolve_secret(None, tmp_path / "k", passphrase_file=pw)
    with pytest.raises(InvalidArgument, match="exactly one"):
        resolve_secret("VF_TEST_PASS", None, passphrase_file=pw)
    pw.chmod(0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        resolve_secret(None, None, passphrase_file=pw)


def test_resolve_secret_can_take_the_variable_out_of_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VF_TEST_PASS", "s3cret")
    assert resolve_secret("VF_TEST_PASS", None) == ("s3cret", None)
    assert os.environ["VF_TEST_PASS"] == "s3cret"  # left alone unless asked (compatibility)
    assert resolve_secret("VF_TEST_PASS", None, remove_env=True) == ("s3cret", None)
    assert "VF_TEST_PASS" not in os.environ
