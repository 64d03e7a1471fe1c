"""Run the veilface Flower apps on the Deployment Engine, locally, with TLS and node auth.

The pieces a real deployment needs, usable one by one or through
:class:`LocalDeployment` (which the test and ``veilface fed deploy-local`` use):

- :func:`generate_tls`: a throw-away CA and a server certificate for the
  SuperLink (``cryptography``; SANs for ``127.0.0.1`` and ``localhost``).
- :func:`generate_node_keys`: one EC (NIST P-384) key pair per SuperNode in
  OpenSSH format, the format ``flwr supernode register`` and
  ``flower-supernode --auth-supernode-private-key`` expect.
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

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import tomllib

from veilface.errors import FailedPrecondition, InvalidArgument

logger = logging.getLogger(__name__)

__all__ = [
    "CONNECTION_NAME",
    "DeploymentError",
    "LocalDeployment",
    "NodeKeyPair",
    "RunOutcome",
    "TlsFiles",
    "free_port",
    "generate_node_keys",
    "generate_tls",
    "project_run_config",
    "write_flwr_config",
    "write_launcher_app",
]

CONNECTION_NAME = "veilface-local"
_REPO_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class DeploymentError(FailedPrecondition):
    """A Deployment Engine process failed to start, register, run or stop in time."""


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the SuperLink's TLS.

    Attributes
    ----------
    ca_cert : Path
        Self-signed CA certificate; give it to SuperNodes (``--root-certificates``)
        and to the Flower CLI (``root-certificates``).
    server_cert, server_key : Path
        SuperLink certificate (signed by the CA) and its unencrypted private key.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


def generate_tls(
    out_dir: str | os.PathLike[str],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 7,
) -> TlsFiles:
    """Create a CA and a SuperLink server certificate for ``hosts`` in ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Folder for ``ca.pem``, ``server.pem``, ``server.key`` (created if missing;
        the key files are written with mode 0600).
    hosts : sequence of str
        Subject alternative names: IP addresses or DNS names the SuperNodes dial.
    days : int
        Validity, from one hour ago.

    Returns
    -------
    TlsFiles
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise InvalidArgument("generate_tls needs at least one host name or IP address")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veilface local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(out / "ca.pem", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode's authentication key pair (OpenSSH format, EC P-384)."""

    name: str
    private_key: Path
    public_key: Path


def generate_node_keys(out_dir: str | os.PathLike[str], name: str) -> NodeKeyPair:
    """Create ``<name>.key`` / ``<name>.pub`` in ``out_dir`` for SuperNode authentication.

    The public key is what ``flwr supernode register`` sends to the SuperLink;
    the private key stays with the SuperNode (``--auth-supernode-private-key``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name:
        raise InvalidArgument(f"node key name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKeyPair(name, out / f"{name}.key", out / f"{name}.pub")
    _write_secret(
        pair.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pair.public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode()
    )
    return pair


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


# --------------------------------------------------------------------------- config


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


def _toml_value(value: Any) -> str:
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
        lines.append(f"{json.dumps(str(key))} = {_toml_value(value)}")
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# --------------------------------------------------------------------------- processes


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_handle: IO[bytes]


@dataclass(frozen=True)
class RunOutcome:
    """What :meth:`LocalDeployment.run` observed.

    Attributes
    ----------
    run_id : int
        The SuperLink's run id.
    status : str
        Final status as ``flwr ls`` reports it (``"finished:completed"`` on success).
    seconds : float
        Wall time from submission to the final status.
    server_log : str
        ``flwr log`` output of the run (the ServerApp's log lines).
    """

    run_id: int
    status: str
    seconds: float
    server_log: str

    @property
    def ok(self) -> bool:
        """True when the run completed."""
        return self.status.endswith("completed")


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

    def _env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(home)
        env.setdefault("PYTHONUNBUFFERED", "1")
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        return env

    @staticmethod
    def _exe(name: str) -> str:
        candidate = Path(sys.executable).parent / name
        if not candidate.exists():
            raise DeploymentError(
                f"{name} not found next to {sys.executable}; install flwr in this "
                'environment (pip install -e ".[federated]")'
            )
        return str(candidate)

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
                self._exe("flower-superlink"),
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
                    self._exe("flower-supernode"),
                    "--superlink", self.address,
                    "--root-certificates", str(self.tls.ca_cert),
                    "--auth-supernode-private-key", str(pair.private_key),
                    "--isolation", "subprocess",
                    "--host", self.host,
                    "--port", str(free_port(self.host)),
                    "--max-wait-time", str(int(self.startup_timeout)),
                    "--node-config", " ".join(
                        f"{k}={_toml_value(v)}" for k, v in cfg.items()
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
                    self._exe("flower-supernode"),
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
                env=self._env(home),
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
        return code, _tail(log_path)

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
        argv = [self._exe("flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream"]
        log_path = self.work_dir / "flwr-run.log"
        with log_path.open("wb") as handle:
            proc = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(self.cli_home),
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
                    run_id = _run_id(log_path.read_text(errors="replace"))
                    if run_id is not None:
                        self._flwr(["stop", str(run_id), CONNECTION_NAME], 60.0, check=False)
        text = log_path.read_text(errors="replace")
        run_id = _run_id(text)
        if proc.returncode != 0 or run_id is None:
            raise DeploymentError(
                f"flwr run failed (exit {proc.returncode}): {text.strip()[-2000:]}"
            )
        status = self.run_status(run_id)
        seconds = time.monotonic() - started
        logger.info("run %d: %s in %.1f s", run_id, status, seconds)
        return RunOutcome(run_id, status, seconds, text)

    def run_status(self, run_id: int) -> str:
        """``status`` of one run as ``flwr ls --run-id`` reports it (e.g. ``running``)."""
        out = self._flwr(["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"], 60.0)
        runs = _last_json(out).get("runs", [])
        for run in runs:
            if str(run.get("run-id")) == str(run_id):
                return str(run.get("status", ""))
        return ""

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
            env=self._env(home),
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
                    f"{proc.name} exited with code {code}; last log lines:\n" + _tail(proc.log_path)
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
                        [self._exe("flwr"), "supernode", "register", str(pair.public_key),
                         CONNECTION_NAME],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=self._env(self.cli_home),
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
            nodes = _last_json(out).get("nodes", [])
            online = sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")
            if online >= self.num_supernodes:
                return
            time.sleep(1.0)
        raise DeploymentError(
            f"only {online}/{self.num_supernodes} SuperNodes came online; see "
            f"{self.work_dir}/supernode-*.log"
        )

    def _flwr(self, args: list[str], timeout: float, *, check: bool = True) -> str:
        argv = [self._exe("flwr"), *args]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                env=self._env(self.cli_home),
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


def _run_id(text: str) -> int | None:
    match = re.search(r"Successfully started run (\d+)", text)
    return int(match.group(1)) if match else None


def _last_json(text: str) -> dict[str, Any]:
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


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
