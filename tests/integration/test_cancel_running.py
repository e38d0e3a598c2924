"""Cancelling a PROCESSING operation: NOTIFY -> scheduler -> sidecar -> the trigger
function's context; a function that does not stop in time loses its worker."""

from __future__ import annotations

import asyncio
import time

import psycopg

from damops import lifecycle
from damops.operations import enqueue
from tests.support.engine import row, running_engine, settings, wait_final, wait_until

HOSTILE = "tests.support.hostile"


def _cancel(database_url: str, op_id: int) -> lifecycle.CancelResult:
    with psycopg.connect(database_url) as conn:
        return lifecycle.cancel(conn, [op_id])


def test_a_running_operation_sees_its_cancel_promptly_and_stops_cleanly(database_url, tmp_path):
    flag = tmp_path / "started"
    # A heartbeat of a minute: only the NOTIFY can explain a prompt cancel.
    config = settings(worker_count=1, scheduler_heartbeat=60, cancel_grace=60)

    async def scenario():
        async with running_engine(database_url, config) as engine:
            pids = engine.worker_pids()
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, f"{HOSTILE}:until_cancelled", {"flag": str(flag)})
            await wait_until(flag.exists, 30, "the operation to start")
            asked = time.monotonic()
            result = await asyncio.to_thread(_cancel, database_url, op_id)
            await wait_final(database_url, [op_id], timeout=30)
            took = time.monotonic() - asked
            with psycopg.connect(database_url) as conn:
                after = enqueue(conn, f"{HOSTILE}:pid")
            await wait_final(database_url, [after], timeout=30)
            return op_id, result, took, pids, after

    op_id, result, took, pids, after = asyncio.run(scenario())
    assert result.requested == [op_id]
    cancelled = row(database_url, op_id)
    assert cancelled["status"] == "CANCELLED" and cancelled["attempts"] == 1
    assert took < 20, took  # far below the 60 s heartbeat and grace
    assert row(database_url, after)["result"]["pid"] in pids  # it stopped itself: no worker killed


def test_a_running_operation_that_ignores_its_cancel_loses_its_worker_after_the_grace(database_url, tmp_path):
    flag = tmp_path / "started"
    config = settings(worker_count=1, cancel_grace=1.0)

    async def scenario():
        async with running_engine(database_url, config) as engine:
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, f"{HOSTILE}:ignores_cancel", {"flag": str(flag)})
            await wait_until(flag.exists, 30, "the operation to start")
            stubborn = int(flag.read_text())
            await asyncio.to_thread(_cancel, database_url, op_id)
            await wait_final(database_url, [op_id], timeout=60)
            await wait_until(lambda: engine.scheduler.snapshot().free == 1, 60, "a replacement worker")
            with psycopg.connect(database_url) as conn:
                after = enqueue(conn, f"{HOSTILE}:pid")
            await wait_final(database_url, [after], timeout=30)
            return op_id, stubborn, after

    op_id, stubborn, after = asyncio.run(scenario())
    cancelled = row(database_url, op_id)
    assert cancelled["status"] == "CANCELLED" and "CANCEL_GRACE" in cancelled["error"]
    assert row(database_url, after)["result"]["pid"] != stubborn  # the stubborn worker was replaced
