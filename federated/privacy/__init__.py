"""Privacy options for the federated apps: Flower's DP wrappers and SecAgg+.

Everything is driven by run-config keys (``[tool.flwr.app.config]`` or
``flwr run . --run-config "dp-mode='client' dp-clip-norm=0.5 secagg=true"``),
parsed into one typed :class:`PrivacyConfig`:

====================================  =========  ==============================================
key                                   default    meaning
====================================  =========  ==============================================
``dp-mode``                           ``"off"``  ``"off"``, ``"client"`` (client-side fixed
                                                 clipping) or ``"server"`` (server-side fixed
                                                 clipping); central Gaussian noise either way
``dp-clip-norm``                      ``1.0``    L2 bound on each client's update (new - old)
``dp-noise-multiplier``               ``1.0``    noise stdv = multiplier * clip / n_sampled
``dp-sampled-clients``                ``0``      clients per round the noise is calibrated
                                                 for; ``0`` = the number the task passes
``secagg``                            ``false``  run SecAgg+ on every training round
``secagg-shares``                     ``1.0``    key shares per client (int > 2, or a
                                                 fraction of the sampled clients)
``secagg-threshold``                  ``0.5``    shares needed to reconstruct (int, or a
                                                 fraction of ``secagg-shares``)
``secagg-clipping-range``             ``8.0``    parameters are clipped to +-range before
                                                 quantisation
``secagg-quantization-range``         ``2**22``  integer levels of the quantiser
``secagg-max-weight``                 ``1000.0`` largest per-client weight (num-examples)
====================================  =========  ==============================================

Server side, a task module calls :func:`prepare_strategy` once on the
strategy it built (before ``strategy.start``). Client side, the ClientApp is
constructed with ``mods=client_mods()``; the mod (:func:`privacy_mod`) is
inert unless the server asked for clipping (the DP wrapper puts the clipping
norm into the train config) or for SecAgg+ (the protocol's stage messages),
so the client needs no configuration of its own.

SecAgg+ with Message-API strategies
-----------------------------------
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

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
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Result,
    Strategy,
)

from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

__all__ = [
    "DP_MODES",
    "PrivacyConfig",
    "PrivacyConfigError",
    "SecAggPlusStrategy",
    "check_secagg_range",
    "check_train_content",
    "client_mods",
    "prepare_strategy",
    "privacy_mod",
    "wrap_strategy",
]

DpMode = Literal["off", "client", "server"]
DP_MODES: tuple[str, ...] = ("off", "client", "server")

# Keys used by Flower itself (flwr.common.secure_aggregation / flwr.supercore).
_SECAGG_CONFIGS = "secaggplus_configs"
_KEY_CLIPPING_NORM = "clipping_norm"
# Our own key, carried in the legacy FitIns config and stripped before the app sees it.
_WEIGHT_KEY = "veilface.secagg-weight-key"
_ARRAY_KEYS = "veilface.secagg-array-keys"


class PrivacyConfigError(InvalidArgument):
    """A privacy run-config key has a value that cannot work."""


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Typed privacy options (see the module docstring for the run-config keys).

    Attributes
    ----------
    dp_mode : {"off", "client", "server"}
        Which Flower DP wrapper to apply to the strategy.
    dp_clip_norm : float
        L2 clipping norm of one client's model update, > 0.
    dp_noise_multiplier : float
        Gaussian noise multiplier, >= 0 (0 = clipping only, no privacy from noise).
    dp_sampled_clients : int
        Clients per round the noise is calibrated for; 0 = use the task's number.
    secagg : bool
        Run SecAgg+ on every training round.
    secagg_shares : int | float
        Shares of each client's secret; int > 2 or a fraction in (0, 1].
    secagg_threshold : int | float
        Shares required to reconstruct; int >= 2 or a fraction in (0, 1].
    secagg_clipping_range : float
        Parameters are clipped to [-range, range] before quantisation.
    secagg_quantization_range : int
        Number of integer levels of the quantiser.
    secagg_max_weight : float
        Largest client weight (``num-examples``) that quantises without overflow.
    """

    dp_mode: DpMode = "off"
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_sampled_clients: int = 0
    secagg: bool = False
    secagg_shares: int | float = 1.0
    secagg_threshold: int | float = 0.5
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_max_weight: float = 1000.0

    def __post_init__(self) -> None:
        if self.dp_mode not in DP_MODES:
            raise PrivacyConfigError(f"dp-mode must be one of {DP_MODES}, got {self.dp_mode!r}")
        if not self.dp_clip_norm > 0:
            raise PrivacyConfigError(
                f"dp-clip-norm must be > 0, got {self.dp_clip_norm}; it bounds the L2 norm "
                "of one client's update, e.g. dp-clip-norm=1.0"
            )
        if not self.dp_noise_multiplier >= 0:
            raise PrivacyConfigError(
                f"dp-noise-multiplier must be >= 0, got {self.dp_noise_multiplier}"
            )
        if self.dp_sampled_clients < 0:
            raise PrivacyConfigError(
                f"dp-sampled-clients must be >= 0 (0 = the task's count), "
                f"got {self.dp_sampled_clients}"
            )
        if self.secagg and self.dp_mode == "server":
            raise PrivacyConfigError(
                "dp-mode='server' clips each client's update on the server, which SecAgg+ "
                "hides by design; use dp-mode='client' together with secagg=true"
            )
        _check_share_param("secagg-shares", self.secagg_shares, int_min=3)
        _check_share_param("secagg-threshold", self.secagg_threshold, int_min=2)
        if (
            isinstance(self.secagg_shares, int)
            and isinstance(self.secagg_threshold, int)
            and self.secagg_threshold >= self.secagg_shares
        ):
            raise PrivacyConfigError(
                f"secagg-threshold ({self.secagg_threshold}) must be less than "
                f"secagg-shares ({self.secagg_shares})"
            )
        if not self.secagg_clipping_range > 0:
            raise PrivacyConfigError("secagg-clipping-range must be > 0")
        if not 0 < self.secagg_quantization_range < 2**32:
            raise PrivacyConfigError("secagg-quantization-range must be in (0, 2**32)")
        if not self.secagg_max_weight > 0:
            raise PrivacyConfigError("secagg-max-weight must be > 0")

    @property
    def enabled(self) -> bool:
        """True when any privacy option is on."""
        return self.dp_mode != "off" or self.secagg

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> PrivacyConfig:
        """Parse the privacy keys of a Flower run config (other keys are ignored).

        Raises
        ------
        PrivacyConfigError
            A key has the wrong type or an impossible value; the message names the key.
        """
        defaults = cls()
        mode = str(run_config.get("dp-mode", defaults.dp_mode)).strip().lower()
        if mode not in DP_MODES:
            raise PrivacyConfigError(f"dp-mode must be one of {DP_MODES}, got {mode!r}")
        return cls(
            dp_mode=cast(DpMode, mode),
            dp_clip_norm=_as_float(run_config, "dp-clip-norm", defaults.dp_clip_norm),
            dp_noise_multiplier=_as_float(
                run_config, "dp-noise-multiplier", defaults.dp_noise_multiplier
            ),
            dp_sampled_clients=_as_int(
                run_config, "dp-sampled-clients", defaults.dp_sampled_clients
            ),
            secagg=_as_bool(run_config, "secagg", defaults.secagg),
            secagg_shares=_as_share(run_config, "secagg-shares", defaults.secagg_shares),
            secagg_threshold=_as_share(run_config, "secagg-threshold", defaults.secagg_threshold),
            secagg_clipping_range=_as_float(
                run_config, "secagg-clipping-range", defaults.secagg_clipping_range
            ),
            secagg_quantization_range=_as_int(
                run_config, "secagg-quantization-range", defaults.secagg_quantization_range
            ),
            secagg_max_weight=_as_float(
                run_config, "secagg-max-weight", defaults.secagg_max_weight
            ),
        )


