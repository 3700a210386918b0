"""Real PostgreSQL for the tests: find a server, or start a throwaway cluster.

Order of preference: ``ALPHAWATCH_TEST_DATABASE_URL`` (a maintenance database on a server where
the tests may create databases), the server on 127.0.0.1:5432, and last a private cluster made
with ``initdb``/``pg_ctl`` in a temporary folder. Tests get a fresh database cloned from a template
migrated once, so each test starts from the migrated schema without paying for migrations.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url


def _bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL server binaries (initdb) found: apt-get install postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a server accepts connections at ``url`` (SQLAlchemy or libpq form)."""
    try:
        with psycopg.connect(libpq_dsn(url), connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.Error:
        return False


def libpq_dsn(url: str) -> str:
    """SQLAlchemy URL -> libpq URL (psycopg does not understand ``+psycopg``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _as_postgres_user() -> list[str]:
    # initdb and postgres refuse to run as root; CI and dev machines run the tests as root.
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class Cluster:
    """A private PostgreSQL cluster on a free loopback port; ``stop()``/``start()`` it at will."""

    root: Path
    port: int = field(default_factory=free_port)
    url: str = ""
    """URL of the migrated ``alphawatch`` database, set by the fixture that made it."""

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> Cluster:
        bindir = _bin_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            uid = pwd.getpwnam("postgres").pw_uid
            os.chown(self.root, uid, -1)
        subprocess.run(
            [
                *_as_postgres_user(),
                str(bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        return self

    def start(self) -> None:
        bindir = _bin_dir()
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            [
                *_as_postgres_user(),
                str(bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-o",
                opts,
                "-l",
                str(self.root / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        bindir = _bin_dir()
        subprocess.run(
            [
                *_as_postgres_user(),
                str(bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-m",
                mode,
                "-w",
                "stop",
            ],
            check=False,
            capture_output=True,
        )

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def new_cluster() -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="alphawatch-pg-"))
    os.chmod(root, 0o755)
    cluster = Cluster(root=root).init()
    cluster.start()
    return cluster


def find_server() -> tuple[str, Cluster | None]:
    """Admin URL of a server the tests may use, and the cluster started for it (if any)."""
    env = os.environ.get("ALPHAWATCH_TEST_DATABASE_URL")
    if env:
        if not answers(env):
            raise RuntimeError(f"ALPHAWATCH_TEST_DATABASE_URL={env} does not answer")
        return sqlalchemy_url(env), None
    local = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    if answers(local):
        return local, None
    cluster = new_cluster()
    deadline = time.monotonic() + 30
    while not answers(cluster.admin_url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"throwaway cluster in {cluster.root} did not come up")
        time.sleep(0.2)
    return cluster.admin_url, cluster


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(libpq_dsn(admin_url), autocommit=True) as conn:
        if template:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')
    return sqlalchemy_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_dsn(admin_url), autocommit=True) as conn:
        # A worker a test killed may still hold a connection; FORCE ends it.
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
