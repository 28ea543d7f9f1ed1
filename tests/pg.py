"""A real PostgreSQL server for tests, started on 127.0.0.1 in a temp dir and stopped afterwards.

Fixtures (register them by importing into conftest.py):
    postgres_server     session: the running server (PostgresServer), or a skip when no binaries exist
    postgres_url        session: `postgresql+psycopg://` URL of one database shared by the session
    fresh_postgres_url  function: URL of a new, empty database for one test, dropped after it

Binaries come from PATH or the newest /usr/lib/postgresql/*/bin (Debian's `postgresql` package; `.ci/run`
installs it). PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
(or `nobody`) via runuser. Durability is switched off (fsync, synchronous_commit): the data is throwaway.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port

_START_TRIES = 3  # another process may take the free port between our probe and the server's bind


def find_pg_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for folder in candidates:
        if all((folder / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _server_user() -> str | None:
    """Who runs the server: None means ourselves; as root, an unprivileged user that exists here."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    """Temp dir holding the data dir, the socket and the log; owned by `user`."""
    user: str | None
    port: int = 0
    host: str = "127.0.0.1"
    superuser: str = "postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.superuser}@{self.host}:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        self._admin(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def drop_database(self, dbname: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=self.superuser, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = (
                ["runuser", "-u", self.user, "--", *cmd]
                if shutil.which("runuser")
                else ["su", "-s", "/bin/sh", self.user, "-c", shlex.join(cmd)]
            )
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, check=check, timeout=120)

    def start(self) -> None:
        data = self.root / "data"
        self._run(
            "initdb", "-D", str(data), "-U", self.superuser, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"
        )
        for _ in range(_START_TRIES):
            self.port = free_port()
            options = (
                f"-h {self.host} -p {self.port} -k {self.root} -F -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=100"
            )
            result = self._run(
                "pg_ctl",
                "-D",
                str(data),
                "-l",
                str(self.root / "log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
                check=False,
            )
            if result.returncode == 0:
                return
        log = (self.root / "log").read_text(errors="replace")[-3000:] if (self.root / "log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start from {self.bin_dir}:\n{result.stdout}{result.stderr}\n{log}")

    def stop(self) -> None:
        """Stop the server (if running) and delete its files. Safe to call twice."""
        if (self.root / "data" / "postmaster.pid").exists():
            result = self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop", check=False)
            if result.returncode != 0:
                self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """Start a throwaway server; pytest.skip if this machine has no PostgreSQL binaries."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
            "install the 'postgresql' package (.ci/run does) to run the PostgreSQL tests"
        )
    user = _server_user()
    # Not pytest's tmp_path: that lives under a 0700 folder the server's user could not enter.
    root = Path(tempfile.mkdtemp(prefix="prefixd-pg-"))
    if user is not None:
        shutil.chown(root, user=user)
    server = PostgresServer(bin_dir=bin_dir, root=root, user=user)
    atexit.register(server.stop)  # also when the session dies before fixture teardown
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server():
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """One database for the whole session."""
    return postgres_server.create_database("prefixd_session")


_db_numbers = itertools.count()


@pytest.fixture
def fresh_postgres_url(postgres_server):
    """A new, empty database for this test alone; dropped (connections and all) after it."""
    name = f"prefixd_test_{os.getpid()}_{next(_db_numbers)}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)
