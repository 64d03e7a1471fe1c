"""Deployment Engine: the project's real apps over TLS with SuperNode authentication.

Starts ``flower-superlink`` (TLS, ``--enable-supernode-auth``) and two
``flower-supernode`` processes on 127.0.0.1 with free ports, registers their
keys with ``flwr supernode register``, runs the VI-ReID task (tiny model, a
tiny LFW proxy, plain FedAvg with client-side DP clipping) for two rounds with
``flwr run``, and stops everything in teardown. ``FLWR_HOME`` points into the
test's temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")

from cryptography import x509

from veilface.errors import InvalidArgument
from veilface.federated import deploy
from veilface.federated.deploy import (
    DeploymentError,
    LocalDeployment,
    generate_node_keys,
    generate_tls,
    write_launcher_app,
)

TINY_VIREID = {
    "task": "vireid",
    "num-server-rounds": 2,
    "method": "fedavg",
    "protocol": "entity-isolation",
    "pretrained": False,
    "width-mult": 0.25,
    "last-channel": 64,
    "stem-depth": 1,
    "batch-ids": 2,
    "batch-instances": 2,
    "client-threads": 1,
    "server-threads": 1,
    "dp-mode": "client",
    "dp-clip-norm": 5.0,
    "dp-noise-multiplier": 0.001,
}


def test_tls_material_is_a_valid_chain(tmp_path: Path) -> None:
    files = generate_tls(tmp_path, hosts=("127.0.0.1", "localhost"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert files.server_key.stat().st_mode & 0o077 == 0


def test_node_keys_load_the_way_flwr_loads_them(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    pair = generate_node_keys(tmp_path, "node-0")
    assert try_load_public_key(pair.public_key)
    load_ssh_private_key(pair.private_key.read_bytes(), password=None)
    with pytest.raises(InvalidArgument):
        generate_node_keys(tmp_path, "../escape")


def test_launcher_app_is_a_valid_flower_app(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate

    config = {**deploy.project_run_config(), **TINY_VIREID}
    app = write_launcher_app(tmp_path, config)
    loaded, _ = load_and_validate(app / "pyproject.toml", check_module=True)
    flwr_app = loaded["tool"]["flwr"]["app"]
    assert flwr_app["components"]["serverapp"] == "veilface.federated.server_app:app"
    assert flwr_app["config"]["dp-mode"] == "client"
    with pytest.raises(InvalidArgument):
        write_launcher_app(tmp_path, {"bad": [1, 2]})


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_rounds_over_tls_with_node_auth(tmp_path: Path, data_dir: Path) -> None:
    from veilface.federated.vireid.proxy import ProxyConfig, build_proxy

    proxy = build_proxy(
        data_dir / "lfw",
        tmp_path / "proxy",
        ProxyConfig(num_train_ids=6, num_test_ids=4, max_images=4, image_size=32),
    )
    out_dir = tmp_path / "out"
    with LocalDeployment(tmp_path / "deploy", num_supernodes=2, startup_timeout=180) as dep:
        assert len(dep.pids) == 3
        assert "Uvicorn running on https://" in (dep.work_dir / "superlink.log").read_text()
        # node authentication is enforced: a key nobody registered is refused
        rogue = generate_node_keys(tmp_path / "rogue", "rogue")
        code, log = dep.probe_supernode(rogue.private_key, timeout=120)
        assert code not in (None, 0), log
        assert "Failed to activate SuperNode" in log
        outcome = dep.run(
            {**TINY_VIREID, "data-dir": str(proxy), "out-dir": str(out_dir)}, timeout=900
        )
        pids = dep.pids
    assert dep.pids == []
    for pid in pids:  # every process we started is gone
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(pid, 0)
    assert outcome.ok, outcome.server_log[-3000:]
    # both rounds aggregated real replies from both SuperNodes, with DP applied
    assert outcome.server_log.count("Received 2 results and 0 failures") >= 2
    assert outcome.server_log.count("central DP noise") == 2
    run = json.loads((out_dir / "run.json").read_text())
    assert sorted(run["train_metrics"]) == ["1", "2"]
    assert all("loss" in m for m in run["train_metrics"].values())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]][-2:] == [1, 2]
    clipped = sum(
        (dep.work_dir / f"supernode-{i}.log").read_text().count("clipped by value")
        for i in range(2)
    )
    assert clipped == 4  # two nodes x two rounds


def test_run_before_start_is_a_clear_error(tmp_path: Path) -> None:
    dep = LocalDeployment(tmp_path)
    with pytest.raises(DeploymentError, match="start"):
        dep.probe_supernode(tmp_path / "x.key")


def test_cli_registers_fed_deploy_local_and_parses_overrides() -> None:
    from veilface.cli.fed_deploy import parse_overrides
    from veilface.cli.main import build_parser

    args = build_parser().parse_args(
        ["fed", "deploy-local", "--run", "--run-config", "task='pad'", "--run-config",
         "num-server-rounds=2", "--supernodes", "3"]
    )  # fmt: skip
    assert args.run and args.supernodes == 3
    assert parse_overrides(args.run_config) == {"task": "pad", "num-server-rounds": 2}
    assert parse_overrides(["secagg=true", "dp-clip-norm=0.5"]) == {
        "secagg": True,
        "dp-clip-norm": 0.5,
    }
    with pytest.raises(InvalidArgument, match="quote strings"):
        parse_overrides(["task=vireid"])
    with pytest.raises(InvalidArgument, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def test_a_process_that_dies_is_a_clear_error_with_its_log(tmp_path: Path) -> None:
    """What start()/run() report when e.g. the SuperLink cannot bind its port."""
    import sys
    import time

    dep = LocalDeployment(tmp_path)
    script = "print('[Errno 98] address already in use'); raise SystemExit(3)"
    dep._spawn("superlink", [sys.executable, "-c", script], tmp_path / "home")
    dep._spawn("supernode-0", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path)
    pids = list(dep.pids)
    deadline = time.monotonic() + 30
    with pytest.raises(DeploymentError, match=r"superlink exited with code 3(.|\n)*Errno 98"):
        while time.monotonic() < deadline:
            dep.check_alive()
            time.sleep(0.1)
    dep.stop(grace=5)
    assert dep.pids == []
    import os

    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
