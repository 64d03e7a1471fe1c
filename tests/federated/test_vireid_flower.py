"""Federated VI-ReID on Flower: proxy, client/server code paths, real simulated rounds.

Everything runs on a tiny random model (MobileNetV2 width 0.25, 32x32
images) and a tiny proxy rendered from synthetic "LFW" photos written to
tmp_path, so no shared data is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("flwr")

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from veilface.errors import InvalidArgument
from veilface.federated.arrays import state_arrays
from veilface.federated.run_artifacts import CheckpointError, load_checkpoint
from veilface.federated.server_app import UnknownTaskError, load_task
from veilface.federated.vireid.datasets import DatasetLayoutError
from veilface.federated.vireid.flower import (
    CLASSIFIER_STATE_KEY,
    build_model,
    client_evaluate,
    client_train,
    model_id,
    vireid_config,
)
from veilface.federated.vireid.proxy import (
    PROXY_CAMERAS,
    ProxyConfig,
    build_proxy,
    load_proxy,
    partition,
    proxy_query_gallery,
)
from veilface.federated.vireid.strategy import (
    PROTOTYPES_KEY,
    PrototypeFedAvg,
    prototypes_record,
    read_prototypes,
)
from veilface.federated.vireid.training import compute_prototypes

TWO_CAMERAS = (PROXY_CAMERAS[0], PROXY_CAMERAS[2])  # one visible, one infrared


def _fake_lfw(root: Path, people: int = 12, photos: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(people):
        d = root / f"Person_{i:02d}"
        d.mkdir(parents=True)
        base = rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)
        for j in range(photos):
            img = np.asarray(Image.fromarray(base).resize((250, 250), Image.Resampling.BILINEAR))
            noisy = img.astype(np.int16) + rng.integers(-25, 25, img.shape)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
                d / f"Person_{i:02d}_{j + 1:04d}.jpg"
            )
    return root


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("vireid")
    lfw = _fake_lfw(base / "lfw")
    cfg = ProxyConfig(num_train_ids=8, num_test_ids=4, image_size=32, cameras=TWO_CAMERAS)
    return build_proxy(lfw, base / "proxy", cfg)


def _overrides(proxy_dir: Path, out_dir: Path | str = "", **extra: Any) -> dict[str, Any]:
    return {
        "task": "vireid",
        "num-server-rounds": 2,
        "data-dir": str(proxy_dir),
        "out-dir": str(out_dir),
        "width-mult": 0.25,
        "last-channel": 64,
        "pretrained": False,
        "batch-ids": 4,
        "batch-instances": 2,
        "min-available-nodes": 2,
        "min-train-nodes": 2,
        "fraction-evaluate": 0.0,
        **extra,
    }


@pytest.fixture()
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's ids; set them outside a runtime."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None  # type: ignore[assignment]


# --------------------------------------------------------------------------
# proxy
# --------------------------------------------------------------------------


def test_proxy_layout_and_protocols(proxy_dir: Path) -> None:
    train = load_proxy(proxy_dir, "train")
    test = load_proxy(proxy_dir, "test")
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert set(np.unique(train.pids)) == set(range(8))
    assert set(np.unique(test.pids)) == set(range(8, 12))  # disjoint identities
    assert set(np.unique(train.camids)) == {1, 3}
    ir = train.images[train.modalities == 1]
    assert np.array_equal(ir[..., 0], ir[..., 1])  # synthetic thermal: one channel
    manifest = json.loads((proxy_dir / "manifest.json").read_text())
    assert "NOT a real VI-ReID set" in manifest["proxy"]

    cams = [partition(train, "camera-isolation", i, 2) for i in range(2)]
    assert [set(c.camids.tolist()) for c in cams] == [{1}, {3}]
    assert [set(c.modalities.tolist()) for c in cams] == [{0}, {1}]
    with pytest.raises(InvalidArgument, match="one client per camera"):
        partition(train, "camera-isolation", 0, 3)
    ents = [partition(train, "entity-isolation", i, 2) for i in range(2)]
    assert not set(ents[0].pids.tolist()) & set(ents[1].pids.tolist())
    shared = [partition(train, "entity-sharing", i, 2) for i in range(2)]
    assert sum(len(s) for s in shared) == len(train)
    assert all(set(s.modalities.tolist()) == {0, 1} for s in shared)
    with pytest.raises(InvalidArgument, match="unknown protocol"):
        partition(train, "everyone", 0, 2)

    query, gallery = proxy_query_gallery(test)
    assert set(query.modalities.tolist()) == {1} and set(gallery.modalities.tolist()) == {0}


def test_proxy_bad_input(tmp_path: Path) -> None:
    cfg = ProxyConfig(num_train_ids=8, num_test_ids=4, image_size=32)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        build_proxy(tmp_path / "missing", tmp_path / "out", cfg)
    lfw = _fake_lfw(tmp_path / "lfw", people=5)
    with pytest.raises(DatasetLayoutError, match="the proxy needs 12"):
        build_proxy(lfw, tmp_path / "out", cfg)
    with pytest.raises(DatasetLayoutError, match="build the proxy first"):
        load_proxy(tmp_path / "out", "train")
    (tmp_path / "out" / "train.npz").write_bytes(b"garbage")
    with pytest.raises(DatasetLayoutError, match="not a proxy array file"):
        load_proxy(tmp_path / "out", "train")
    small = ProxyConfig(num_train_ids=3, num_test_ids=2, image_size=32)
    (lfw / "Person_00" / "Person_00_0001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetLayoutError, match="cannot read LFW image"):
        build_proxy(lfw, tmp_path / "out2", small)


# --------------------------------------------------------------------------
# configuration and dispatch
# --------------------------------------------------------------------------


def test_dispatch_and_config_errors() -> None:
    assert load_task("vireid").server_main is not None
    with pytest.raises(UnknownTaskError, match="unknown federated task 'reid'"):
        load_task("reid")
    base = {"num-server-rounds": 1}
    with pytest.raises(InvalidArgument, match="method='fedprox'"):
        vireid_config({**base, "method": "fedprox"})
    with pytest.raises(InvalidArgument, match="protocol="):
        vireid_config({**base, "protocol": "x"})
    with pytest.raises(InvalidArgument, match="pretrained=true needs width-mult=1.0"):
        vireid_config({**base, "width-mult": 0.5, "pretrained": True})
    with pytest.raises(InvalidArgument, match="proto-source='server'"):
        vireid_config({**base, "proto-source": "server"})
    with pytest.raises(InvalidArgument, match="local-epochs must be > 0"):
        vireid_config({**base, "local-epochs": 0})
    with pytest.raises(InvalidArgument, match=r"server-momentum must be in \[0, 1\)"):
        vireid_config({**base, "server-momentum": 1.0})
    assert vireid_config({**base, "local-epochs": 0.5})["local-epochs"] == 0.5


# --------------------------------------------------------------------------
# client code path (called directly, no simulation)
# --------------------------------------------------------------------------


def _train_message(cfg: dict[str, Any], round_: int, protos: ArrayRecord | None = None) -> Message:
    model = build_model(cfg)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in state_arrays(model).items()}),
            "config": ConfigRecord({"server-round": round_}),
        }
    )
    if protos is not None:
        content[PROTOTYPES_KEY] = protos
    return Message(content=content, dst_node_id=0, message_type="train")


@pytest.mark.slow
def test_client_keeps_classifier_local_and_sends_prototypes(
    proxy_dir: Path, task_identity: None
) -> None:
    cfg = vireid_config({**_overrides(proxy_dir, method="l2rw"), "proto-source": "local"})
    ctx = Context(
        run_id=1,
        node_id=0,
        node_config={"partition-id": 1, "num-partitions": 2},  # the infrared camera
        state=RecordDict(),
        run_config=cfg,
    )
    reply = client_train(_train_message(cfg, 1), ctx)
    arrays = reply.content.array_records["arrays"]
    assert not any(k.startswith("classifier") for k in arrays)
    assert not any(k.startswith("stems.visible") for k in arrays)  # not trained here
    assert any(k.startswith("stems.infrared") for k in arrays)
    pids, vectors, counts = read_prototypes(reply.content.array_records[PROTOTYPES_KEY])
    assert set(pids.tolist()) == set(range(8)) and counts.sum() > 0
    norms = np.linalg.norm(vectors, axis=1)  # means of unit vectors
    assert np.all(norms > 0) and np.all(norms <= 1 + 1e-5)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] > 0
    assert metrics["train-seconds"] > 0 and metrics["proto-seconds"] > 0  # cost breakdown
    first = ctx.state.array_records[CLASSIFIER_STATE_KEY]["fc.weight"].numpy().copy()
    assert first.shape == (8, 64)

    # round 2 with global prototypes: the stored classifier is reused and trained further
    protos = prototypes_record(pids, vectors, counts)
    reply2 = client_train(_train_message(cfg, 2, protos), ctx)
    assert reply2.content.metric_records["metrics"]["proto_loss"] > 0
    second = ctx.state.array_records[CLASSIFIER_STATE_KEY]["fc.weight"].numpy()
    assert not np.array_equal(first, second)

    # proto-source=global: the prototypes are those of the received model, not the trained one
    gcfg = {**cfg, "proto-source": "global"}
    gctx = Context(1, 0, {"partition-id": 1, "num-partitions": 2}, RecordDict(), gcfg)
    gmsg = _train_message(gcfg, 1)
    greply = client_train(gmsg, gctx)
    received = build_model(gcfg)
    data = partition(load_proxy(cfg["data-dir"], "train"), cfg["protocol"], 1, 2)
    expected = compute_prototypes(received, data)
    gpids, gvectors, _ = read_prototypes(greply.content.array_records[PROTOTYPES_KEY])
    assert gpids.tolist() == expected.pids.tolist()
    np.testing.assert_allclose(gvectors, expected.vectors, atol=1e-5)
    assert not np.allclose(vectors, gvectors, atol=1e-3)  # local ones came after training

    ev = client_evaluate(_train_message(cfg, 2), ctx)
    m = ev.content.metric_records["metrics"]
    assert 0.0 <= m["local-accuracy"] <= 1.0 and m["num-examples"] > 0

    # plain FedAvg sends everything, the classifier over the global identities included
    fcfg = vireid_config(_overrides(proxy_dir, method="fedavg"))
    fctx = Context(1, 0, {"partition-id": 0, "num-partitions": 2}, RecordDict(), fcfg)
    msg = _train_message(fcfg, 1)
    reply3 = client_train(msg, fctx)
    keys = set(reply3.content.array_records["arrays"])
    assert "classifier.fc.weight" in keys and any(k.startswith("stems.infrared") for k in keys)
    assert PROTOTYPES_KEY not in reply3.content.array_records
    assert reply3.content.metric_records["metrics"]["proto-seconds"] == 0.0


def test_client_without_partition_config_is_a_clear_error(
    proxy_dir: Path, task_identity: None
) -> None:
    cfg = vireid_config(_overrides(proxy_dir))
    ctx = Context(1, 0, {}, RecordDict(), cfg)
    with pytest.raises(InvalidArgument, match="--node-config"):
        client_train(_train_message(cfg, 1), ctx)


# --------------------------------------------------------------------------
# strategy (aggregation), with a failed reply
# --------------------------------------------------------------------------


def _reply(
    request: Message, arrays: dict[str, np.ndarray], n: float, protos: ArrayRecord | None
) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "loss": 1.0}),
        }
    )
    if protos is not None:
        content[PROTOTYPES_KEY] = protos
    return Message(content=content, reply_to=request)


def test_partial_averaging_prototypes_and_a_lost_client(task_identity: None) -> None:
    strategy = PrototypeFedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy.global_arrays = {
        "a": np.zeros(2, np.float32),
        "b": np.zeros(2, np.float32),
        "c": np.full(2, 5.0, np.float32),
        "n": np.array([3], np.int64),
    }
    req = Message(content=RecordDict(), dst_node_id=7, message_type="train")
    p1 = prototypes_record(np.array([1, 2]), np.eye(2, dtype=np.float32), np.array([1.0, 1.0], np.float32))
    p2 = prototypes_record(np.array([2]), np.array([[0.0, 1.0]], np.float32), np.array([3.0], np.float32))
    replies = [
        _reply(req, {"a": np.ones(2, np.float32), "b": np.full(2, 2.0, np.float32)}, 1.0, p1),
        _reply(req, {"a": np.full(2, 4.0, np.float32), "n": np.array([5], np.int64)}, 3.0, p2),
        Message(Error(code=0, reason="site lost power"), reply_to=req),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["a"].numpy(), 3.25)  # (1*1 + 3*4) / 4
    np.testing.assert_allclose(arrays["b"].numpy(), 2.0)  # only the first sent it
    np.testing.assert_allclose(arrays["c"].numpy(), 5.0)  # nobody sent it: kept
    assert arrays["n"].numpy().dtype == np.int64 and int(arrays["n"].numpy()[0]) == 5
    assert metrics["num-clients"] == 2 and metrics["num-failures"] == 1
    pids, vectors, counts = read_prototypes(strategy.prototypes)
    assert pids.tolist() == [1, 2] and counts.tolist() == [1.0, 4.0]
    np.testing.assert_allclose(vectors[0], [1.0, 0.0])
    expected = np.array([0.0, 1.0])  # identity 2: 1x(0,1) + 3x(0,1), normalised
    np.testing.assert_allclose(vectors[1], expected, atol=1e-6)
    # every client lost: no aggregate, the round still ends
    assert strategy.aggregate_train(2, [replies[2]]) == (None, None)


def test_server_momentum_carries_the_step_but_not_batchnorm_statistics(
    task_identity: None,
) -> None:
    with pytest.raises(ValueError, match="server_momentum"):
        PrototypeFedAvg(server_momentum=1.0)
    strategy = PrototypeFedAvg(server_momentum=0.5, min_train_nodes=1, min_available_nodes=1)
    req = Message(content=RecordDict(), dst_node_id=7, message_type="train")
    glob = {"w": np.zeros(2, np.float32), "bn.running_mean": np.zeros(2, np.float32)}
    seen = []
    for rnd in (1, 2):
        strategy.global_arrays = glob
        # every site moves each array one unit up from the global value it received
        reply = _reply(req, {k: v + 1.0 for k, v in glob.items()}, 1.0, None)
        arrays, _ = strategy.aggregate_train(rnd, [reply])
        assert arrays is not None
        glob = {k: v.numpy() for k, v in arrays.items()}
        seen.append((float(glob["w"][0]), float(glob["bn.running_mean"][0])))
    # w: step 1, then 1 + 0.5 * 1 (velocity); running statistics: plain mean, +1 per round
    assert seen == [(1.0, 1.0), (2.5, 2.0)]


# --------------------------------------------------------------------------
# real Flower rounds on the Simulation Engine
# --------------------------------------------------------------------------


def _flaky_client_app(overrides: dict[str, Any]) -> Any:
    """The real ClientApp, except that site 1 crashes in round 2 (a lost client)."""
    from flwr.clientapp import ClientApp

    from veilface.federated.client_app import make_client_app

    inner = make_client_app(overrides)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        rnd = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        if int(context.node_config["partition-id"]) == 1 and rnd == 2:
            raise RuntimeError("site 1 lost power")
        return inner(msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


@pytest.mark.slow
def test_simulation_rounds_with_a_lost_client(proxy_dir: Path, tmp_path: Path) -> None:
    from flwr.simulation import run_simulation

    from veilface.federated.server_app import make_server_app

    out = tmp_path / "run"
    overrides = _overrides(proxy_dir, out, method="l2rw")
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=_flaky_client_app(overrides),
        num_supernodes=2,
        backend_config={
            "client_resources": {"num_cpus": 1},
            "init_args": {"log_to_driver": False},
        },
    )
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert 0.0 <= r["rank1"] <= r["rank5"] <= r["rank10"] <= 1.0
        assert 0.0 < r["map"] <= 1.0 and 0.0 < r["minp"] <= 1.0
    assert (out / "metrics.png").stat().st_size > 1000
    run = json.loads((out / "run.json").read_text())
    assert run["train_metrics"]["1"]["num-clients"] == 2
    assert run["train_metrics"]["2"]["num-clients"] == 1  # the round completed without site 1
    assert run["train_metrics"]["2"]["num-failures"] == 1

    cfg = vireid_config(overrides)
    mid = model_id(cfg)
    r1 = load_checkpoint(out / "checkpoints" / "round_0001.npz", model_id=mid)
    r2 = load_checkpoint(out / "checkpoints" / "latest.npz", model_id=mid)
    assert not np.array_equal(r1["backbone.18.0.weight"], r2["backbone.18.0.weight"])
    assert not any(k.startswith("classifier") for k in r2)  # classifiers never left the sites
    with pytest.raises(CheckpointError, match="another|not"):
        load_checkpoint(out / "checkpoints" / "latest.npz", model_id=model_id({**cfg, "width-mult": 1.0}))
