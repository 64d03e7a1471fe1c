"""Privacy options: typed config, and real Flower simulation runs with DP and SecAgg+.

The simulation tests run a tiny numpy linear-regression ClientApp (real local
gradient steps on per-client data) under ``flwr.simulation.run_simulation``
with the Message-API ``FedAvg`` wrapped by ``privacy.wrap_strategy``. The
ServerApp runs in this process, so a recording ``FedAvg`` subclass keeps
what the server actually received.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from veilface.federated import privacy
from veilface.federated.privacy import PrivacyConfig, PrivacyConfigError

DIM = 400
NUM_CLIENTS = 3
_BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


# ----------------------------------------------------------------- config parsing


def test_defaults_are_off() -> None:
    cfg = PrivacyConfig.from_run_config({"task": "vireid"})
    assert not cfg.enabled
    strategy = FedAvg()
    assert privacy.wrap_strategy(strategy, cfg) is strategy


def test_parses_run_config_strings() -> None:
    cfg = PrivacyConfig.from_run_config(
        {
            "dp-mode": "client",
            "dp-clip-norm": "0.5",
            "dp-noise-multiplier": 0,
            "secagg": "true",
            "secagg-shares": "3",
            "secagg-threshold": 0.6,
        }
    )
    assert cfg.dp_mode == "client" and cfg.dp_clip_norm == 0.5
    assert cfg.secagg and cfg.secagg_shares == 3 and cfg.secagg_threshold == 0.6
    wrapped = privacy.wrap_strategy(FedAvg(), cfg, num_sampled_clients=3)
    assert isinstance(wrapped, privacy.SecAggPlusStrategy)
    assert isinstance(wrapped.strategy, DifferentialPrivacyClientSideFixedClipping)
    server = privacy.wrap_strategy(
        FedAvg(), PrivacyConfig(dp_mode="server", dp_clip_norm=2.0), num_sampled_clients=2
    )
    assert isinstance(server, DifferentialPrivacyServerSideFixedClipping)


@pytest.mark.parametrize(
    ("run_config", "needle"),
    [
        ({"dp-mode": "local"}, "dp-mode"),
        ({"dp-mode": "client", "dp-clip-norm": 0}, "dp-clip-norm"),
        ({"dp-noise-multiplier": -1}, "dp-noise-multiplier"),
        ({"dp-clip-norm": "abc"}, "dp-clip-norm"),
        ({"secagg": "maybe"}, "secagg"),
        ({"secagg": True, "dp-mode": "server"}, "dp-mode='client'"),
        ({"secagg-shares": 2}, "secagg-shares"),
        ({"secagg-shares": 3, "secagg-threshold": 3}, "secagg-threshold"),
        ({"secagg-threshold": 1.5}, "secagg-threshold"),
    ],
)
def test_bad_values_raise_typed_error(run_config: dict[str, Any], needle: str) -> None:
    with pytest.raises(PrivacyConfigError, match=needle):
        PrivacyConfig.from_run_config(run_config)


def test_dp_needs_a_client_count() -> None:
    with pytest.raises(PrivacyConfigError, match="dp-sampled-clients"):
        privacy.wrap_strategy(FedAvg(), PrivacyConfig(dp_mode="client"))


def test_privacy_refuses_multi_record_messages_with_the_fix() -> None:
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    privacy.check_train_content(RecordDict({"arrays": arrays, "config": ConfigRecord()}))
    # a second ArrayRecord, like VI-ReID's prototypes under method='l2rw'
    two = RecordDict({"arrays": arrays, "prototypes": arrays, "config": ConfigRecord()})
    with pytest.raises(PrivacyConfigError, match="method='fedavg'"):
        privacy.check_train_content(two, "PrototypeFedAvg")


def test_secagg_refuses_a_model_beyond_its_clipping_range() -> None:
    cfg = PrivacyConfig(secagg=True)
    small = ArrayRecord({"w": Array(np.full(4, 7.5, dtype=np.float32))})
    privacy.check_secagg_range(small, cfg)
    big = ArrayRecord(
        {
            "w": Array(np.zeros(4, dtype=np.float32)),
            "bn.running_mean": Array(np.array([1.0, -76.6], dtype=np.float32)),
        }
    )
    with pytest.raises(PrivacyConfigError, match="'bn.running_mean'.*secagg-clipping-range=256"):
        privacy.check_secagg_range(big, cfg)
    privacy.check_secagg_range(big, PrivacyConfig(secagg=True, secagg_clipping_range=256.0))


# ----------------------------------------------------------------- tiny real app


def _client_data(partition: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + partition)
    w_true = np.random.default_rng(7).normal(size=DIM).astype(np.float32)
    x = rng.normal(size=(64 + 16 * partition, DIM)).astype(np.float32)
    y = x @ w_true + 0.01 * rng.normal(size=x.shape[0]).astype(np.float32)
    return x, y


def _local_update(partition: int, w0: np.ndarray) -> tuple[np.ndarray, int]:
    """Five full-batch gradient steps on the client's least-squares loss."""
    x, y = _client_data(partition)
    w = w0.astype(np.float32).copy()
    for _ in range(5):
        w -= 0.05 * (x.T @ (x @ w - y)) / x.shape[0]
    return w, int(x.shape[0])


