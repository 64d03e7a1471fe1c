"""``veilface enroll --images | identify --image | verify --image`` through the liveness gate.

In-process CLI runs (``veilface.cli.main.main``) against a real server, on
the pad-samples photos (real dlib detection), with forced liveness artifacts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.server.conftest import create_tenant
from veilface.cli.main import main
from veilface.client import transport
from veilface.client.face import FacePipeline
from veilface.client.liveness import model as model_module
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.server.launcher import LocalServer

# A server, a state file and dlib: about 15 s for the module on a loaded 2-core machine.
pytestmark = pytest.mark.slow

PASSPHRASE = "liveness cli test passphrase"


@pytest.fixture(scope="module")
def samples(data_dir: Path) -> Path:
    root = data_dir / "pad-samples"
    if not (root / "image_T1.jpg").is_file():
        pytest.skip(f"pad-samples not found at {root}: set VEILFACE_DATA to ../shared/data")
    return root


@pytest.fixture(scope="module")
def dlib_backend() -> Any:
    from veilface.client.face import DlibBackend

    backend = DlibBackend()
    backend.load()
    return backend


@pytest.fixture(scope="module")
def tenant(
    tmp_path_factory: pytest.TempPathFactory, samples: Path, dlib_backend: Any
) -> Iterator[dict[str, Any]]:
    """A server with a small gallery; the state file and token the CLI uses."""
    tmp = tmp_path_factory.mktemp("cli")
    with LocalServer(tmp / "gallery.db") as srv:
        token = create_tenant(srv, "kiosk-co")
        state = TenantState.new("kiosk-co", dim=128)
        with VeilClient(srv.target, state, token=token, encrypt_workers=0) as c:
            c.register_key()
            gallery = np.random.default_rng(0).normal(size=(20, 128))
            c.enroll_many([f"s{i}" for i in range(20)], gallery)
            live = FacePipeline(dlib_backend, liveness=None).embed(samples / "image_T1.jpg")
            c.enroll("t1-person", live.vector)
            c.flush()
        path = tmp / "tenant.vfk"
        state.save(path, passphrase=PASSPHRASE)
        yield {"server": srv.target, "state": path, "token": token, "tmp": tmp}


def vf(
    tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    *args: str,
) -> tuple[int, str, str]:
    # the CLI removes the passphrase from the environment once read: set it for every run
    monkeypatch.setenv("VEILFACE_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("VEILFACE_TOKEN", tenant["token"])
    common = ["--server", tenant["server"], "--state", str(tenant["state"])]
    code = main([args[0], *common, *args[1:]])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _one_dlib_load(dlib_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's default dlib pipeline, with its models loaded once for the module."""
    from veilface.client import image_ops

    monkeypatch.setattr(
        image_ops, "FacePipeline", lambda **kw: FacePipeline(dlib_backend, **kw)
    )


@pytest.fixture()
def rpcs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    inner = transport.Transport.call

    def counting(self: Any, method: Any, request: Any, **kw: Any) -> Any:
        calls.append(type(request).__name__)
        return inner(self, method, request, **kw)

    monkeypatch.setattr(transport.Transport, "call", counting)
    return calls


def test_identify_a_spoof_exits_3_before_any_rpc(
    tenant: dict[str, Any], samples: Path, attack_artifact: Path, rpcs: list[str],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = vf(
        tenant, monkeypatch, capsys, "identify", "--image", str(samples / "image_F1.jpg"),
        "--liveness", str(attack_artifact),
    )
    assert code == 3, err
    assert "refused: presentation attack detected" in err
    assert "liveness score 0.000" in err and "threshold 0.500" in err
    assert "Traceback" not in err and out == ""
    assert rpcs == []
    code, _, err = vf(
        tenant, monkeypatch, capsys, "verify", "--subject", "t1-person",
        "--image", str(samples / "image_F2.jpg"), "--liveness", str(attack_artifact),
    )
    assert code == 3 and "presentation attack" in err and rpcs == []


def test_identify_a_live_face_reports_its_liveness(
    tenant: dict[str, Any], samples: Path, live_artifact: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = vf(
        tenant, monkeypatch, capsys, "identify", "--image", str(samples / "image_T1.jpg"),
        "--liveness", str(live_artifact), "--json",
    )
    assert code == 0, err
    got = json.loads(out)
    assert got["subject"] == "t1-person" and got["match"]
    assert got["liveness"]["live"] is True and got["liveness"]["score"] > 0.99
    assert got["liveness"]["threshold"] == 0.5 and len(got["liveness"]["model_fingerprint"]) == 64
    code, out, _ = vf(
        tenant, monkeypatch, capsys, "verify", "--subject", "t1-person",
        "--image", str(samples / "image_T1.jpg"), "--liveness", str(live_artifact),
    )
    assert code == 0 and "accepted: t1-person" in out and "liveness: live (score" in out


def test_policy_record_and_no_liveness(
    tenant: dict[str, Any], samples: Path, attack_artifact: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = vf(
        tenant, monkeypatch, capsys, "identify", "--image", str(samples / "image_F1.jpg"),
        "--liveness", str(attack_artifact), "--liveness-policy", "record", "--json",
    )
    assert code == 0, err
    assert json.loads(out)["liveness"]["live"] is False
    code, out, err = vf(
        tenant, monkeypatch, capsys, "verify", "--subject", "t1-person",
        "--image", str(samples / "image_T1.jpg"), "--no-liveness", "--json",
    )
    assert code == 0, err
    assert "liveness check skipped (--no-liveness)" in err
    assert json.loads(out)["liveness"] == {"skipped": True, "reason": "skipped by liveness=None"}


def test_a_gate_that_cannot_run_refuses(
    tenant: dict[str, Any], samples: Path, tmp_path: Path, rpcs: list[str],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(model_module, "default_model_path", lambda: tmp_path / "default.vfpad")
    code, _, err = vf(tenant, monkeypatch, capsys, "identify", "--image", str(samples / "image_T1.jpg"))
    assert code == 2 and "default liveness model is not installed" in err and rpcs == []
    broken = tmp_path / "broken.vfpad"
    broken.write_bytes(b"not a zip")
    code, _, err = vf(
        tenant, monkeypatch, capsys, "identify", "--image", str(samples / "image_T1.jpg"),
        "--liveness", str(broken),
    )
    assert code == 2 and "not a liveness artifact" in err
    code, _, err = vf(
        tenant, monkeypatch, capsys, "identify", "--embeddings", str(tmp_path / "x.npz"),
        "--no-liveness",
    )
    assert code == 2 and "apply to --image/--images" in err


def test_enroll_a_folder_reports_refusals(
    tenant: dict[str, Any], samples: Path, live_artifact: Path, attack_artifact: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "people"
    for person, name in (("new-a", "image_F1.jpg"), ("new-b", "image_F2.jpg")):
        (root / person).mkdir(parents=True)
        shutil.copy(samples / name, root / person / name)
    (root / "new-b" / "0-notes.txt").write_text("not a photo")
    code, _, err = vf(
        tenant, monkeypatch, capsys, "enroll", "--images", str(root),
        "--liveness", str(attack_artifact),
    )
    assert code == 2 and "nothing was enrolled" in err and "2 PresentationAttackDetected" in err
    code, out, err = vf(
        tenant, monkeypatch, capsys, "enroll", "--images", str(root),
        "--liveness", str(live_artifact), "--json",
    )
    assert code == 0, err
    got = json.loads(out)
    assert got["subjects"] == 2 and got["refused"] == {"ImageDecodeError": 1}
    assert got["presentation_attacks"] == 0
    assert got["liveness"]["new-a"]["live"] is True
