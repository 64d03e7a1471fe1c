"""How many SuperNodes (sites) a run config needs on the Deployment Engine.

``veilface fed deploy-local`` starts :func:`default_supernodes` SuperNodes
unless told otherwise, and refuses a count the run cannot use
(:func:`check_supernodes`) before starting any process:

=====================================  ==========================================
task / protocol                        SuperNodes
=====================================  ==========================================
``vireid``, ``camera-isolation``       one per camera of the proxy (4; read from
                                       ``data-dir``'s ``manifest.json`` if built)
``vireid``, other protocols            ``max(min-train-nodes, min-available-nodes)`` (2)
``pad``                                ``pad-min-nodes`` (2)
=====================================  ==========================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

__all__ = ["camera_count", "check_supernodes", "default_supernodes"]

_FALLBACK_NODES = 2


def _int(config: Mapping[str, Any], key: str, default: int) -> int:
    try:
        return int(config.get(key, default))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"run-config {key}={config.get(key)!r} is not a whole number"
        ) from exc


def camera_count(data_dir: str | Path = "") -> int:
    """Cameras of the VI-ReID proxy: from ``data_dir/manifest.json`` if built, else the default.

    Parameters
    ----------
    data_dir : str or Path
        The run config's ``data-dir`` (``""`` = the default cache folder).
    """
    from veilface.federated.vireid.proxy import DEFAULT_PROXY_DIR, PROXY_CAMERAS

    manifest = Path(str(data_dir) or DEFAULT_PROXY_DIR) / "manifest.json"
    try:
        cameras = json.loads(manifest.read_text())["config"]["cameras"]
        if isinstance(cameras, list) and cameras:
            return len(cameras)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return len(PROXY_CAMERAS)


def default_supernodes(run_config: Mapping[str, Any]) -> int:
    """SuperNodes the run config's task and protocol expect (see the module docstring).

    Parameters
    ----------
    run_config : mapping
        The effective run config (the project's ``[tool.flwr.app.config]``
        with the overrides applied).
    """
    task = str(run_config.get("task", "vireid"))
    if task == "vireid":
        if str(run_config.get("protocol", "camera-isolation")) == "camera-isolation":
            return camera_count(str(run_config.get("data-dir", "")))
        return max(
            _int(run_config, "min-train-nodes", _FALLBACK_NODES),
            _int(run_config, "min-available-nodes", _FALLBACK_NODES),
        )
    if task == "pad":
        return _int(run_config, "pad-min-nodes", _FALLBACK_NODES)
    return _FALLBACK_NODES


def check_supernodes(run_config: Mapping[str, Any], num_supernodes: int) -> None:
    """Refuse a SuperNode count the run cannot train with.

    Raises
    ------
    InvalidArgument
        Camera isolation with a count other than the camera count, or fewer
        SuperNodes than the strategy waits for; the message names the fix.
    """
    if num_supernodes < 1:
        raise InvalidArgument("--supernodes must be >= 1")
    need = default_supernodes(run_config)
    task = str(run_config.get("task", "vireid"))
    protocol = str(run_config.get("protocol", ""))
    if task == "vireid" and protocol == "camera-isolation":
        if num_supernodes != need:
            raise InvalidArgument(
                f"camera isolation over {need} cameras needs {need} SuperNodes (one per "
                f"camera), not {num_supernodes}: leave --supernodes out (it follows the "
                "protocol) or pass --run-config \"protocol='entity-isolation'\""
            )
        return
    if task in ("vireid", "pad") and num_supernodes < need:
        keys = "pad-min-nodes" if task == "pad" else "min-train-nodes/min-available-nodes"
        raise InvalidArgument(
            f"task {task!r} waits for {need} SuperNodes ({keys}) but --supernodes is "
            f"{num_supernodes}: start at least {need} or lower {keys}"
        )
