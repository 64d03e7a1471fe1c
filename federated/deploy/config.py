"""The Flower CLI's connection and the launcher app ``flwr run`` ships.

- :func:`write_flwr_config`: the Flower CLI's SuperLink connection
  (``$FLWR_HOME/config.toml``, ``[superlink.<name>]`` with ``address`` and
  ``root-certificates``). flwr >= 1.2x keeps connections there, not in
  ``pyproject.toml``; the harness always points ``FLWR_HOME`` at its own
  folder so the user's ``~/.flwr`` is never touched.
- :func:`write_launcher_app`: a folder holding only a ``pyproject.toml`` that
  names the project's own components (``veilface.federated.server_app:app``,
  ``veilface.federated.client_app:app``) and the run config. ``flwr run``
  ships it as the FAB; SuperLink and SuperNodes import the apps from the
  installed ``veilface`` package, so the same apps run as on the Simulation
  Engine. (Running ``flwr run`` on the repository itself would also work, but
  flwr 1.41 rewrites a ``pyproject.toml`` that still has a legacy
  ``[tool.flwr.federations]`` table and would build a FAB from the whole tree.)
- :func:`project_run_config`: ``[tool.flwr.app.config]`` of the repository's
  ``pyproject.toml``, the default run config.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomllib

from veilface.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "CONNECTION_NAME",
    "DeploymentError",
    "free_port",
    "project_run_config",
    "toml_value",
    "write_flwr_config",
    "write_launcher_app",
]

CONNECTION_NAME = "veilface-local"
_REPO_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class DeploymentError(FailedPrecondition):
    """A Deployment Engine process failed to start, register, run or stop in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def write_flwr_config(
    flwr_home: str | os.PathLike[str],
    *,
    address: str,
    root_certificates: Path,
    name: str = CONNECTION_NAME,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one TLS SuperLink connection, the default.

    Returns
    -------
    Path
        The written ``config.toml``.
    """
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{name}"\n\n'
        f"[superlink.{name}]\n"
        f'address = "{address}"\n'
        f"root-certificates = {json.dumps(str(root_certificates))}\n",
        encoding="utf-8",
    )
    return path


def project_run_config(pyproject: str | os.PathLike[str] = _REPO_PYPROJECT) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the project's ``pyproject.toml``."""
    path = Path(pyproject)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeploymentError(f"cannot read the Flower app config in {path}: {exc}") from exc
    config = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if not isinstance(config, dict):
        raise DeploymentError(f"{path} has no [tool.flwr.app.config] table")
    return dict(config)


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (bool, int, float or str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise InvalidArgument(
        f"run-config values must be bool, int, float or str, got {type(value).__name__}"
    )


def write_launcher_app(
    out_dir: str | os.PathLike[str],
    run_config: Mapping[str, Any],
    *,
    serverapp: str = "veilface.federated.server_app:app",
    clientapp: str = "veilface.federated.client_app:app",
) -> Path:
    """Write the FAB source folder ``flwr run`` ships: a ``pyproject.toml`` only.

    Parameters
    ----------
    out_dir : str or Path
        Folder to (re)create the file in.
    run_config : mapping
        The full run config (``[tool.flwr.app.config]``); values bool/int/float/str.
    serverapp, clientapp : str
        Component references, resolved from the installed ``veilface`` package.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "veilface-fed"',
        'version = "1.0.0"',
        'description = "veilface federated apps (components from the installed package)"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "veilface"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {json.dumps(serverapp)}",
        f"clientapp = {json.dumps(clientapp)}",
        "",
        "[tool.flwr.app.config]",
    ]
    for key, value in run_config.items():
        lines.append(f"{json.dumps(str(key))} = {toml_value(value)}")
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
