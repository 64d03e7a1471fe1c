"""SecAgg+ for Message-API strategies, over Flower's own SecAgg+ workflow.

In flwr 1.41 the SecAgg+ server side exists only as the legacy
``flwr.server.workflow.SecAggPlusWorkflow`` (it drives a legacy
``flwr.server.strategy.Strategy`` through a ``LegacyContext``) and the client
side ``secaggplus_mod`` expects legacy ``fitins.*``/``fitres.*`` records. No
``flwr.serverapp.strategy`` class speaks it. :class:`SecAggPlusStrategy`
bridges the two without re-implementing any cryptography: it wraps a
Message-API strategy and, for every training round, runs Flower's own
``SecAggPlusWorkflow`` (all four stages: setup, share keys, collect masked
vectors, unmask) over the real grid. The workflow's legacy strategy slot is
filled by a small adapter that turns the Message-API train messages into
FitIns and captures the unmasked weighted average. The wrapped strategy then
receives one reply per surviving client, each carrying that *aggregate*
(never the client's own arrays) plus the client's plain-text metrics, so
``FedAvg``'s weighted mean returns the secure aggregate unchanged. On the
client, :func:`privacy_mod` wraps ``secaggplus_mod`` around a translator
between the legacy records and the app's ``"arrays"``/``"config"`` ->
``"arrays"``/``"metrics"`` messages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from veilface.federated.grid_proxy import ForwardingGrid
from veilface.federated.privacy.config import PrivacyConfig, PrivacyConfigError
from veilface.federated.privacy.wrappers import Delegating, strategy_weight_key

logger = logging.getLogger(__name__)

__all__ = ["ARRAY_KEYS", "WEIGHT_KEY", "SecAggPlusStrategy", "check_secagg_range"]

# Our own keys, carried in the legacy FitIns config and stripped before the app sees them.
WEIGHT_KEY = "veilface.secagg-weight-key"
ARRAY_KEYS = "veilface.secagg-array-keys"


class SecAggPlusStrategy(Delegating):
    """Run every training round of ``strategy`` through Flower's SecAgg+ workflow.

    Evaluation rounds and every other call go to ``strategy`` unchanged. In
    :meth:`start`, the grid is wrapped so that the training round's
    ``send_and_receive`` runs the SecAgg+ protocol (see the module docstring).

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        A Message-API strategy whose ``aggregate_train`` is a weighted mean
        (FedAvg and its DP wrappers); robust aggregators (median, Krum) would
        see only the identical secure aggregate and cannot do their job.
    cfg : PrivacyConfig
        SecAgg+ parameters.
    """

    def __init__(self, strategy: Strategy, cfg: PrivacyConfig) -> None:
        super().__init__(strategy)
        self.cfg = cfg
        self.current_round = 0
        self.rounds_completed = 0

    def __repr__(self) -> str:
        """Name the wrapper and what it wraps."""
        return f"SecAggPlusStrategy({self.strategy!r})"

    def summary(self) -> None:
        """Log the SecAgg+ settings, then the wrapped strategy's summary."""
        logger.info(
            "SecAgg+: shares %s, threshold %s, clipping range %s, quantization %s",
            self.cfg.secagg_shares,
            self.cfg.secagg_threshold,
            self.cfg.secagg_clipping_range,
            self.cfg.secagg_quantization_range,
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; remember the round for the secure grid."""
        self.current_round = server_round
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Run Flower's strategy loop over a grid whose train rounds use SecAgg+."""
        secure = _SecAggPlusGrid(grid, self)
        return super().start(
            secure,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def secure_round(
        self, grid: Grid, messages: list[Message], timeout: float | None
    ) -> list[Message]:
        """Run SecAgg+ for one training round's messages; return aggregate-carrying replies.

        Parameters
        ----------
        grid : flwr.serverapp.Grid
            The real grid.
        messages : list of Message
            The wrapped strategy's train messages (one ``ArrayRecord``, one
            ``ConfigRecord`` each).
        timeout : float or None
            Per-stage wait for replies.

        Returns
        -------
        list of Message
            One reply per client that completed the protocol, with ``"arrays"``
            = the unmasked weighted mean and ``"metrics"`` = the client's own
            metrics; empty when the protocol halted (too few clients left).
        """
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import (
            MAIN_CONFIGS_RECORD,
            MAIN_PARAMS_RECORD,
            Key,
        )

        first = messages[0].content
        if len(first.array_records) != 1 or len(first.config_records) != 1:
            raise PrivacyConfigError(
                "SecAgg+ needs train messages with exactly one ArrayRecord and one "
                "ConfigRecord; this strategy sends "
                f"{len(first.array_records)} and {len(first.config_records)}"
            )
        global_arrays = next(iter(first.array_records.values()))
        check_secagg_range(global_arrays, self.cfg)
        adapter = _LegacyStrategyAdapter(
            grid, messages, weight_key=strategy_weight_key(self.strategy)
        )
        state = RecordDict()
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: self.current_round}
        )
        state.array_records[MAIN_PARAMS_RECORD] = global_arrays
        base = Context(
            run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}
        )
        legacy = LegacyContext(base, strategy=adapter)
        workflow = SecAggPlusWorkflow(
            num_shares=self.cfg.secagg_shares,
            reconstruction_threshold=self.cfg.secagg_threshold,
            max_weight=self.cfg.secagg_max_weight,
            clipping_range=self.cfg.secagg_clipping_range,
            quantization_range=self.cfg.secagg_quantization_range,
            timeout=timeout,
        )
        workflow(grid, legacy)
        if adapter.aggregate is None:
            logger.warning(
                "SecAgg+ round %d halted (too few clients completed the protocol); "
                "the global model is not updated this round",
                self.current_round,
            )
            return []
        self.rounds_completed += 1
        return adapter.replies(global_arrays)