def _check_share_param(name: str, value: float, *, int_min: int) -> None:
    if isinstance(value, bool):
        raise PrivacyConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(value, int):
        if value < int_min and value != 1:
            raise PrivacyConfigError(
                f"{name} as an integer must be >= {int_min}, got {value}; "
                "or give a fraction such as 0.5"
            )
    elif not 0 < value <= 1:
        raise PrivacyConfigError(f"{name} as a fraction must be in (0, 1], got {value}")


def _get(run_config: Mapping[str, Any], key: str, default: Any) -> Any:
    return run_config.get(key, default)


def _as_float(run_config: Mapping[str, Any], key: str, default: float) -> float:
    value = _get(run_config, key, default)
    if isinstance(value, bool):
        raise PrivacyConfigError(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise PrivacyConfigError(f"{key} must be a number, got {value!r}") from exc


def _as_int(run_config: Mapping[str, Any], key: str, default: int) -> int:
    value = _get(run_config, key, default)
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise PrivacyConfigError(f"{key} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise PrivacyConfigError(f"{key} must be an integer, got {value!r}") from exc


def _as_bool(run_config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _get(run_config, key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off", ""}:
        return False
    raise PrivacyConfigError(f"{key} must be true or false, got {value!r}")


def _as_share(run_config: Mapping[str, Any], key: str, default: float) -> int | float:
    value = _get(run_config, key, default)
    if isinstance(value, bool):
        raise PrivacyConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError as exc:
        raise PrivacyConfigError(f"{key} must be an integer or a fraction, got {value!r}") from exc


# --------------------------------------------------------------------------- server


def wrap_strategy(
    strategy: Strategy, cfg: PrivacyConfig, *, num_sampled_clients: int | None = None
) -> Strategy:
    """Apply ``cfg`` to a Message-API strategy.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The task's strategy (e.g. ``FedAvg``).
    cfg : PrivacyConfig
        Parsed options.
    num_sampled_clients : int, optional
        Clients sampled per round; the DP noise (stdv = multiplier * clip / n) is
        calibrated for it. ``cfg.dp_sampled_clients`` wins when > 0.

    Returns
    -------
    flwr.serverapp.strategy.Strategy
        ``strategy`` itself when nothing is enabled; otherwise the DP wrapper
        (client- or server-side fixed clipping), itself wrapped in
        :class:`SecAggPlusStrategy` when ``cfg.secagg``.

    Raises
    ------
    PrivacyConfigError
        DP is on but the number of sampled clients is unknown.
    """
    if not cfg.enabled:
        return strategy
    wrapped: Strategy = _SingleRecordGuard(strategy)
    if cfg.dp_mode != "off":
        sampled = cfg.dp_sampled_clients or (num_sampled_clients or 0)
        if sampled <= 0:
            raise PrivacyConfigError(
                "dp-mode is on but the number of clients sampled per round is unknown; "
                "set run-config dp-sampled-clients=N"
            )
        wrapper = (
            DifferentialPrivacyClientSideFixedClipping
            if cfg.dp_mode == "client"
            else DifferentialPrivacyServerSideFixedClipping
        )
        wrapped = wrapper(
            wrapped,
            noise_multiplier=cfg.dp_noise_multiplier,
            clipping_norm=cfg.dp_clip_norm,
            num_sampled_clients=sampled,
        )
        logger.info(
            "privacy: %s-side fixed clipping, clip %.4g, noise multiplier %.4g, %d clients",
            cfg.dp_mode,
            cfg.dp_clip_norm,
            cfg.dp_noise_multiplier,
            sampled,
        )
    if cfg.secagg:
        wrapped = SecAggPlusStrategy(wrapped, cfg)
        logger.info(
            "privacy: SecAgg+ on training rounds (shares %s, threshold %s)",
            cfg.secagg_shares,
            cfg.secagg_threshold,
        )
    return wrapped


def prepare_strategy(
    strategy: Strategy, context: Context, *, num_sampled_clients: int | None = None
) -> Strategy:
    """:func:`wrap_strategy` with the options read from ``context.run_config``.

    The one call a task module's ``server_main`` makes on its strategy.
    """
    cfg = PrivacyConfig.from_run_config(context.run_config)
    return wrap_strategy(strategy, cfg, num_sampled_clients=num_sampled_clients)


def check_train_content(content: RecordDict, sender: str = "the strategy") -> None:
    """Raise unless ``content`` has one ArrayRecord and one ConfigRecord.

    That is the layout Flower's ``fixedclipping_mod`` and SecAgg+ handle
    (FedAvg's ``"arrays"``/``"config"``).

    Raises
    ------
    PrivacyConfigError
        With the counts found and how to fix it.
    """
    n_arrays = len(content.array_records)
    n_configs = len(content.config_records)
    if n_arrays != 1 or n_configs != 1:
        raise PrivacyConfigError(
            f"dp-mode/secagg need train messages with one ArrayRecord and one "
            f"ConfigRecord; {sender} sends {n_arrays} and {n_configs}. Use a plain "
            "FedAvg strategy (vireid: method='fedavg'; pad: pad-method='naive') or turn "
            "the privacy options off"
        )


class _Delegating(Strategy):
    """A strategy wrapper: every call goes to ``self.strategy`` unless a subclass overrides it."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def __repr__(self) -> str:
        """The wrapped strategy's representation."""
        return repr(self.strategy)

    def summary(self) -> None:
        """The wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)


class _SingleRecordGuard(_Delegating):
    """Delegates to ``strategy``; refuses train messages Flower's privacy code cannot handle.

    ``fixedclipping_mod`` and SecAgg+ work on exactly one ArrayRecord and one
    ConfigRecord per train message (e.g. FedAvg's ``"arrays"``/``"config"``).
    A strategy that sends more (prototypes, partial models) would have every
    client reply with an error; this fails the run once, with the fix.
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self.weighted_by_key = _weight_key(strategy)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, then check every message's record layout."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        for msg in messages:
            check_train_content(msg.content, type(self.strategy).__name__)
        return messages


class SecAggPlusStrategy(_Delegating):
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
        adapter = _LegacyStrategyAdapter(grid, messages, weight_key=_weight_key(self.strategy))
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


def _weight_key(strategy: Strategy) -> str:
    inner: Any = strategy
    while not hasattr(inner, "weighted_by_key") and hasattr(inner, "strategy"):
        inner = inner.strategy
    return str(getattr(inner, "weighted_by_key", "num-examples"))


class _SecAggPlusGrid(Grid):
    """A grid whose training ``send_and_receive`` runs SecAgg+; the rest is delegated."""

    def __init__(self, grid: Grid, owner: SecAggPlusStrategy) -> None:
        self._grid = grid
        self._owner = owner

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

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
            config[_WEIGHT_KEY] = self._weight_key
            config[_ARRAY_KEYS] = list(arrays.keys())
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


# --------------------------------------------------------------------------- client


def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Client mod applying whatever privacy the server asked for on train messages.

    - SecAgg+ stage messages (config record ``secaggplus_configs``): Flower's
      ``secaggplus_mod`` runs the protocol; in the masked-vector stage it calls
      the app through a translator (legacy ``fitins.*`` -> ``"arrays"`` /
      ``"config"``, reply -> ``fitres.*``), clipping first when asked.
    - Train messages whose config holds ``clipping_norm`` (set by
      ``DifferentialPrivacyClientSideFixedClipping``): Flower's
      ``fixedclipping_mod``.
    - Anything else passes through untouched.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if _SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, _legacy_bridge(call_next))
    if _wants_clipping(msg):
        return _fixed_clipping(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def client_mods() -> list[Mod]:
    """Mods for ``ClientApp(mods=...)``: just :func:`privacy_mod`."""
    return [privacy_mod]


def _fixed_clipping(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod``, safe for integer arrays.

    Flower clips in place (``array *= factor``), which numpy refuses for
    integer arrays such as BatchNorm's ``num_batches_tracked``. Integer arrays
    are handed to the mod as float64 (in the received model and in the
    reply); after clipping, the reply's integer arrays get their dtype back
    (rounded).
    """
    _floatify(msg)
    reply_dtypes: dict[str, np.dtype[Any]] = {}

    def inner(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if not reply.has_error():
            reply_dtypes.update(_floatify(reply))
        return reply

    out = fixedclipping_mod(msg, ctxt, inner)
    if reply_dtypes and not out.has_error() and len(out.content.array_records) == 1:
        key, record = next(iter(out.content.array_records.items()))
        restored = {}
        for name, arr in record.items():
            value = arr.numpy()
            if name in reply_dtypes:
                value = np.rint(value).astype(reply_dtypes[name])
            restored[name] = Array(np.ascontiguousarray(value))
        out.content.array_records[key] = ArrayRecord(restored)
    return out


def _floatify(msg: Message) -> dict[str, np.dtype[Any]]:
    """Turn integer arrays of the message's ArrayRecords into float64; return their dtypes."""
    changed: dict[str, np.dtype[Any]] = {}
    for key, record in list(msg.content.array_records.items()):
        values = {name: arr.numpy() for name, arr in record.items()}
        ints = {n for n, v in values.items() if np.issubdtype(v.dtype, np.integer)}
        if not ints:
            continue
        changed.update({n: values[n].dtype for n in ints})
        msg.content.array_records[key] = ArrayRecord(
            {
                n: Array(v.astype(np.float64) if n in ints else np.ascontiguousarray(v))
                for n, v in values.items()
            }
        )
    return changed


def _wants_clipping(msg: Message) -> bool:
    return any(_KEY_CLIPPING_NORM in rec for rec in msg.content.config_records.values())


def _legacy_bridge(call_next: ClientAppCallable) -> ClientAppCallable:
    """Translate SecAgg+'s legacy FitIns/FitRes records to the app's Message API."""

    def bridge(msg: Message, ctxt: Context) -> Message:
        content = msg.content
        legacy_arrays = content.array_records["fitins.parameters"]
        config = ConfigRecord(dict(content.config_records["fitins.config"]))
        weight_key = str(config.pop(_WEIGHT_KEY, "num-examples"))
        keys = [str(k) for k in cast(list[str], config.pop(_ARRAY_KEYS, []))]
        if len(keys) != len(legacy_arrays):
            keys = list(legacy_arrays.keys())
        arrays = ArrayRecord(dict(zip(keys, legacy_arrays.values(), strict=True)))
        msg.content = RecordDict({"arrays": arrays, "config": config})
        if _KEY_CLIPPING_NORM in config:
            reply = _fixed_clipping(msg, ctxt, call_next)
        else:
            reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        out = reply.content
        if len(out.array_records) != 1 or len(out.metric_records) != 1:
            raise PrivacyConfigError(
                "SecAgg+ needs a train reply with exactly one ArrayRecord and one "
                f"MetricRecord, got {len(out.array_records)} and {len(out.metric_records)}"
            )
        metrics = next(iter(out.metric_records.values()))
        if weight_key not in metrics:
            raise PrivacyConfigError(
                f"SecAgg+ needs the client weight {weight_key!r} in the train reply's metrics"
            )
        legacy = RecordDict(
            {
                "fitres.parameters": next(iter(out.array_records.values())),
                "fitres.num_examples": MetricRecord(
                    {"num_examples": int(cast(float, metrics[weight_key]))}
                ),
                "fitres.metrics": ConfigRecord(
                    {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                ),
                "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
            }
        )
        return Message(legacy, reply_to=msg)

    return bridge
