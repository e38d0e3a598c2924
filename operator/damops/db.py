"""Connections and schema migrations.

Migrations are the numbered ``migrations/*.sql`` files, applied in order under
an advisory lock so that two instances starting together never race, and
recorded in ``damops.schema_migrations`` so that re-running is a no-op.
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg

log = logging.getLogger(__name__)

# Advisory-lock keys (arbitrary, fixed): one for migrations, one for housekeeping.
MIGRATION_LOCK_KEY = 0x64616D6F_01
HOUSEKEEPING_LOCK_KEY = 0x64616D6F_02


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every bundled migration, in order."""
    found = []
    for entry in resources.files("damops.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


def migrate(conninfo: str) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date)."""
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS damops")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS damops.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM damops.schema_migrations")}
            for version, name, sql in migration_files():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute(
                        "INSERT INTO damops.schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                    )
                log.info("applied migration %s", name)
                applied.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied
