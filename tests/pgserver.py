"""A real PostgreSQL server for the tests: Debian's binaries, initdb and pg_ctl in a temp dir.

The server listens on a free loopback port and a private Unix socket folder, trusts local
connections (it is the tests' own, reachable only from this machine) and is stopped by PID at
the end. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user that
Debian's package creates. Each test gets a database of its own (`database()`), made from the
empty template in milliseconds.
"""

import glob
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import uuid


def binaries() -> pathlib.Path | None:
    """The folder of initdb, pg_ctl and postgres: Debian keeps them per major version, off PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return pathlib.Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return pathlib.Path(initdb).resolve().parent if initdb else None


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, started by start() and stopped by stop()."""

    def __init__(self, port: int):
        self.port = port
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        # Not under pytest's tmp_path (as root that is mode 0700, and the server runs as postgres),
        # nor wherever tempfile points now: an in-process daemon points it at its own data dir.
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="dicoogled-pg-", dir="/tmp"))
        self.data = self.root / "cluster"
        self.sockets = self.root / "sockets"
        self.sockets.mkdir()
        self.log = self.root / "server.log"
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *command, check=True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run([*prefix, *map(str, command)], capture_output=True, text=True)
        if check and done.returncode:
            raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def start(self) -> "PostgresServer":
        if self.user:
            shutil.chown(self.root, self.user)
            shutil.chown(self.sockets, self.user)
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off -c synchronous_commit=off"
                   " -c full_page_writes=off -c max_connections=300")
        started = self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60",
                            "start", check=False)
        if started.returncode:
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{self._server_log()}")
        return self

    def _server_log(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database(self) -> str:
        """The URL of a new, empty database."""
        name = "test_" + uuid.uuid4().hex[:12]
        self.sql(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with psql and return what it printed (unaligned, no headers)."""
        done = self._run(self.bin / "psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "-d", database,
                         "-v", "ON_ERROR_STOP=1", "-At", "-c", statement)
        return done.stdout.strip()

    def stop(self):
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)
