"""The operator's queue-depth read keeps one connection per pool and survives losing it."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from damops.k8s.queue_depth import QueueDepth
from damops.operations import NewOperation, enqueue_many
from tests.support.engine import wait_until_db


def backends(conn: psycopg.Connection, app: str) -> list[int]:
    rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)).fetchall()
    return [row[0] for row in rows]


def test_reads_share_one_connection_and_recover_when_it_is_dropped(database_url: str, conn) -> None:
    enqueue_many(conn, [NewOperation("noop", {}, pool="p") for _ in range(3)] + [NewOperation("noop", {}, pool="q")])
    url = psycopg.conninfo.make_conninfo(database_url, application_name="depth-a")
    depth = QueueDepth()

    async def scenario() -> None:
        assert await depth.read(url, "p") == 3
        first = backends(conn, "depth-a")
        assert await depth.read(url, "q") == 1
        assert backends(conn, "depth-a") == first and len(first) == 1  # kept, not one per read

        # With a timeout, pg_terminate_backend returns once the backend has exited.
        assert conn.execute("SELECT pg_terminate_backend(%s, 30000)", (first[0],)).fetchone() == (True,)
        assert await depth.read(url, "p") == 3  # a dropped connection is replaced within the read
        again = backends(conn, "depth-a")
        assert len(again) == 1 and again != first

        other = psycopg.conninfo.make_conninfo(database_url, application_name="depth-b")
        assert await depth.read(other, "p") == 3  # a new URL (the pool's Secret changed): a new connection
        assert len(backends(conn, "depth-b")) == 1
        # A closed connection's backend exits on its own time: wait for it, not a fixed sleep.
        await wait_until_db(lambda: backends(conn, "depth-a") == [], 30, "the old URL's backend to exit")

        await depth.close()
        await wait_until_db(lambda: backends(conn, "depth-b") == [], 30, "the closed connection's backend to exit")

    asyncio.run(scenario())


def test_an_unreachable_database_is_an_error_of_the_read(database_url: str) -> None:
    bad = psycopg.conninfo.make_conninfo(database_url, dbname="no_such_database")
    with pytest.raises(psycopg.OperationalError, match="no_such_database"):
        asyncio.run(QueueDepth().read(bad, "p"))
