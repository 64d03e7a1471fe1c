"""Privacy options for the federated apps: Flower's DP wrappers and SecAgg+.

Everything is driven by run-config keys (``[tool.flwr.app.config]`` or
``flwr run . --run-config "dp-mode='client' dp-clip-norm=0.5 secagg=true"``),
parsed into one typed :class:`PrivacyConfig` (the keys and their defaults:
:mod:`veilface.federated.privacy.config`).

Server side, a task module calls :func:`prepare_strategy` once on the
strategy it built (before ``strategy.start``). Client side, the ClientApp is
constructed with ``mods=client_mods()``; the mod (:func:`privacy_mod`) is
inert unless the server asked for clipping (the DP wrapper puts the clipping
norm into the train config) or for SecAgg+ (the protocol's stage messages),
so the client needs no configuration of its own.

Modules
-------
- :mod:`~veilface.federated.privacy.config`: the typed options.
- :mod:`~veilface.federated.privacy.server`: :func:`wrap_strategy`,
  :func:`prepare_strategy`.
- :mod:`~veilface.federated.privacy.wrappers`: delegation and the
  one-record guard (:func:`check_train_content`).
- :mod:`~veilface.federated.privacy.secagg`: SecAgg+ for Message-API
  strategies (how it bridges Flower's legacy workflow).
- :mod:`~veilface.federated.privacy.client`: the ClientApp mod.
"""

from __future__ import annotations

from veilface.federated.privacy.client import client_mods, privacy_mod
from veilface.federated.privacy.config import DP_MODES, PrivacyConfig, PrivacyConfigError
from veilface.federated.privacy.secagg import SecAggPlusStrategy, check_secagg_range
from veilface.federated.privacy.server import prepare_strategy, wrap_strategy
from veilface.federated.privacy.wrappers import check_train_content

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
