"""Run a local ``veilface serve`` in a child process (demo, benchmarks, tests).

The child binds port 0 and announces the port it got on stdout, so nothing
depends on a fixed port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from veilface.errors import VeilfaceError
from veilface.server.store.factory import parse_db


class LocalServer:
    """``with LocalServer(db) as srv: srv.target, srv.admin_token``.

    ``db`` is a SQLite file or a store URL (``postgresql://...``, which
    needs ``admin_token_file``: no file sits beside such a database).

    The child binds 127.0.0.1 (loopback, so plaintext is allowed); with
    ``tls_cert``/``tls_key`` or ``tls_self_signed=DIR`` it serves TLS and
    :attr:`root_cert` is what a client passes to verify it.
    """

    def __init__(
        self,
        db_path: Path | str,
        *,
        admin_token_file: Path | None = None,
        workers: int = 2,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_self_signed: Path | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.store = parse_db(db_path)
        if self.store.path is None and admin_token_file is None:
            raise ValueError("a LocalServer on a PostgreSQL store needs admin_token_file")
        self.admin_token_file = admin_token_file
        self.workers = workers
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.tls_self_signed = Path(tls_self_signed) if tls_self_signed else None
        self.extra_args = extra_args or []
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.metrics_url = ""  # the Prometheus endpoint, when started with --metrics-port

    @property
    def db_path(self) -> Path:
        """The SQLite file (ValueError on a PostgreSQL store)."""
        if self.store.path is None:
            raise ValueError(f"the server's store is {self.store.redacted}, not a SQLite file")
        return self.store.path

    @property
    def admin_token_path(self) -> Path:
        if self.admin_token_file is not None:
            return self.admin_token_file
        return self.db_path.with_suffix(".admin-token")

    @property
    def admin_token(self) -> str:
        return self.admin_token_path.read_text().strip()

    @property
    def root_cert(self) -> Path | None:
        """What a client passes as ``root_cert``: the development CA, or the given certificate."""
        if self.tls_self_signed is not None:
            return self.tls_self_signed / "ca.pem"
        return self.tls[0] if self.tls else None

    @property
    def target(self) -> str:
        tls = self.tls or self.tls_self_signed
        return f"{'localhost' if tls else '127.0.0.1'}:{self.port}"

    def start(self) -> Self:
        cmd = [
            sys.executable, "-m", "veilface.cli.main", "serve",
            "--port", "0", "--workers", str(self.workers),
        ]
        # A database URL travels in the environment, not argv: its password stays out of `ps`.
        store_env = {"VEILFACE_DB_URL": self.store.dsn} if self.store.path is None else {}
        if self.store.path is not None:
            cmd += ["--db", str(self.store.path)]
        if self.admin_token_file is not None:
            cmd += ["--admin-token-file", str(self.admin_token_file)]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        if self.tls_self_signed:
            cmd += ["--tls-self-signed", str(self.tls_self_signed)]
        cmd += self.extra_args
        env = {**os.environ, **store_env, **(self.env or {})}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("veilface metrics on "):  # --metrics-port: printed first
                self.metrics_url = line.split(" on ", 1)[1].strip()
            if line.startswith("veilface listening on "):
                self.port = int(line.rsplit(":", 1)[1])
                return self
        self.kill()
        raise VeilfaceError("the local server did not start; see its log above")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and its workers (crash test)."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stray workers of the group
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.stdout:
                self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
