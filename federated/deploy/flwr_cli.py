"""Finding and calling the Flower CLI tools, and reading what they print.

Every command runs from this interpreter's ``bin`` folder (so the ``flwr``
of the environment veilface is installed in) with ``FLWR_HOME`` set to a
folder of the harness.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from veilface.federated.deploy.config import DeploymentError

__all__ = ["flwr_env", "flwr_executable", "last_json", "log_tail", "started_run_id"]


def flwr_env(home: Path) -> dict[str, str]:
    """This environment with ``FLWR_HOME=home`` and this interpreter's ``bin`` first on PATH."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def flwr_executable(name: str) -> str:
    """Path of a Flower command (``flwr``, ``flower-superlink``...) next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        raise DeploymentError(
            f"{name} not found next to {sys.executable}; install flwr in this "
            'environment (pip install -e ".[federated]")'
        )
    return str(candidate)


def started_run_id(text: str) -> int | None:
    """The run id in ``flwr run`` output ("Successfully started run N"), or None."""
    match = re.search(r"Successfully started run (\d+)", text)
    return int(match.group(1)) if match else None


def last_json(text: str) -> dict[str, Any]:
    """The last top-level JSON object in ``text`` (the CLI may print notices first)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else {}
    return {}


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file (``"(no log)"`` if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
