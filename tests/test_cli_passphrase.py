"""How the CLI finds the tenant passphrase, and that it does not hand it on to child processes."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from veilface.cli import common
from veilface.errors import InvalidArgument, KeystoreError

ENV = "VEILFACE_PASSPHRASE"


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    common.add_state_options(p)
    return p.parse_args(list(argv))


@pytest.fixture(autouse=True)
def _no_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(common, "_interactive", lambda: False)


def _child_env(name: str = ENV) -> str:
    out = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.environ.get({name!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_env_passphrase_is_taken_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "from the env")
    args = _args()
    assert common.secret_args(args) == {"passphrase": "from the env"}
    assert ENV not in os.environ
    assert _child_env() == "None"  # a child process (worker, server) does not inherit it
    # later calls for the same command (load, then save) get the same passphrase
    assert common.secret_args(args) == {"passphrase": "from the env"}


def test_named_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_PASS", "named")
    assert common.secret_args(_args("--passphrase-env", "MY_PASS")) == {"passphrase": "named"}
    assert "MY_PASS" not in os.environ


def test_key_file_wins_and_the_env_passphrase_is_still_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV, "unused")
    key = tmp_path / "k"
    assert common.secret_args(_args("--key-file", str(key))) == {"key_file": key}
    assert ENV not in os.environ


def test_passphrase_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from a file\n")
    pw.chmod(0o600)
    monkeypatch.setenv(ENV, "ignored")
    assert common.secret_args(_args("--passphrase-file", str(pw))) == {"passphrase": "from a file"}
    assert ENV not in os.environ
    pw.chmod(0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        common.secret_args(_args("--passphrase-file", str(pw)))
    with pytest.raises(InvalidArgument, match="--passphrase-file"):
        common.secret_args(_args("--passphrase-file", str(pw), "--key-file", str(tmp_path / "k")))
    with pytest.raises(InvalidArgument, match="--passphrase-file"):
        common.secret_args(_args("--passphrase-file", str(pw), "--passphrase-env", "X"))


def test_nothing_given_and_no_terminal() -> None:
    with pytest.raises(InvalidArgument, match="VEILFACE_PASSPHRASE.*--passphrase-file.*--key-file"):
        common.secret_args(_args())


def test_prompt_on_a_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(common, "_interactive", lambda: True)
    answers = iter(["typed", "typed", "one", "two", "again"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    new = tmp_path / "new.vfk"  # does not exist yet: the passphrase is being chosen, asked twice
    assert common.secret_args(_args("--state", str(new))) == {"passphrase": "typed"}
    assert len(prompts) == 2 and str(new) in prompts[0]
    with pytest.raises(InvalidArgument, match="do not match"):
        common.secret_args(_args("--state", str(new)))
    existing = tmp_path / "old.vfk"
    existing.write_text("{}")
    prompts.clear()
    assert common.secret_args(_args("--state", str(existing))) == {"passphrase": "again"}
    assert len(prompts) == 1


def test_keys_init_through_the_cli(tmp_path: Path) -> None:
    """``veilface keys init --passphrase-file``, then a load with the passphrase in the env."""
    pw = tmp_path / "pw"
    pw.write_text("cli passphrase\n")
    pw.chmod(0o600)
    state = tmp_path / "t.vfk"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    run = [sys.executable, "-m", "veilface.cli.main", "keys", "init", "--tenant", "cli"]
    out = subprocess.run(
        [*run, "--dim", "16", "--state", str(state), "--passphrase-file", str(pw)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(state.read_text())["sealed"]["kdf"]["name"] == "argon2id"
    script = (
        "import os, subprocess, sys; from veilface.cli import main, common; "
        "import argparse; p = argparse.ArgumentParser(); common.add_state_options(p); "
        f"a = p.parse_args(['--state', {str(state)!r}]); s = common.load_state(a); "
        "c = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"VEILFACE_PASSPHRASE\"))'],"
        " capture_output=True, text=True).stdout.strip(); print(s.tenant_id, c)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**env, ENV: "cli passphrase"}, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cli", "None"]
    pw.chmod(0o640)
    out = subprocess.run(
        [*run, "--dim", "16", "--state", str(state), "--force", "--passphrase-file", str(pw)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert out.returncode == 2 and "chmod 600" in out.stderr and "Traceback" not in out.stderr
