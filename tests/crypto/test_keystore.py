"""Sealed blobs: round trips under both KDFs and every way opening must fail."""

from __future__ import annotations

import base64
import copy
import json
import os
import stat
from pathlib import Path

import pytest

from veilface.crypto.keystore import generate_key_file, open_blob, read_key_file, seal_blob
from veilface.errors import InvalidArgument, KeystoreError

N = 2**4  # tiny scrypt cost: the tests check logic, not hardness
PAYLOAD = b"secret key bytes \x00\x01\x02" * 10
AAD = b'{"tenant_id":"acme"}'


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    return generate_key_file(tmp_path / "tenant.key")


def _flip(b64: str, index: int) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_round_trip_passphrase() -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="correct horse", scrypt_n=N)
    json.dumps(sealed)  # JSON-serializable
    assert sealed["kdf"] == {**sealed["kdf"], "name": "scrypt", "n": N, "r": 8, "p": 1}
    assert sealed["aead"] == "aes-256-gcm"
    assert len(base64.b64decode(sealed["nonce"])) == 12
    assert open_blob(sealed, aad=AAD, passphrase="correct horse") == PAYLOAD


def test_round_trip_key_file(key_file: Path) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, key_file=key_file)
    assert set(sealed["kdf"]) == {"name", "salt"} and sealed["kdf"]["name"] == "hkdf-sha256"
    assert open_blob(sealed, aad=AAD, key_file=key_file) == PAYLOAD


def test_raw_key_file(tmp_path: Path) -> None:
    path = tmp_path / "raw.key"
    path.write_bytes(os.urandom(48))
    path.chmod(0o600)
    sealed = seal_blob(PAYLOAD, aad=AAD, key_file=path)
    assert open_blob(sealed, aad=AAD, key_file=path) == PAYLOAD


def test_fresh_nonce_and_salt() -> None:
    a = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", scrypt_n=N)
    b = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", scrypt_n=N)
    assert a["nonce"] != b["nonce"] and a["kdf"]["salt"] != b["kdf"]["salt"]
    assert a["ciphertext"] != b["ciphertext"]


def test_wrong_passphrase() -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="right", scrypt_n=N)
    with pytest.raises(
        KeystoreError, match="wrong passphrase or key file, or the file was modified"
    ):
        open_blob(sealed, aad=AAD, passphrase="wrong")


def test_wrong_key_file(key_file: Path, tmp_path: Path) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, key_file=key_file)
    other = generate_key_file(tmp_path / "other.key")
    with pytest.raises(KeystoreError, match="wrong passphrase or key file"):
        open_blob(sealed, aad=AAD, key_file=other)


def test_wrong_kind_of_secret(key_file: Path) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, key_file=key_file)
    with pytest.raises(KeystoreError, match="sealed with a key file"):
        open_blob(sealed, aad=AAD, passphrase="pw")


@pytest.mark.parametrize("field", ["ciphertext", "nonce"])
def test_tampered_byte(field: str) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", scrypt_n=N)
    bad = copy.deepcopy(sealed)
    bad[field] = _flip(sealed[field], 3)
    with pytest.raises(KeystoreError, match="the file was modified"):
        open_blob(bad, aad=AAD, passphrase="pw")


def test_tampered_kdf_params() -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", scrypt_n=N)
    bad = copy.deepcopy(sealed)
    bad["kdf"]["n"] = N * 2
    with pytest.raises(KeystoreError, match="the file was modified"):
        open_blob(bad, aad=AAD, passphrase="pw")
    bad["kdf"]["n"] = 2**40
    with pytest.raises(KeystoreError, match="invalid scrypt parameter"):
        open_blob(bad, aad=AAD, passphrase="pw")


def test_tampered_aad(key_file: Path) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, key_file=key_file)
    with pytest.raises(KeystoreError, match="the file was modified"):
        open_blob(sealed, aad=AAD.replace(b"acme", b"evil"), key_file=key_file)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("ciphertext"),
        lambda s: s.pop("kdf"),
        lambda s: s["kdf"].pop("salt"),
        lambda s: s.update(nonce="not base64!"),
        lambda s: s.update(aead="chacha20-poly1305"),
        lambda s: s["kdf"].update(name="pbkdf2"),
    ],
    ids=["no-ciphertext", "no-kdf", "no-salt", "bad-b64", "unknown-aead", "unknown-kdf"],
)
def test_malformed_blob(mutate: object) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", scrypt_n=N)
    mutate(sealed)  # type: ignore[operator]
    with pytest.raises(KeystoreError):
        open_blob(sealed, aad=AAD, passphrase="pw")


def test_short_key_file(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_text("ab" * 31 + "\n")  # 31 bytes as hex
    with pytest.raises(KeystoreError, match="at least 32"):
        seal_blob(PAYLOAD, aad=AAD, key_file=path)
    path.write_bytes(b"\x01" * 31)
    with pytest.raises(KeystoreError, match="at least 32"):
        read_key_file(path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="cannot read key file"):
        seal_blob(PAYLOAD, aad=AAD, key_file=tmp_path / "absent.key")


def test_exactly_one_secret(key_file: Path) -> None:
    with pytest.raises(InvalidArgument):
        seal_blob(PAYLOAD, aad=AAD)
    with pytest.raises(InvalidArgument):
        seal_blob(PAYLOAD, aad=AAD, passphrase="pw", key_file=key_file)
    with pytest.raises(KeystoreError, match="empty"):
        seal_blob(PAYLOAD, aad=AAD, passphrase="")


def test_generate_key_file(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "k")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text().strip()
    assert len(text) == 64 and len(bytes.fromhex(text)) == 32
    assert read_key_file(path) == bytes.fromhex(text)
    with pytest.raises(KeystoreError, match="refusing to overwrite"):
        generate_key_file(path)
    assert path.read_text().strip() == text


def test_errors_do_not_leak_secrets(key_file: Path) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="hunter2-secret", scrypt_n=N)
    with pytest.raises(KeystoreError) as info:
        open_blob(sealed, aad=AAD, passphrase="hunter3-secret")
    assert "hunter" not in str(info.value)
    key_hex = key_file.read_text().strip()
    bad = tmp = key_file.parent / "bad.key"
    tmp.write_text(key_hex[:40])
    with pytest.raises(KeystoreError) as info:
        read_key_file(bad)
    assert key_hex[:40] not in str(info.value)
