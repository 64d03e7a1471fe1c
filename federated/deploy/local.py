"""A local Deployment Engine: SuperLink and SuperNodes on one machine, TLS and node auth.

:class:`LocalDeployment` (which the test and ``veilface fed deploy-local``
use) generates the TLS material and node keys
(:mod:`~veilface.federated.deploy.tls`), writes the Flower CLI connection and
the launcher app (:mod:`~veilface.federated.deploy.config`), starts and stops
the processes and submits runs with the Flower CLI
(:mod:`~veilface.federated.deploy.flwr_cli`).

Process layout (all on ``127.0.0.1``, free ports)::

    flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem \\
        --ssl-keyfile server.key --enable-supernode-auth \\
        --disable-runtime-dependency-installation --host 127.0.0.1 --port P
    flwr supernode register node-0.pub veilface-local      # once per node key
    flower-supernode --superlink 127.0.0.1:P --root-certificates ca.pem \\
        --auth-supernode-private-key node-0.key --port Q0 \\
        --node-config "partition-id=0 num-partitions=2"
    flwr run <launcher-app> veilface-local --format json

Every process is started in its own session and stopped (SIGTERM, then
SIGKILL after a grace period) by :meth:`LocalDeployment.stop`, which the
context manager always calls.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from veilface.errors import InvalidArgument
from veilface.federated.deploy.config import (
    CONNECTION_NAME,
    DeploymentError,
    free_port,
    project_run_config,
    toml_value,
    write_flwr_config,
    write_launcher_app,
)
from veilface.federated.deploy.flwr_cli import (
    flwr_env,
    flwr_executable,
    last_json,
    log_tail,
    started_run_id,
)
from veilface.federated.deploy.outcome import RunOutcome
from veilface.federated.deploy.tls import NodeKeyPair, TlsFiles, generate_node_keys, generate_tls

logger = logging.getLogger(__name__)

__all__ = ["LocalDeployment", "RunOutcome"]


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_handle: IO[bytes]


@dataclass
class LocalDeployment:
    """A TLS + SuperNode-auth Flower deployment on one machine, for tests and demos.

    Parameters
    ----------
    work_dir : Path
        Holds certificates, node keys, ``FLWR_HOME`` folders, the launcher app
        and one log file per process.
    num_supernodes : int
        SuperNodes to start; node ``i`` gets ``partition-id=i num-partitions=N``
        plus ``node_config``.
    node_config : mapping
        Extra ``--node-config`` entries for every SuperNode.
    host : str
        Interface everything binds to and dials.
    startup_timeout : float
        Seconds to wait for the SuperLink, registrations and node connections.

    Examples
    --------
    >>> with LocalDeployment(Path("/tmp/fed")) as dep:          # doctest: +SKIP
    ...     outcome = dep.run({"task": "vireid", "num-server-rounds": 2}, timeout=600)
    """

    work_dir: Path
    num_supernodes: int = 2
    node_config: Mapping[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    startup_timeout: float = 90.0
    superlink_port: int = 0
    tls: TlsFiles | None = None
    node_keys: list[NodeKeyPair] = field(default_factory=list)
    _procs: list[_Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_supernodes < 1:
            raise InvalidArgument("num_supernodes must be >= 1")
        self.work_dir = Path(self.work_dir)

    # -- paths and environment

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink's API (Fleet and Control)."""
        return f"{self.host}:{self.superlink_port}"

    @property
    def cli_home(self) -> Path:
        """``FLWR_HOME`` of the Flower CLI calls (holds ``config.toml``)."""
        return self.work_dir / "flwr-cli"

    # -- lifecycle

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Certificates, keys, SuperLink, node registration, SuperNodes; wait until online.

        Raises
        ------
        DeploymentError
            A process exited early or nothing answered within ``startup_timeout``;
            the message names the process and the tail of its log.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.tls = generate_tls(self.work_dir / "tls", hosts=(self.host, "localhost"))
        self.node_keys = [
            generate_node_keys(self.work_dir / "node-keys", f"node-{i}")
            for i in range(self.num_supernodes)
        ]
        self.superlink_port = self.superlink_port or free_port(self.host)
        write_flwr_config(self.cli_home, address=self.address, root_certificates=self.tls.ca_cert)

        self._spawn(
            "superlink",
            [
                flwr_executable("flower-superlink"),
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--isolation", "subprocess",
                "--host", self.host,
                "--port", str(self.superlink_port),
            ],
            self.work_dir / "home-superlink",
        )  # fmt: skip
        deadline = time.monotonic() + self.startup_timeout
        self._wait_port(self.host, self.superlink_port, deadline, "superlink")
        self._register_all(deadline)
        for i, pair in enumerate(self.node_keys):
            cfg = {"partition-id": i, "num-partitions": self.num_supernodes, **self.node_config}
            self._spawn(
                f"supernode-{i}",
                [
                    flwr_executable("flower-supernode"),
                    "--superlink", self.address,
                    "--root-certificates", str(self.tls.ca_cert),
                    "--auth-supernode-private-key", str(pair.private_key),
                    "--isolation", "subprocess",
                    "--host", self.host,
                    "--port", str(free_port(self.host)),
                    "--max-wait-time", str(int(self.startup_timeout)),
                    "--node-config", " ".join(
                        f"{k}={toml_value(v)}" for k, v in cfg.items()
                    ),
                ],
                self.work_dir / f"home-supernode-{i}",
            )  # fmt: skip
        self._wait_nodes_online(deadline)
        logger.info(
            "deployment up: superlink %s (TLS, node auth), %d supernodes",
            self.address,
            self.num_supernodes,
        )

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this deployment started (SIGTERM, then SIGKILL)."""
        for proc in reversed(self._procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + grace
        for proc in reversed(self._procs):
            try:
                proc.popen.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM; killing it", proc.name)
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(timeout=5)
            # children (flwr-serverapp / flwr-clientapp) share the session: reap them too
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.log_handle.close()
        self._procs.clear()

    @property
    def pids(self) -> list[int]:
        """Process ids of the SuperLink and SuperNodes (empty after :meth:`stop`)."""
        return [p.popen.pid for p in self._procs]

    def probe_supernode(
        self, private_key: Path, *, timeout: float = 90.0
    ) -> tuple[int | None, str]:
        """Start one extra SuperNode with ``private_key`` and wait for it to give up.

        Used to show that node authentication is enforced: a key that was not
        registered with ``flwr supernode register`` is refused at activation
        (flwr exit code 305). The probe never joins :attr:`pids` and is always
        stopped before returning.

        Returns
        -------
        (int or None, str)
            The exit code (None if it was still running at ``timeout`` and had
            to be killed) and the tail of its log.
        """
        if self.tls is None:
            raise DeploymentError("start() the deployment before probing it")
        log_path = self.work_dir / f"probe-{private_key.stem}.log"
        home = self.work_dir / f"home-probe-{private_key.stem}"
        home.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as handle:
            proc = subprocess.Popen(
                [
                    flwr_executable("flower-supernode"),
                    "--superlink", self.address,
                    "--root-certificates", str(self.tls.ca_cert),
                    "--auth-supernode-private-key", str(private_key),
                    "--host", self.host,
                    "--port", str(free_port(self.host)),
                    "--max-retries", "0",
                    "--max-wait-time", str(int(timeout)),
                    "--node-config", "partition-id=0 num-partitions=1",
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=flwr_env(home),
                cwd=str(self.work_dir),
                start_new_session=True,
            )  # fmt: skip
            try:
                code: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(timeout=10)
        return code, log_tail(log_path)

    # -- running an app

    def run(
        self,
        run_config: Mapping[str, Any] | None = None,
        *,
        base_config: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
        poll: float = 1.0,
    ) -> RunOutcome:
        """Submit the project's apps with ``flwr run`` and wait for the run to end.

        Parameters
        ----------
        run_config : mapping, optional
            Overrides on top of ``base_config``.
        base_config : mapping, optional
            Defaults to the project's ``[tool.flwr.app.config]``.
        timeout : float
            Seconds before the run is stopped (``flwr stop``) and an error raised.
            The run's log (``flwr run --stream``) is kept in ``work_dir/flwr-run.log``.
        poll : float
            Seconds between liveness checks of the processes while the run streams.

        Returns
        -------
        RunOutcome
            A failed run is returned, not raised: ``outcome.ok`` is False and
            ``outcome.error`` holds the ServerApp's error.

        Raises
        ------
        DeploymentError
            ``flwr run`` failed, or the run did not finish within ``timeout``.
        """
        config = dict(project_run_config() if base_config is None else base_config)
        config.update(run_config or {})
        app_dir = write_launcher_app(self.work_dir / "app", config)
        started = time.monotonic()
        # `--stream` prints the run's log and returns when the run has finished.
        argv = [flwr_executable("flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream"]
        log_path = self.work_dir / "flwr-run.log"
        with log_path.open("wb") as handle:
            proc = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=flwr_env(self.cli_home),
                cwd=str(self.work_dir),
                start_new_session=True,
            )
            try:
                while proc.poll() is None:
                    if time.monotonic() - started > timeout:
                        raise DeploymentError(
                            f"the run did not finish within {timeout:.0f} s; logs in "
                            f"{self.work_dir}"
                        )
                    self.check_alive()
                    time.sleep(poll)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                    run_id = started_run_id(log_path.read_text(errors="replace"))
                    if run_id is not None:
                        self._flwr(["stop", str(run_id), CONNECTION_NAME], 60.0, check=False)
        text = log_path.read_text(errors="replace")
        run_id = started_run_id(text)
        if proc.returncode != 0 or run_id is None:
            raise DeploymentError(
                f"flwr run failed (exit {proc.returncode}): {text.strip()[-2000:]}"
            )
        record = self._run_record(run_id)
        seconds = time.monotonic() - started
        outcome = RunOutcome(
            run_id,
            str(record.get("status", "")),
            seconds,
            text,
            details=str(record.get("status-details", "") or ""),
        )
        logger.info(
            "run %d: %s in %.1f s%s",
            run_id,
            outcome.status,
            seconds,
            "" if outcome.ok else f": {outcome.error}",
        )
        return outcome

    def run_status(self, run_id: int) -> str:
        """``status`` of one run as ``flwr ls --run-id`` reports it (e.g. ``running``)."""
        return str(self._run_record(run_id).get("status", ""))

    def _run_record(self, run_id: int) -> dict[str, Any]:
        """The run's entry in ``flwr ls --run-id N --format json`` (empty if absent)."""
        out = self._flwr(["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"], 60.0)
        for run in last_json(out).get("runs", []):
            if str(run.get("run-id")) == str(run_id):
                return dict(run)
        return {}

    # -- helpers

    def _spawn(self, name: str, argv: list[str], home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / f"{name}.log"
        handle = log_path.open("ab")
        logger.debug("starting %s: %s", name, " ".join(argv))
        popen = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=flwr_env(home),
            cwd=str(self.work_dir),
            start_new_session=True,
        )
        self._procs.append(_Proc(name, popen, log_path, handle))

    def check_alive(self) -> None:
        """Raise :class:`DeploymentError` if a started process has exited."""
        for proc in self._procs:
            code = proc.popen.poll()
            if code is not None:
                raise DeploymentError(
                    f"{proc.name} exited with code {code}; last log lines:\n"
                    + log_tail(proc.log_path)
                )

    def _wait_port(self, host: str, port: int, deadline: float, name: str) -> None:
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.3)
        raise DeploymentError(f"{name} did not listen on {host}:{port} in time")

    def _register_all(self, deadline: float) -> None:
        """``flwr supernode register <key>.pub`` for every node key (retried until ready)."""
        pending = list(self.node_keys)
        last = ""
        while pending and time.monotonic() < deadline:
            self.check_alive()
            calls = [
                (
                    pair,
                    subprocess.Popen(
                        [flwr_executable("flwr"), "supernode", "register", str(pair.public_key),
                         CONNECTION_NAME],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=flwr_env(self.cli_home),
                        cwd=str(self.work_dir),
                    ),
                )
                for pair in pending
            ]  # fmt: skip
            failed = []
            for pair, proc in calls:
                try:
                    out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                if proc.returncode != 0:
                    failed.append(pair)
                    last = out.decode(errors="replace").strip()[-1000:]
            pending = failed
            if pending:
                time.sleep(1.0)
        if pending:
            raise DeploymentError(
                f"could not register {[p.name for p in pending]} with the SuperLink: {last}"
            )

    def _wait_nodes_online(self, deadline: float) -> None:
        online = 0
        while time.monotonic() < deadline:
            self.check_alive()
            out = self._flwr(["supernode", "ls", CONNECTION_NAME, "--format", "json"], 60.0)
            nodes = last_json(out).get("nodes", [])
            online = sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")
            if online >= self.num_supernodes:
                return
            time.sleep(1.0)
        raise DeploymentError(
            f"only {online}/{self.num_supernodes} SuperNodes came online; see "
            f"{self.work_dir}/supernode-*.log"
        )

    def _flwr(self, args: list[str], timeout: float, *, check: bool = True) -> str:
        argv = [flwr_executable("flwr"), *args]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                env=flwr_env(self.cli_home),
                cwd=str(self.work_dir),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"`flwr {' '.join(args)}` timed out after {timeout} s") from exc
        out = done.stdout.decode(errors="replace")
        if check and done.returncode != 0:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed ({done.returncode}): "
                + (out + done.stderr.decode(errors="replace")).strip()[-2000:]
            )
        return out