def check_secagg_range(arrays: ArrayRecord, cfg: PrivacyConfig) -> None:
    """Refuse a model SecAgg+ would silently clip.

    SecAgg+ quantises every parameter after clipping it to
    ``[-secagg-clipping-range, secagg-clipping-range]``. A global model that
    already holds larger values (BatchNorm running means of an ImageNet
    backbone reach ~77) would come back damaged.

    Raises
    ------
    PrivacyConfigError
        Naming the largest array and a range that fits.
    """
    worst_key, worst = "", 0.0
    for key, arr in arrays.items():
        values = arr.numpy()
        if values.size == 0 or not np.issubdtype(values.dtype, np.number):
            continue
        peak = float(np.max(np.abs(values.astype(np.float64))))
        if peak > worst:
            worst_key, worst = key, peak
    if worst > cfg.secagg_clipping_range:
        suggestion = 2 ** int(np.ceil(np.log2(worst * 2)))
        raise PrivacyConfigError(
            f"array {worst_key!r} reaches {worst:.4g}, beyond secagg-clipping-range="
            f"{cfg.secagg_clipping_range:g}; SecAgg+ would clip it. Set "
            f"secagg-clipping-range={suggestion} (coarser quantisation) or turn secagg off"
        )


class _SecAggPlusGrid(ForwardingGrid):
    """A grid whose training ``send_and_receive`` runs SecAgg+; the rest is delegated."""

    def __init__(self, grid: Grid, owner: SecAggPlusStrategy) -> None:
        super().__init__(grid)
        self._owner = owner

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        batch = list(messages)
        if batch and all(m.metadata.message_type == MessageType.TRAIN for m in batch):
            return self._owner.secure_round(self._grid, batch, timeout)
        return self._grid.send_and_receive(batch, timeout=timeout)


def _legacy_strategy_base() -> type:
    from flwr.server.strategy import Strategy as LegacyStrategy

    return LegacyStrategy


class _LegacyStrategyAdapter(_legacy_strategy_base()):  # type: ignore[misc]
    """Fills SecAggPlusWorkflow's legacy strategy slot for one round.

    ``configure_fit`` turns the Message-API train messages into FitIns;
    ``aggregate_fit`` receives the unmasked aggregate (the workflow sets it as
    every result's parameters) and keeps it with each client's metrics.
    """

    def __init__(self, grid: Grid, messages: list[Message], *, weight_key: str) -> None:
        self._grid = grid
        self._messages = {m.metadata.dst_node_id: m for m in messages}
        self._weight_key = weight_key
        self.aggregate: list[np.ndarray[Any, Any]] | None = None
        self._results: list[tuple[int, int, dict[str, Any]]] = []

    def __repr__(self) -> str:
        return "VeilfaceSecAggPlusAdapter"

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Any, client_manager: Any
    ) -> list[tuple[Any, Any]]:
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import FitIns
        from flwr.server.compat.grid_client_proxy import GridClientProxy

        pairs = []
        for node_id, msg in self._messages.items():
            arrays = next(iter(msg.content.array_records.values()))
            config = dict(next(iter(msg.content.config_records.values())))
            config[WEIGHT_KEY] = self._weight_key
            config[ARRAY_KEYS] = list(arrays.keys())
            params = compat.arrayrecord_to_parameters(arrays, keep_input=True)
            proxy = GridClientProxy(node_id, self._grid, self._grid.run.run_id)
            pairs.append((proxy, FitIns(params, cast(dict[str, Any], config))))
        return pairs

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]
    ) -> tuple[Any, dict[str, Any]]:
        from flwr.common import parameters_to_ndarrays

        if failures:
            logger.warning("SecAgg+ round %d: %d client failures", server_round, len(failures))
        if not results:
            return None, {}
        parameters = results[0][1].parameters
        self.aggregate = parameters_to_ndarrays(parameters)
        self._results = [
            (proxy.node_id, int(fitres.num_examples), dict(fitres.metrics))
            for proxy, fitres in results
        ]
        return parameters, {}

    def configure_evaluate(
        self, server_round: int, parameters: Any, client_manager: Any
    ) -> list[Any]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None

    def replies(self, global_arrays: ArrayRecord) -> list[Message]:
        """One Message-API reply per client that completed, carrying the aggregate."""
        if self.aggregate is None:
            return []
        keys = list(global_arrays.keys())
        if len(keys) != len(self.aggregate):
            raise PrivacyConfigError(
                f"SecAgg+ returned {len(self.aggregate)} arrays for a model of {len(keys)}"
            )
        restored: dict[str, Array] = {}
        for key, value in zip(keys, self.aggregate, strict=True):
            reference = global_arrays[key].numpy()
            arr = np.asarray(value).reshape(reference.shape)
            if np.issubdtype(reference.dtype, np.integer) or reference.dtype == np.bool_:
                arr = np.rint(arr)
            restored[key] = Array(np.ascontiguousarray(arr.astype(reference.dtype)))
        out = []
        for node_id, num_examples, metrics in self._results:
            record = MetricRecord(
                {
                    k: v
                    for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
            )
            record[self._weight_key] = num_examples
            content = RecordDict({"arrays": ArrayRecord(restored), "metrics": record})
            out.append(Message(content, reply_to=self._messages[node_id]))
        return out
