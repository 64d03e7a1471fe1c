"""Server side of the privacy options: wrap a task's strategy as the run config asks.

A task module's ``server_main`` calls :func:`prepare_strategy` once on the
strategy it built (before ``strategy.start``).
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from veilface.federated.privacy.config import PrivacyConfig, PrivacyConfigError
from veilface.federated.privacy.secagg import SecAggPlusStrategy
from veilface.federated.privacy.wrappers import SingleRecordGuard

logger = logging.getLogger(__name__)

__all__ = ["prepare_strategy", "wrap_strategy"]


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
    wrapped: Strategy = SingleRecordGuard(strategy)
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
