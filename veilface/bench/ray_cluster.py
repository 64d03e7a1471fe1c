"""A Ray cluster of separate node processes on 127.0.0.1 (benchmarks and tests).

``LocalRayCluster(nodes=2).start()`` runs ``ray start --head`` and then
``ray start --address`` for every further node, each with its own
``--temp-dir`` under one temporary folder, one CPU and a small object store.
:meth:`kill_node` SIGKILLs one node's processes (its raylet and everything
it started: what a machine failure looks like to the rest of the cluster);
:meth:`stop` kills this cluster's processes only. ``ray stop`` is not used:
it stops every Ray session on the machine, other people's included. A
process belongs to a node when its command line names the node's temp dir
(the head's GCS, dashboard and monitors, every raylet), or when it descends
from such a process (the workers and agents a raylet forks).

The head's GCS declares a silent node dead after
``health_check_period_ms * health_check_failure_threshold``; Ray's default
(3 s x 5, plus the timeout) is shortened here so a test sees a recovery in a
few seconds (:data:`FAST_FAILURE_DETECTION`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

#: GCS settings (``RAY_<name>`` variables of the head) for a node death seen in about 1.5 s.
FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": "1000",
    "health_check_period_ms": "500",
    "health_check_timeout_ms": "500",
    "health_check_failure_threshold": "3",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@dataclass
class _Node:
    index: int
    temp_dir: Path
    pids: set[int] = field(default_factory=set)


class LocalRayCluster:
    """A head and ``nodes - 1`` more Ray nodes, as separate processes on this machine.

    Parameters
    ----------
    nodes
        Ray nodes in all (the head is node 0).
    cpus_per_node
        ``--num-cpus`` of each node: the scoring backend starts about one
        actor per CPU.
    object_store_mb
        ``--object-store-memory`` of each node (Ray's default is 30% of RAM).
    env
        Extra environment for the node processes (and so for the actors).
    """

    def __init__(
        self,
        nodes: int = 2,
        *,
        cpus_per_node: int = 1,
        object_store_mb: int = 200,
        env: dict[str, str] | None = None,
        fast_failure_detection: bool = True,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least its head node")
        self.n_nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.root = Path(tempfile.mkdtemp(prefix="vf-ray-"))
        self.port = 0
        self.nodes: list[_Node] = []
        self._env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Subprocesses (raylets, actors) import veilface from where this process does.
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            **(env or {}),
        }
        if fast_failure_detection:
            self._env.update({f"RAY_{k}": v for k, v in FAST_FAILURE_DETECTION.items()})

    @property
    def address(self) -> str:
        """The head's GCS address (``--ray-address``)."""
        return f"127.0.0.1:{self.port}"

    def _ray(self, *args: str, timeout: float = 120.0) -> None:
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
        proc = subprocess.run(
            [*cmd, *args], check=False, env=self._env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ray {args[0]} failed: {proc.stderr.strip()[-2000:]}")

    def start(self) -> Self:
        try:
            for i in range(self.n_nodes):
                self._start_node(i)
        except BaseException:
            self.stop()
            raise
        log.info("Ray cluster of %d nodes at %s", self.n_nodes, self.address)
        return self

    def _start_node(self, i: int) -> None:
        temp = self.root / f"n{i}"
        temp.mkdir()
        common = [
            "--num-cpus", str(self.cpus_per_node),
            "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
            "--temp-dir", str(temp),
            "--node-ip-address", "127.0.0.1",
            "--node-manager-port", str(_free_port()),
            "--object-manager-port", str(_free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--disable-usage-stats",
        ]
        if i == 0:
            self.port = _free_port()
            self._ray(
                "start", "--head", "--port", str(self.port), *common,
                "--include-dashboard", "false",
                "--dashboard-agent-listen-port", str(_free_port()),
                "--ray-client-server-port", str(_free_port()),
            )
        else:
            self._ray(
                "start", "--address", self.address, *common,
                "--dashboard-agent-listen-port", str(_free_port()),
            )
        self.nodes.append(_Node(i, temp))

    def node_pids(self, i: int) -> set[int]:
        """The processes of node ``i`` now (those naming its temp dir, and their descendants)."""
        import psutil

        node = self.nodes[i]
        # The head's Ray client server names only the GCS address (host:port, the host
        # being the machine's address), not the temp dir.
        gcs = f":{self.port}" if i == 0 else None
        found: set[int] = set()
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if any(
                str(node.temp_dir) in part
                or (gcs is not None and part.startswith("--address=") and part.endswith(gcs))
                for part in cmdline
            ):
                found.add(proc.pid)
                try:
                    found.update(c.pid for c in proc.children(recursive=True))
                except psutil.Error:
                    continue
        node.pids |= found
        return found

    def node_id(self, i: int) -> str:
        """Ray's id of node ``i`` (read from its raylet's command line)."""
        import psutil

        for pid in self.node_pids(i):
            try:
                cmdline = psutil.Process(pid).cmdline()
            except psutil.Error:
                continue
            for part in cmdline:
                if part.startswith("--node_id="):
                    return str(part.split("=", 1)[1])
        raise LookupError(f"no raylet found for node {i}")

    def kill_node(self, i: int) -> int:
        """SIGKILL every process of node ``i``; how many there were."""
        if i == 0:
            raise ValueError("killing the head ends the cluster; kill another node")
        pids = self.node_pids(i)
        self._kill(pids)
        return len(pids)

    @staticmethod
    def _kill(pids: set[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue

    def stop(self) -> None:
        """Kill this cluster's processes (not ``ray stop``: it would stop every session)."""
        for i in reversed(range(len(self.nodes))):
            self._kill(self.node_pids(i) | self.nodes[i].pids)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(p) for n in self.nodes for p in n.pids):
            time.sleep(0.1)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
