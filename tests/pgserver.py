"""A real PostgreSQL server for the tests: Debian's binaries, initdb and pg_ctl in a temp dir.

The server listens on a free loopback port and a private Unix socket folder, trusts local
connections (it is the tests' own, reachable only from this machine) and is stopped by PID at
the end. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user that
Debian's package creates. Each test gets a database of its own (`database()`), made from the
empty template in milliseconds.

The benchmarks use it too (bench/scale.py, bench/nodes.py): given a folder of its own, the cluster
is kept there by stop() and started again by start(), so an index built once is reused; durable
turns fsync and full-page writes back on, as a production server runs, for timing ingest.
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

    def __init__(self, port: int, root: pathlib.Path | None = None, durable: bool = False):
        self.port = port
        self.durable = durable
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        # Not under pytest's tmp_path (as root that is mode 0700, and the server runs as postgres),
        # nor wherever tempfile points now: an in-process daemon points it at its own data dir.
        self.kept = root is not None
        self.root = pathlib.Path(root) if root else pathlib.Path(tempfile.mkdtemp(prefix="dicoogled-pg-", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "cluster"
        self.sockets = self.root / "sockets"
        self.sockets.mkdir(exist_ok=True)
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
        if not (self.data / "PG_VERSION").exists():  # a kept cluster is started again as it is
            self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                      "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.sockets} -c max_connections=300"
        if not self.durable:  # the tests' data need not survive a crash
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
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

    def pid(self) -> int:
        """The server's main process (its backends are its children)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

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
        """Stop the server and delete its folder, unless it was given one to keep."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            # A kept cluster is shut down cleanly (a checkpoint), so its next start needs no recovery.
            mode = "fast" if self.kept else "immediate"
            stopped = self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", check=False)
            if stopped.returncode:
                self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.kept:
            shutil.rmtree(self.root, ignore_errors=True)
