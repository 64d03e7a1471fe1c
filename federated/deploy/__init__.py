"""Run the veilface Flower apps on the Deployment Engine, locally, with TLS and node auth.

The pieces a real deployment needs, usable one by one or through
:class:`LocalDeployment` (which the test and ``veilface fed deploy-local`` use):

- :mod:`~veilface.federated.deploy.tls`: :func:`generate_tls` (a throw-away
  CA and a SuperLink certificate) and :func:`generate_node_keys` (SuperNode
  authentication keys).
- :mod:`~veilface.federated.deploy.config`: :func:`write_flwr_config` (the
  Flower CLI's SuperLink connection), :func:`write_launcher_app` (the FAB
  source ``flwr run`` ships, naming the installed package's apps) and
  :func:`project_run_config` (the repository's ``[tool.flwr.app.config]``).
- :mod:`~veilface.federated.deploy.flwr_cli`: finding the Flower commands
  and reading their output.
- :mod:`~veilface.federated.deploy.local`: :class:`LocalDeployment`, the
  processes on ``127.0.0.1`` and their lifecycle.
- :mod:`~veilface.federated.deploy.outcome`: :class:`RunOutcome` and
  :func:`server_error` (the ServerApp's error from the run status or log).
- :mod:`~veilface.federated.deploy.sites`: :func:`default_supernodes` and
  :func:`check_supernodes` (how many SuperNodes a run config needs).
"""

from __future__ import annotations

from veilface.federated.deploy.config import (
    CONNECTION_NAME,
    DeploymentError,
    free_port,
    project_run_config,
    write_flwr_config,
    write_launcher_app,
)
from veilface.federated.deploy.local import LocalDeployment
from veilface.federated.deploy.outcome import RunOutcome, server_error
from veilface.federated.deploy.sites import check_supernodes, default_supernodes
from veilface.federated.deploy.tls import NodeKeyPair, TlsFiles, generate_node_keys, generate_tls

__all__ = [
    "CONNECTION_NAME",
    "DeploymentError",
    "LocalDeployment",
    "NodeKeyPair",
    "RunOutcome",
    "TlsFiles",
    "check_supernodes",
    "default_supernodes",
    "free_port",
    "generate_node_keys",
    "generate_tls",
    "project_run_config",
    "server_error",
    "write_flwr_config",
    "write_launcher_app",
]