class _SpyGrid(Grid):
    """Delegating grid that keeps every reply the server receives."""

    def __init__(self, grid: Grid, seen: list[Message]) -> None:
        self._grid, self._seen = grid, seen

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Any:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Any) -> Any:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._seen.extend(replies)
        return replies


def _make_client_app() -> ClientApp:
    app = ClientApp(mods=privacy.client_mods())

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == int(msg.content["config"].get("fail-partition", -1)):  # type: ignore[arg-type]
            raise RuntimeError(f"site {partition} drops out mid-round")
        w0 = msg.content["arrays"]["w"].numpy().astype(np.float32)
        w, n = _local_update(partition, w0)
        raw_norm = float(np.linalg.norm(w - w0))
        # an integer buffer, like BatchNorm's num_batches_tracked
        steps = np.rint(msg.content["arrays"]["steps"].numpy()).astype(np.int64) + 1
        reply = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(w), "steps": Array(steps)}),
                "metrics": MetricRecord({"num-examples": n, "raw-update-norm": raw_norm}),
            }
        )
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        x, y = _client_data(int(context.node_config["partition-id"]))
        w = msg.content["arrays"]["w"].numpy()
        mse = float(np.mean((x @ w - y) ** 2))
        metrics = MetricRecord({"num-examples": int(x.shape[0]), "mse": mse})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


