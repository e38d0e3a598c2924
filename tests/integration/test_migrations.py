"""Migrating a database that holds data in the 0001 schema."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from damops import db, lifecycle, store
from damops.operations import attempts, enqueue, get
from damops.protocol import StatusUpdate


@pytest.fixture
def old_database(server_url):
    """A database with only migration 0001 applied, as today's deployments have it."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    version, filename, sql = db.migration_files()[0]
    assert version == 1
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA damops")
        conn.execute(
            "CREATE TABLE damops.schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(sql)
        conn.execute("INSERT INTO damops.schema_migrations (version, name) VALUES (%s, %s)", (version, filename))
    yield url
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migration_keeps_existing_operations_and_they_keep_working(old_database):
    with psycopg.connect(old_database, autocommit=True) as conn:
        rows = conn.execute(
            """
            INSERT INTO damops.operations (trigger_function, inputs, status, attempts, max_attempts, worker, result, error)
            VALUES ('noop', '{"a": 1}', 'NEW', 0, 3, NULL, NULL, NULL),
                   ('noop', '{}', 'WAIT', 0, 5, NULL, NULL, NULL),
                   ('noop', '{}', 'PROCESSING', 1, 3, 'w-old', NULL, NULL),
                   ('noop', '{}', 'SUCCESS', 1, 3, NULL, '{"ok": true}', NULL),
                   ('fail', '{}', 'FAILED', 3, 3, NULL, NULL, 'RuntimeError: x')
            RETURNING id
            """
        ).fetchall()
        new, waiting, processing, success, failed = (r[0] for r in rows)

    assert db.migrate(old_database) == [name for _, name, _ in db.migration_files()[1:]]
    assert db.migrate(old_database) == []  # re-running is a no-op

    with psycopg.connect(old_database, autocommit=True) as conn:
        assert get(conn, new).inputs == {"a": 1} and get(conn, new).max_attempts == 3
        assert get(conn, waiting).status == "WAIT" and get(conn, waiting).max_attempts == 5
        assert get(conn, success).result == {"ok": True} and get(conn, success).finished is not None
        assert get(conn, failed).error == "RuntimeError: x" and get(conn, failed).finished is not None
        assert get(conn, new).finished is None and get(conn, new).run_after is None
        # The old NEW row is claimable through the new index; the old PROCESSING row completes.
        claimed = conn.execute(store.CLAIM_SQL, store.claim_params("default", ["w1"], 30.0)).fetchall()
        assert [c[0] for c in claimed] == [new]
        update = StatusUpdate(id=processing, attempt=1, outcome="success", result=1)
        done = conn.execute(store.COMPLETE_SQL, store.complete_params([store.Completion(update, "w-old")])).fetchall()
        assert [(d[0], d[1]) for d in done] == [(processing, "SUCCESS")]
        assert [a.worker for a in attempts(conn, processing)] == ["w-old"]
        assert get(conn, processing).last_worker is None  # claimed before 0002: unknown, not invented
        # The old FAILED row can be retried; new operations get the new defaults.
        assert lifecycle.retry(conn, [failed]) == [failed]
        fresh = enqueue(conn, "noop")
        assert get(conn, fresh).max_attempts is None
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO damops.operations (trigger_function, pool) VALUES ('noop', '')")
