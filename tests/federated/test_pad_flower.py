"""The ``pad`` Flower task: a real Simulation Engine run (tiny model, 2 sites, 2 domains,
one site lost mid-round)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from PIL import Image

from veilface.errors import InvalidArgument
from veilface.federated.pad.flower import PADRunConfig
from veilface.federated.pad.proxy import CAPTURE_DOMAINS, build_pad_proxy
from veilface.federated.run_artifacts import load_checkpoint


def fake_lfw(root: Path, people: int = 40) -> Path:
    """``lfw/<Name>/<Name>_NNNN.jpg`` with two flat-coloured noisy photos per person."""
    rng = np.random.default_rng(0)
    for p in range(people):
        d = root / f"Person_{p:03d}"
        d.mkdir(parents=True)
        for k in range(2):
            img = np.clip(rng.normal(rng.integers(40, 220, 3), 25, (250, 250, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(d / f"Person_{p:03d}_{k + 1:04d}.jpg")
    return root


def _context(run_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)  # type: ignore[arg-type]


def test_run_config_errors() -> None:
    with pytest.raises(InvalidArgument, match="pad-data"):
        PADRunConfig.from_context(_context({}))
    with pytest.raises(InvalidArgument, match="pad-method"):
        PADRunConfig.from_context(_context({"pad-data": "x.npz", "pad-method": "replay"}))
    with pytest.raises(InvalidArgument, match="not a int"):
        PADRunConfig.from_context(_context({"pad-data": "x.npz", "pad-local-epochs": "many"}))
    cfg = PADRunConfig.from_context(_context({"pad-data": "x.npz", "num-server-rounds": 2}))
    assert cfg.rounds_per_domain == 2 and cfg.method == "svlp"


def _client_losing_site_1_in_round_2(overrides: dict[str, object], marker: Path) -> Any:
    """The real ClientApp, except that site 1 crashes in its round-2 training (domain 1)."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from veilface.federated.pad import flower as pad_flower
    from veilface.federated.server_app import run_config, with_run_config

    def prepare(context: Context) -> Context:  # as the real ClientApp does
        return with_run_config(context, run_config(context, overrides))

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        config = msg.content.config_records["config"]
        if int(context.node_config.get("partition-id", 0)) == 1 and config.get("pad-round") == 2:
            marker.write_text("lost")
            raise RuntimeError("site 1 lost mid-round")
        return pad_flower.client_train(msg, prepare(context))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return pad_flower.client_evaluate(msg, prepare(context))

    return app


def test_aggregate_domain_metrics_weights_by_domain_counts() -> None:
    from flwr.app import MetricRecord

    from veilface.federated.pad.flower import aggregate_domain_metrics

    a = RecordDict(
        {"metrics": MetricRecord({"d0-hter": 0.2, "d0-n": 30, "loss": 1.0, "num-examples": 30})}
    )
    b = RecordDict(
        {"metrics": MetricRecord({"d0-hter": 0.6, "d0-n": 10, "loss": 3.0, "num-examples": 10})}
    )
    empty = RecordDict(
        {"metrics": MetricRecord({"d0-hter": 0.9, "d0-n": 0, "loss": 0.0, "num-examples": 1})}
    )
    out = aggregate_domain_metrics([a, b, empty], "num-examples")
    assert out["d0-hter"] == pytest.approx((0.2 * 30 + 0.6 * 10) / 40)
    assert out["d0-n"] == 40
    assert out["loss"] == pytest.approx((1.0 * 30 + 3.0 * 10) / 41)


@pytest.mark.slow
def test_pad_task_runs_on_the_simulation_engine(tmp_path: Path) -> None:
    from flwr.simulation import run_simulation

    from veilface.federated.pad.models import PromptedPAD
    from veilface.federated.pad.training import MODEL_CONFIGS
    from veilface.federated.server_app import make_server_app

    lfw = fake_lfw(tmp_path / "lfw", people=40)
    data = tmp_path / "proxy.npz"
    build_pad_proxy(lfw, per_domain=24, image_size=32, domains=CAPTURE_DOMAINS[:2]).save(data)
    out = tmp_path / "run"
    overrides = {
        "task": "pad",
        "pad-data": str(data),
        "pad-model": "tiny",
        "pad-method": "svlp",
        "num-server-rounds": 1,
        "pad-local-epochs": 1,
        "pad-prompts": 2,
        "out-dir": str(out),
    }
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=_client_losing_site_1_in_round_2(overrides, tmp_path / "lost"),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert (tmp_path / "lost").read_text() == "lost"  # the round ran on without site 1
    results = json.loads((out / "pad_results.json").read_text())
    assert results["num_domains"] == 2
    assert len(results["hter_matrix"]) == 2 and len(results["hter_matrix"][1]) == 2
    for value in results["hter_matrix"][1] + results["auc_matrix"][1]:
        assert 0.0 <= value <= 1.0
    assert math.isfinite(results["avg_hter"]) and math.isfinite(results["forgetting"])
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert {"d0-hter", "d1-acer", "d1-auc"} <= set(rounds[-1])
    assert (out / "metrics.png").is_file()
    model = PromptedPAD(MODEL_CONFIGS["tiny"], n_universal=2, n_domain=2)
    arrays = load_checkpoint(out / "checkpoints" / "latest.npz", model_id=model.model_id)
    assert "domain_prompts.1" in arrays and "domain_keys.1" in arrays
