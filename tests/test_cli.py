"""The command line as a newcomer uses it: demo, keys, tenant, enroll, identify, delete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from veilface.bench.synthetic import SyntheticFaces
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def vf(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veilface.cli.main", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_demo_runs() -> None:
    out = vf("demo", "--people", "60", "--probes", "5")
    assert out.returncode == 0, out.stderr
    assert "identify (strict): 5/5" in out.stdout or "identify (strict)" in out.stdout
    assert "deleted" in out.stdout and "done" in out.stdout


def test_tenant_workflow_through_the_cli(tmp_path: Path) -> None:
    emb, labels = SyntheticFaces().sample(40, 2, seed=3)
    npz = tmp_path / "emb.npz"
    np.savez(npz, emb=emb, labels=labels)
    env = {"VEILFACE_PASSPHRASE": "correct horse battery staple"}
    state = tmp_path / "tenant.vfk"
    with LocalServer(tmp_path / "cli.db") as srv:
        out = vf("keys", "init", "--tenant", "cli-co", "--state", str(state), env=env)
        assert out.returncode == 0, out.stderr
        out = vf(
            "tenant", "create", "cli-co", "--server", srv.target,
            "--admin-token-file", str(srv.admin_token_path), "--json",
        )
        assert out.returncode == 0, out.stderr
        env["VEILFACE_TOKEN"] = json.loads(out.stdout)["api_token"]
        common = ["--server", srv.target, "--state", str(state)]
        assert vf("tenant", "register", *common, env=env).returncode == 0
        out = vf("enroll", *common, "--embeddings", str(npz), "--first-only", "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["subjects"] == 40
        out = vf("identify", *common, "--embeddings", str(npz), "--row", "7", "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["subject"] == str(labels[7])
        out = vf("delete", *common, "--subject", str(labels[7]), env=env)
        assert out.returncode == 0, out.stderr
        out = vf("identify", *common, "--embeddings", str(npz), "--row", "7", "--json", env=env)
        assert json.loads(out.stdout)["subject"] != str(labels[7])
        # routing retrained over the enrolled gallery, then a key rotation
        out = vf("repack", *common, "--nlist", "3", "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["subjects"] == 39
        out = vf("identify", *common, "--embeddings", str(npz), "--row", "9", "--mode", "routed",
                 "--nprobe", "3", "--json", env=env)
        assert json.loads(out.stdout)["subject"] == str(labels[9])
        new_state = tmp_path / "tenant-k2.vfk"
        out = vf("rotate", *common, "--key-id", "k2", "--new-state", str(new_state), "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["key_id"] == "k2"
        out = vf("identify", "--server", srv.target, "--state", str(new_state), "--embeddings", str(npz),
                 "--row", "9", "--mode", "routed", "--nprobe", "3", "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["subject"] == str(labels[9])
        # wrong passphrase: a clear error, exit code 2, no traceback
        bad = vf("identify", *common, "--embeddings", str(npz), env={**env, "VEILFACE_PASSPHRASE": "nope"})
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
