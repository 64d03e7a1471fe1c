"""The one Flower ServerApp of veilface: ``veilface.federated.server_app:app``.

Contract between the apps and the task modules
----------------------------------------------
One ServerApp (this module) and one ClientApp
(:mod:`veilface.federated.client_app`) serve every federated task. Both read
the run-config key ``task`` and hand over to a task module, imported lazily
(only the chosen task's dependencies load):

=========  ==========================================
``task``   task module
=========  ==========================================
``vireid`` :mod:`veilface.federated.vireid.flower`
``pad``    :mod:`veilface.federated.pad.flower`
=========  ==========================================

A task module defines three functions::

    def server_main(grid: flwr.serverapp.Grid, context: flwr.app.Context) -> None
        # the whole server side: build the strategy (from flwr.serverapp.strategy),
        # call strategy.start(grid=..., initial_arrays=..., num_rounds=..., evaluate_fn=...),
        # write artifacts with veilface.federated.run_artifacts.RunArtifacts.

    def client_train(msg: flwr.app.Message, context: flwr.app.Context) -> flwr.app.Message
        # answers a "train" message (ArrayRecord under "arrays", ConfigRecord under
        # "config") with a reply carrying "arrays" and a MetricRecord "metrics"
        # that holds "num-examples".

    def client_evaluate(msg: flwr.app.Message, context: flwr.app.Context) -> flwr.app.Message
        # answers an "evaluate" message with a MetricRecord "metrics" holding
        # "num-examples".

Run configuration
-----------------
``context.run_config`` is ``[tool.flwr.app.config]`` of ``pyproject.toml``
(overridable with ``flwr run . --run-config "task='pad' num-server-rounds=3"``)
merged over :data:`DEFAULT_RUN_CONFIG`. Keys every task understands:

- ``task`` (str): ``"vireid"`` or ``"pad"``.
- ``num-server-rounds`` (int): federated rounds.
- ``out-dir`` (str): where :class:`~veilface.federated.run_artifacts.RunArtifacts`
  writes checkpoints, ``metrics.json`` and PNG plots (``""`` = no artifacts).
- ``protocol`` (str): task-specific (vireid: ``"camera-isolation"``,
  ``"entity-isolation"``, ``"entity-sharing"``).

The ``context`` handed to ``server_main`` / ``client_train`` /
``client_evaluate`` carries that effective config in ``context.run_config``
(a copy: Flower forbids editing the original) and the node's own
``context.state`` object, so state written there persists across rounds.
Task modules read their own extra keys with defaults, so unknown tasks' keys
may sit side by side in one ``[tool.flwr.app.config]`` table.

Failed rounds
-------------
The task's ``server_main`` receives the grid wrapped in
:class:`~veilface.federated.round_guard.RoundGuardGrid`: a round in which no
client succeeded raises :class:`~veilface.errors.TrainingFailed` with the
clients' reasons, so the run ends ``finished:failed`` instead of repeating
rounds on an unchanged model.

For tests and the benchmark, :func:`make_server_app` and
:func:`~veilface.federated.client_app.make_client_app` build apps whose run
config is overridden in Python (``flwr.simulation.run_simulation`` passes no
run config).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from veilface.errors import InvalidArgument
from veilface.federated.round_guard import RoundGuardGrid

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RUN_CONFIG",
    "TASK_MODULES",
    "UnknownTaskError",
    "app",
    "load_task",
    "make_server_app",
    "run_config",
    "with_run_config",
]

TASK_MODULES: dict[str, str] = {
    "vireid": "veilface.federated.vireid.flower",
    "pad": "veilface.federated.pad.flower",
}

DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "task": "vireid",
    "num-server-rounds": 3,
    "out-dir": "",
    "protocol": "camera-isolation",
}


class UnknownTaskError(InvalidArgument):
    """The run config names a task that has no task module."""


def run_config(context: Context, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Effective run config: defaults, then ``context.run_config``, then ``overrides``."""
    merged: dict[str, Any] = dict(DEFAULT_RUN_CONFIG)
    merged.update(dict(context.run_config))
    if overrides:
        merged.update(overrides)
    return merged


def load_task(task: str) -> ModuleType:
    """Import the task module for ``task`` (see the module docstring)."""
    name = TASK_MODULES.get(str(task))
    if name is None:
        raise UnknownTaskError(
            f"unknown federated task {task!r}; set run-config 'task' to one of "
            f"{sorted(TASK_MODULES)}"
        )
    return importlib.import_module(name)


def with_run_config(context: Context, config: Mapping[str, Any]) -> Context:
    """A Context like ``context`` (same ids, node config and *same* ``state`` object) whose
    ``run_config`` is ``config``. Flower forbids changing ``context.run_config`` in place."""
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config=dict(config),
    )


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp that dispatches on ``task``; ``overrides`` win over the run config.

    The task's ``server_main`` receives a Context whose ``run_config`` is the
    effective config (see :func:`with_run_config`), so task code reads one place,
    and the grid wrapped in :class:`~veilface.federated.round_guard.RoundGuardGrid`.
    """
    frozen = dict(overrides or {})
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        config = run_config(context, frozen)
        module = load_task(config["task"])
        logger.info("server: task %s, %s rounds", config["task"], config["num-server-rounds"])
        module.server_main(RoundGuardGrid(grid), with_run_config(context, config))

    return server


app = make_server_app()
