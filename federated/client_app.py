"""The one Flower ClientApp of veilface: ``veilface.federated.client_app:app``.

It dispatches ``train`` and ``evaluate`` messages on the run-config key
``task`` to the task module's ``client_train`` / ``client_evaluate`` (see
:mod:`veilface.federated.server_app` for the contract). On the Simulation
Engine, ``context.node_config`` holds ``partition-id`` and
``num-partitions``; on the Deployment Engine each SuperNode is started with
``--node-config "partition-id=0 num-partitions=2"`` (or a task-specific
data path).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from veilface.federated.privacy import client_mods
from veilface.federated.server_app import load_task, run_config, with_run_config

logger = logging.getLogger(__name__)

__all__ = ["app", "make_client_app"]


def _prepare(context: Context, overrides: Mapping[str, Any]) -> tuple[ModuleType, Context]:
    config = run_config(context, overrides)
    return load_task(str(config["task"])), with_run_config(context, config)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp that dispatches on ``task``; ``overrides`` win over the run config."""
    frozen = dict(overrides or {})
    client = ClientApp(mods=client_mods())  # privacy: inert unless the server asks

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        module, task_context = _prepare(context, frozen)
        reply: Message = module.client_train(msg, task_context)
        return reply

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        module, task_context = _prepare(context, frozen)
        reply: Message = module.client_evaluate(msg, task_context)
        return reply

    return client


app = make_client_app()