class _RecordingFedAvg(FedAvg):
    """FedAvg that keeps every train reply's arrays and metrics, and the aggregates."""

    def __init__(self, log: dict[str, list[Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log = log

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Any:
        self.log["starts"].append(arrays["w"].numpy().copy())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.log["replies"].append(
            [
                (
                    r.content["arrays"]["w"].numpy().copy(),
                    dict(r.content["metrics"]),
                )
                for r in replies
            ]
        )
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.log["fedavg"].append(arrays["w"].numpy().copy())
        return arrays, metrics


def _run(
    run_config: dict[str, Any], rounds: int = 2, fail_partition: int = -1
) -> dict[str, list[Any]]:
    from flwr.simulation import run_simulation

    log: dict[str, list[Any]] = {
        "replies": [],
        "fedavg": [],
        "global": [],
        "wrapped": [],
        "starts": [],
        "wire": [],
    }
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        base = _RecordingFedAvg(
            log,
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_available_nodes=NUM_CLIENTS,
            min_train_nodes=NUM_CLIENTS,
            min_evaluate_nodes=NUM_CLIENTS,
        )
        strategy = privacy.prepare_strategy(base, context, num_sampled_clients=NUM_CLIENTS)
        log["wrapped"].append(strategy)
        initial = ArrayRecord(
            {
                "w": Array(np.zeros(DIM, dtype=np.float32)),
                "steps": Array(np.zeros(1, dtype=np.int64)),
            }
        )
        result = strategy.start(
            grid=_SpyGrid(grid, log["wire"]),
            initial_arrays=initial,
            num_rounds=rounds,
            timeout=120,
            train_config=ConfigRecord({"lr": 0.05, "fail-partition": fail_partition}),
        )
        log["global"].append(result.arrays["w"].numpy().copy())
        log["eval"] = [result.evaluate_metrics_clientapp]

    run_simulation(
        server_app=server,
        client_app=_make_client_app(),
        num_supernodes=NUM_CLIENTS,
        backend_config=_BACKEND,  # type: ignore[arg-type]
    )
    return log


@pytest.mark.slow
def test_client_side_clipping_bounds_updates_and_adds_noise() -> None:
    clip, noise = 0.5, 0.8
    log = _run({"dp-mode": "client", "dp-clip-norm": clip, "dp-noise-multiplier": noise})
    assert isinstance(log["wrapped"][0], DifferentialPrivacyClientSideFixedClipping)
    assert len(log["replies"]) == 2, "both rounds must aggregate"
    # global model the server released after each round (next round's start, then final)
    released = [*log["starts"][1:], log["global"][0]]
    stdv = noise * clip / NUM_CLIENTS
    for start, replies, fedavg, out in zip(
        log["starts"], log["replies"], log["fedavg"], released, strict=True
    ):
        assert len(replies) == NUM_CLIENTS
        for w, metrics in replies:
            # the clients really moved further than the bound...
            assert metrics["raw-update-norm"] > 2 * clip
            # ...and what the server received is clipped to it
            assert np.linalg.norm(w - start) <= clip * (1 + 1e-4)
        assert np.linalg.norm(fedavg - start) <= clip * (1 + 1e-4)
        # the release is FedAvg(clipped) + N(0, stdv^2) per coordinate
        added = out - fedavg
        assert abs(float(np.std(added)) / stdv - 1.0) < 0.2
        assert abs(float(np.mean(added))) < 5 * stdv / math.sqrt(DIM)


@pytest.mark.slow
def test_secaggplus_masks_updates_survives_a_dropout_and_aggregates_like_fedavg() -> None:
    """3 sites, shares 3, threshold 2; site 2 fails in the masked-vector stage every round."""
    log = _run({"secagg": True, "secagg-shares": 3, "secagg-threshold": 2}, fail_partition=2)
    wrapped = log["wrapped"][0]
    assert isinstance(wrapped, privacy.SecAggPlusStrategy)
    assert wrapped.rounds_completed == 2
    survivors = NUM_CLIENTS - 1
    # Everything that came back over the grid: train replies carry no parameters
    # in the clear, only SecAgg+ records (public keys, encrypted shares, masked
    # integer vectors, key shares); evaluate replies carry metrics only.
    masked: list[np.ndarray] = []
    for reply in log["wire"]:
        if reply.has_error():  # the dropped site
            continue
        for record in reply.content.array_records.values():
            assert len(record) == 0, "a client's parameters reached the server unmasked"
        cfg = reply.content.config_records.get("secaggplus_configs")
        if cfg is not None and "masked_params" in cfg:
            from flwr.common import bytes_to_ndarray

            masked.append(
                np.concatenate([bytes_to_ndarray(b).ravel() for b in cfg["masked_params"]])
            )
    assert len(masked) == 2 * survivors
    for vec in masked:  # uniform over [0, 2**32): nothing like a quantised update
        assert vec.min() >= 0 and vec.max() < 2**32
        assert 0.4 < float(vec.mean()) / 2**31 < 1.6
    for start, replies, secure_agg in zip(
        log["starts"], log["replies"], log["fedavg"], strict=True
    ):
        # the strategy only ever holds the aggregate: all replies carry the same arrays
        assert len(replies) == survivors
        assert all(np.array_equal(w, replies[0][0]) for w, _ in replies)
        # ...which equals the plain weighted FedAvg of the survivors' real updates:
        # the dropped site's pairwise masks were reconstructed from its neighbours' shares
        local = [_local_update(p, start) for p in range(survivors)]
        total = sum(n for _, n in local)
        plain = sum(w * (n / total) for w, n in local)
        np.testing.assert_allclose(secure_agg, plain, atol=1e-3)
        assert all(not np.allclose(secure_agg, w, atol=1e-2) for w, _ in local)
        # per-client metrics still arrive (they are not masked)
        assert sorted(m["num-examples"] for _, m in replies) == [64, 80]


@pytest.mark.slow
def test_real_vireid_app_with_client_dp_and_secaggplus(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The project's own ServerApp/ClientApp (VI-ReID, plain FedAvg, tiny model), both options."""
    import logging

    from flwr.simulation import run_simulation

    from veilface.federated.client_app import make_client_app
    from veilface.federated.run_artifacts import load_checkpoint
    from veilface.federated.server_app import make_server_app
    from veilface.federated.vireid.proxy import ProxyConfig, build_proxy

    proxy = build_proxy(
        data_dir / "lfw",
        tmp_path / "proxy",
        ProxyConfig(num_train_ids=6, num_test_ids=4, max_images=4, image_size=32),
    )
    cfg = {
        "task": "vireid",
        "num-server-rounds": 2,
        "data-dir": str(proxy),
        "out-dir": str(tmp_path / "out"),
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
        "secagg": True,
    }
    with caplog.at_level(logging.INFO):
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=make_client_app(cfg),
            num_supernodes=2,
            backend_config=_BACKEND,  # type: ignore[arg-type]
        )
    text = caplog.text
    assert text.count("Secure aggregation completed.") == 2
    assert text.count("central DP noise") == 2
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert sorted(run["train_metrics"]) == ["1", "2"]
    ckpt = tmp_path / "out" / "checkpoints"
    before = load_checkpoint(ckpt / "round_0000.npz")
    after = load_checkpoint(ckpt / "round_0002.npz")
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(moved) > len(before) // 2  # the securely aggregated model was applied
