"""Shared fixtures: a real PostgreSQL (embedded, or DAMOPS_TEST_DATABASE_URL),
a fresh migrated database per test, and test trigger functions importable by
worker processes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Worker processes are separate interpreters: they import the test trigger
# functions (tests.support.triggers) from the repository root.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# ...and may run them: module paths run only inside the allow-list.
os.environ.setdefault("DAMOPS_ALLOWED_TRIGGERS", "tests.support")


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The PostgreSQL server the tests use: DAMOPS_TEST_DATABASE_URL, else an embedded one."""
    url = os.environ.get("DAMOPS_TEST_DATABASE_URL")
    if url:
        return url
    from damops.embedded import start_embedded_postgres

    return start_embedded_postgres(tmp_path_factory.mktemp("embedded"))


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
