"""A real PostgreSQL for the tests: one cluster per test session, a fresh database per test.

The cluster lives in a temporary directory, listens on 127.0.0.1 (a free
port) and on a unix socket in that directory, with ``fsync`` on, as a
production one. ``initdb`` refuses to run as root, and CI runs as root: then
the cluster belongs to an unprivileged system user (``paystream-test``,
created if missing) and its programs run through ``runuser``. The binaries
come from Debian's ``postgresql`` package (``make pg-deps`` installs it);
without them the tests fail, they are not skipped.

- ``pg_cluster``: the running cluster (session-scoped).
- ``pg_dsn``: ``postgresql://…`` of a new, empty database for one test.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The unprivileged owner of the test cluster when the tests run as root.
PG_USER = "paystream-test"
#: The cluster's superuser (trust authentication on 127.0.0.1 and the socket).
PG_ROLE = "paystream"


def pg_bin(name: str) -> str:
    """The path of PostgreSQL program ``name`` (Debian keeps them off PATH)."""
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} is missing: run `make pg-deps` "
            "(apt-get install postgresql) to install it"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    """A running test cluster: where it is and how to reach it."""

    root: Path
    port: int
    run_as: list[str]

    def dsn(self, database: str = "postgres") -> str:
        """``postgresql://`` URL of ``database`` on this cluster over 127.0.0.1."""
        return f"postgresql://{PG_ROLE}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql (autocommit); its output."""
        return subprocess.run(
            [pg_bin("psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(database), "-c", sql],
            check=True, capture_output=True, text=True,
        ).stdout


def _run_as() -> list[str]:
    """Prefix that runs a program as the cluster's owner (nothing if we are not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
        )
    return ["runuser", "-u", PG_USER, "--"]


@contextlib.contextmanager
def running_cluster() -> Iterator[PgCluster]:
    """initdb + pg_ctl start in a fresh temp dir; stopped and removed afterwards."""
    run_as = _run_as()
    root = Path(tempfile.mkdtemp(prefix="paystream-pg-"))
    os.chmod(root, 0o755)
    data = root / "data"
    if run_as:
        shutil.chown(root, PG_USER)
    port = _free_port()
    subprocess.run(
        [*run_as, pg_bin("initdb"), "-D", str(data), "-U", PG_ROLE, "--auth=trust",
         "-E", "UTF8", "--no-locale"],
        check=True, capture_output=True,
    )
    options = (
        f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} "
        "-c fsync=on -c synchronous_commit=on -c max_connections=200 "
        "-c shared_buffers=64MB"
    )
    subprocess.run(
        [*run_as, pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options,
         "-w", "-t", "60", "start"],
        check=True, capture_output=True,
    )
    try:
        yield PgCluster(root, port, run_as)
    finally:
        subprocess.run(
            [*run_as, pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL cluster for the whole test session."""
    with running_cluster() as cluster:
        yield cluster


_databases = itertools.count(1)


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    """A new, empty database for this test: its ``postgresql://`` URL."""
    name = f"t{os.getpid()}_{next(_databases)}"
    pg_cluster.psql(f"CREATE DATABASE {name}")
    return pg_cluster.dsn(name)
