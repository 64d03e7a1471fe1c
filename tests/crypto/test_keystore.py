"""Sealed blobs: round trips under every KDF, the files they read, and every way opening must fail."""

from __future__ import annotations

import base64
import copy
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from veilface.crypto import keystore
from veilface.crypto.keystore import (
    Argon2idParams,
    ScryptParams,
    generate_key_file,
    open_blob,
    read_key_file,
    read_passphrase_file,
    read_private_file,
    seal_blob,
)
from veilface.errors import InvalidArgument, KeystoreError

N = 2**4  # tiny scrypt cost: the tests check logic, not hardness
CHEAP_ARGON2 = Argon2idParams(memory_kib=64, iterations=1, lanes=1)  # likewise
PAYLOAD = b"secret key bytes \x00\x01\x02" * 10
AAD = b'{"tenant_id":"acme"}'


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    return Path(generate_key_file(tmp_path / "tenant.key"))


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
    path.chmod(0o600)
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
    tmp.chmod(0o600)
    with pytest.raises(KeystoreError) as info:
        read_key_file(bad)
    assert key_hex[:40] not in str(info.value)


# -- passphrase KDF: Argon2id by default, parameters in the header, bounded when opening --------

#: Sealed by the code before Argon2id (scrypt at its old default N = 2^15), kept verbatim.
LEGACY_SCRYPT_2_15: dict[str, Any] = {
    "kdf": {"name": "scrypt", "salt": "pi0LG7P4h+Wf/3CU6e6rgg==", "n": 32768, "r": 8, "p": 1},
    "aead": "aes-256-gcm",
    "nonce": "wvyebK81qX7SkwNk",
    "ciphertext": "ROFleYG3vZYvA5UBQcfbmdeIR18/UlD5VHcYOMdyeiEJITzq6w==",
}
LEGACY_AAD = b'{"tenant_id":"legacy"}'


def test_default_passphrase_kdf_is_argon2id_with_its_parameters_in_the_header() -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="correct horse")
    kdf = sealed["kdf"]
    assert kdf["name"] == "argon2id" and kdf["version"] == 0x13
    # RFC 9106's second recommended option, OWASP's floor is weaker (19 MiB, t=2)
    assert kdf["memory_kib"] >= 64 * 1024 and kdf["iterations"] >= 3 and kdf["lanes"] >= 1
    assert len(base64.b64decode(kdf["salt"])) == 16
    assert open_blob(sealed, aad=AAD, passphrase="correct horse") == PAYLOAD


def test_argon2id_round_trip_and_tampered_parameters() -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", kdf=CHEAP_ARGON2)
    assert {k: sealed["kdf"][k] for k in ("memory_kib", "iterations", "lanes")} == {
        "memory_kib": 64,
        "iterations": 1,
        "lanes": 1,
    }
    assert open_blob(sealed, aad=AAD, passphrase="pw") == PAYLOAD
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        open_blob(sealed, aad=AAD, passphrase="pW")
    for field, value in (("iterations", 2), ("memory_kib", 128), ("salt", _flip(sealed["kdf"]["salt"], 0))):
        bad = copy.deepcopy(sealed)
        bad["kdf"][field] = value
        with pytest.raises(KeystoreError, match="the file was modified"):
            open_blob(bad, aad=AAD, passphrase="pw")


def test_scrypt_fallback_default_is_at_least_2_17(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keystore, "argon2id_supported", lambda: False)
    default = keystore.default_passphrase_kdf()
    assert isinstance(default, ScryptParams) and default.n >= 2**17
    assert keystore.SCRYPT_N >= 2**17
    assert isinstance(keystore.default_passphrase_kdf(), ScryptParams)
    monkeypatch.undo()
    if keystore.argon2id_supported():
        assert isinstance(keystore.default_passphrase_kdf(), Argon2idParams)


def test_argon2id_blob_without_argon2id_support_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", kdf=CHEAP_ARGON2)
    monkeypatch.setattr(keystore, "argon2id_supported", lambda: False)
    with pytest.raises(KeystoreError, match="Argon2id.*cryptography"):
        open_blob(sealed, aad=AAD, passphrase="pw")


def test_legacy_scrypt_2_15_file_still_opens() -> None:
    sealed = copy.deepcopy(LEGACY_SCRYPT_2_15)
    assert open_blob(sealed, aad=LEGACY_AAD, passphrase="legacy passphrase") == b"legacy tenant secrets"
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        open_blob(sealed, aad=LEGACY_AAD, passphrase="legacy passphrase!")


def test_explicit_scrypt_still_seals() -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", kdf=ScryptParams(n=N))
    assert sealed["kdf"]["name"] == "scrypt" and sealed["kdf"]["n"] == N
    assert open_blob(sealed, aad=AAD, passphrase="pw") == PAYLOAD
    with pytest.raises(InvalidArgument, match="not both"):
        seal_blob(PAYLOAD, aad=AAD, passphrase="pw", kdf=ScryptParams(n=N), scrypt_n=N)


