"""``veilface fed deploy-local --run`` as a newcomer meets it (issue 14, deliverable 6).

Real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1 with
free ports (TLS, SuperNode auth), started by the CLI or by
:class:`~veilface.federated.deploy.LocalDeployment`:

- the defaults train: task ``vireid``, camera isolation, as many SuperNodes as
  the proxy has cameras (4); the final checkpoint differs from the initial model;
- without data the command exits non-zero and prints the ServerApp's reason;
- a round in which every client fails ends the run, with the clients' reason,
  and leaves no ``latest.npz``.

Only the model size and the data folder are overridden, to keep the runs short.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")

from veilface.cli.main import main
from veilface.federated.deploy import LocalDeployment
from veilface.federated.run_artifacts import load_checkpoint

TINY_MODEL = {
    "pretrained": False,
    "width-mult": 0.25,
    "last-channel": 64,
    "stem-depth": 1,
    "batch-ids": 2,
    "batch-instances": 2,
    "server-threads": 1,
}


def _cli_overrides(config: dict[str, object]) -> list[str]:
    out: list[str] = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = repr(value)
        out += ["--run-config", f"{key}={text}"]
    return out


@pytest.fixture(scope="module")
def tiny_proxy(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    from veilface.federated.vireid.proxy import ProxyConfig, build_proxy

    return build_proxy(
        data_dir / "lfw",
        tmp_path_factory.mktemp("vireid") / "proxy",
        ProxyConfig(num_train_ids=6, num_test_ids=4, max_images=4, image_size=32),
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deploy_local_run_with_its_defaults_trains_the_model(
    tmp_path: Path, tiny_proxy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from veilface.federated.arrays import state_arrays
    from veilface.federated.vireid.flower import build_model, model_id, vireid_config

    work = tmp_path / "deploy"
    overrides = {"num-server-rounds": 1, "data-dir": str(tiny_proxy), **TINY_MODEL}
    rc = main(
        [
            "fed",
            "deploy-local",
            "--work-dir",
            str(work),
            "--run",
            "--json",
            str(tmp_path / "o.json"),
        ]
        + _cli_overrides(overrides)
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:] + (work / "flwr-run.log").read_text()[-3000:]
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["supernodes"] == 4  # camera isolation over the proxy's 4 cameras
    assert result["status"] == "finished:completed" and result["error"] is None
    assert "final model:" in captured.out
    # the default out-dir is a fresh folder under the work dir
    out = Path(result["out_dir"])
    assert out.parent == work / "out"
    cfg = vireid_config({"num-server-rounds": 1, "out-dir": str(out), **overrides})
    mid = model_id(cfg)
    final = load_checkpoint(result["final_checkpoint"], model_id=mid)
    initial = load_checkpoint(out / "checkpoints" / "round_0000.npz", model_id=mid)
    fresh = state_arrays(build_model(cfg))
    floats = [k for k in fresh if np.issubdtype(fresh[k].dtype, np.floating)]
    # round 0 is the initial model (the transport turns 0-d arrays into (1,))
    assert all(np.array_equal(initial[k].reshape(-1), fresh[k].reshape(-1)) for k in floats)
    moved = [k for k in floats if not np.array_equal(final[k], initial[k])]
    assert len(moved) > len(floats) // 2, "the trained model must differ from the initial one"
    # each of the 4 sites trained its camera (stems of both modalities were updated)
    assert any(k.startswith("stems.visible") for k in moved)
    assert any(k.startswith("stems.infrared") for k in moved)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deploy_local_without_data_exits_non_zero_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VEILFACE_DATA", raising=False)
    empty = tmp_path / "no-proxy-here"
    rc = main(
        ["fed", "deploy-local", "--work-dir", str(tmp_path / "deploy"), "--run"]
        + _cli_overrides({"num-server-rounds": 2, "data-dir": str(empty)})
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "finished:failed" in err
    assert f"no proxy at {empty}" in err and "set run-config lfw-dir" in err
    assert "flwr-run.log" in err  # where the full log is


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_round_where_every_client_fails_fails_the_run_with_their_reason(
    tmp_path: Path, tiny_proxy: Path
) -> None:
    """The issue's first failure: camera isolation (4 cameras) on 2 SuperNodes."""
    out = tmp_path / "out"
    config = {
        "task": "vireid",
        "protocol": "camera-isolation",
        "num-server-rounds": 2,
        "data-dir": str(tiny_proxy),
        "out-dir": str(out),
        **TINY_MODEL,
    }
    with LocalDeployment(tmp_path / "deploy", num_supernodes=2, startup_timeout=180) as dep:
        outcome = dep.run(config, timeout=500)
    assert not outcome.ok and outcome.status == "finished:failed"
    error = outcome.error or ""
    assert error.startswith("round 1: no client succeeded in 'train' (2 sent: 2 failed)"), error
    reason = "InvalidArgument: camera isolation needs one client per camera: 4 cameras"
    assert error.count(reason) == 1, error  # both clients said it; reported once
    assert "ROUND 2/2" not in outcome.server_log  # the run stopped at the failed round
    assert (out / "checkpoints" / "round_0000.npz").is_file()  # the initial model
    assert not (out / "checkpoints" / "latest.npz").exists()  # never written as final