@pytest.mark.parametrize(
    "forged",
    [
        {"memory_kib": 2**30},  # 1 TiB
        {"memory_kib": 2**21},  # 2 GiB: over the 1 GiB cap
        {"memory_kib": 2**20, "iterations": 8},  # 8 GiB of passes
        {"iterations": 10**6},
        {"lanes": 0},
        {"lanes": 2**20},
        {"memory_kib": 4, "lanes": 1},  # below Argon2's 8 KiB per lane
        {"version": 0x10},
        {"iterations": "3"},
        {"memory_kib": True},
    ],
)
def test_forged_argon2id_header_is_refused_before_any_work(
    forged: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, passphrase="pw", kdf=CHEAP_ARGON2)
    sealed["kdf"].update(forged)

    def no_derivation(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a forged header reached the KDF")

    monkeypatch.setattr(keystore, "_argon2id_key", no_derivation)
    with pytest.raises(KeystoreError, match="argon2id"):
        open_blob(sealed, aad=AAD, passphrase="pw")


@pytest.mark.parametrize(
    "forged",
    [{"n": 2**21}, {"n": 2**20, "r": 16}, {"n": 2**20, "r": 8, "p": 4}, {"n": 3}, {"p": 0}],
)
def test_forged_scrypt_header_is_refused(forged: dict[str, object]) -> None:
    sealed = copy.deepcopy(LEGACY_SCRYPT_2_15)
    sealed["kdf"].update(forged)
    with pytest.raises(KeystoreError, match="scrypt"):
        open_blob(sealed, aad=LEGACY_AAD, passphrase="legacy passphrase")


@pytest.mark.parametrize(
    "params",
    [
        Argon2idParams(memory_kib=2**21),
        Argon2idParams(iterations=0),
        Argon2idParams(lanes=0),
        Argon2idParams(memory_kib=8, lanes=2),
        ScryptParams(n=2**21),
        ScryptParams(n=1000),
    ],
)
def test_seal_refuses_parameters_it_could_not_open(params: Argon2idParams | ScryptParams) -> None:
    with pytest.raises(InvalidArgument):
        seal_blob(PAYLOAD, aad=AAD, passphrase="pw", kdf=params)


# -- files holding secrets: refused when group or others can read or write them -------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660])
def test_loose_key_file_is_refused(key_file: Path, mode: int) -> None:
    sealed = seal_blob(PAYLOAD, aad=AAD, key_file=key_file)
    key_file.chmod(mode)
    calls: list[Callable[[], object]] = [
        lambda: read_key_file(key_file),
        lambda: seal_blob(PAYLOAD, aad=AAD, key_file=key_file),
        lambda: open_blob(sealed, aad=AAD, key_file=key_file),
    ]
    for call in calls:
        with pytest.raises(KeystoreError, match="chmod 600") as info:
            call()
        assert str(key_file) in str(info.value) and oct(mode)[2:] in str(info.value)
    key_file.chmod(0o400)  # owner-only, read-only: fine
    assert open_blob(sealed, aad=AAD, key_file=key_file) == PAYLOAD


def test_read_private_file(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"x" * 10)
    path.chmod(0o600)
    assert read_private_file(path, what="tenant file") == b"x" * 10
    with pytest.raises(KeystoreError, match="tenant file .* holds more than 4 bytes"):
        read_private_file(path, what="tenant file", max_bytes=4)
    path.chmod(0o644)
    with pytest.raises(KeystoreError, match=r"tenant file '.*state' is accessible to group or others"):
        read_private_file(path, what="tenant file")
    with pytest.raises(KeystoreError, match="cannot read tenant file"):
        read_private_file(tmp_path / "absent", what="tenant file")
    with pytest.raises(KeystoreError, match="cannot read tenant file"):
        read_private_file(tmp_path, what="tenant file")  # a directory


def test_passphrase_file(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_text("  spaces kept inside and around  \n")
    path.chmod(0o600)
    assert read_passphrase_file(path) == "  spaces kept inside and around  "
    path.write_bytes(b"crlf\r\n")
    assert read_passphrase_file(path) == "crlf"
    path.write_text("\n")
    with pytest.raises(KeystoreError, match="empty"):
        read_passphrase_file(path)
    path.write_text("pw\n")
    path.chmod(0o640)
    with pytest.raises(KeystoreError, match="chmod 600"):
        read_passphrase_file(path)
    path.chmod(0o600)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(KeystoreError, match="UTF-8"):
        read_passphrase_file(path)


def test_passphrase_from_a_pipe(tmp_path: Path) -> None:
    """A pipe (``--passphrase-file <(pass show x)``) holds nothing at rest: no mode check."""
    r, w = os.pipe()
    try:
        os.write(w, b"piped pw\n")
        os.close(w)
        assert read_passphrase_file(Path(f"/proc/self/fd/{r}")) == "piped pw"
    finally:
        os.close(r)
