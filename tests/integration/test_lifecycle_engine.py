"""The lifecycle with the real scheduler and worker processes: backoff gaps
(read from the attempt history), Retry(after=), MAX_ATTEMPTS, scheduled and
cancelled operations."""

from __future__ import annotations

import asyncio
import time

import psycopg

from damops import lifecycle
from damops.operations import attempts, enqueue
from tests.support.engine import row, running_engine, settings, wait_final, wait_until

TRIGGERS = "tests.integration.lifecycle_triggers"
# Scheduler heartbeat (0.2 s) plus a loaded 2-core machine.
SLACK = 1.5


def gaps(database_url, op_id):
    """Seconds between one attempt's end and the next one's start."""
    with psycopg.connect(database_url) as conn:
        history = attempts(conn, op_id)
    return [(b.started - a.finished).total_seconds() for a, b in zip(history, history[1:])]


def test_retryable_failures_back_off_exponentially(database_url):
    config = settings(worker_count=1, retry_backoff_base=1.0, retry_backoff_max=10.0, retry_backoff_jitter=0.0)

    async def scenario():
        async with running_engine(database_url, config):
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, f"{TRIGGERS}:always_fail", max_attempts=3)
            await wait_final(database_url, [op_id], timeout=60)
            return op_id

    op_id = asyncio.run(scenario())
    first, second = gaps(database_url, op_id)
    assert 1.0 - 0.05 <= first < 1.0 + SLACK, first
    assert 2.0 - 0.05 <= second < 2.0 + SLACK, second
    done = row(database_url, op_id)
    assert done["status"] == "FAILED" and done["attempts"] == 3 and done["last_worker"]
    assert "transient outage on attempt 3" in done["error"]


def test_retry_after_asked_by_the_trigger_function(database_url):
    config = settings(worker_count=1, retry_backoff_base=60.0)  # the policy alone would wait a minute

    async def scenario():
        async with running_engine(database_url, config):
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, f"{TRIGGERS}:retry_later", {"after": 1.5, "succeed_on": 2})
            await wait_final(database_url, [op_id], timeout=30)
            return op_id

    op_id = asyncio.run(scenario())
    [gap] = gaps(database_url, op_id)
    assert 1.5 - 0.05 <= gap < 1.5 + SLACK, gap
    assert row(database_url, op_id)["result"] == {"attempt": 2}


def test_max_attempts_setting_applies_to_operations_without_their_own(database_url):
    config = settings(worker_count=2, max_attempts=2, retry_backoff_base=0.1, retry_backoff_jitter=0.0)

    async def scenario():
        async with running_engine(database_url, config):
            with psycopg.connect(database_url) as conn:
                default = enqueue(conn, f"{TRIGGERS}:always_fail")
                own = enqueue(conn, f"{TRIGGERS}:always_fail", max_attempts=3)
            await wait_final(database_url, [default, own], timeout=60)
            return default, own

    default, own = asyncio.run(scenario())
    assert row(database_url, default)["attempts"] == 2
    assert row(database_url, own)["attempts"] == 3


def test_scheduled_operation_runs_after_its_time_and_a_cancelled_one_never(database_url):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)):
            with psycopg.connect(database_url) as conn:
                enqueued_at = time.time()
                later = enqueue(conn, "started_at", delay=1.5)
                cancelled = enqueue(conn, "started_at", delay=1.0)
                conn.commit()
                assert lifecycle.cancel(conn, [cancelled]).cancelled == [cancelled]
            await wait_final(database_url, [later], timeout=30)
            await asyncio.sleep(0)  # the cancelled one is checked from the database below
            return enqueued_at, later, cancelled

    enqueued_at, later, cancelled = asyncio.run(scenario())
    ran = row(database_url, later)
    assert ran["result"]["started_at"] >= enqueued_at + 1.5 - 0.05
    gone = row(database_url, cancelled)
    assert gone["status"] == "CANCELLED" and gone["attempts"] == 0 and gone["last_worker"] is None


def test_a_completion_that_beats_its_cancel_stays_success(database_url):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)):
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, "sleep", {"seconds": 1.0})
            await wait_until(lambda: row(database_url, op_id)["status"] == "PROCESSING", 20, "it to run")
            with psycopg.connect(database_url) as conn:
                assert lifecycle.cancel(conn, [op_id]).requested == [op_id]
            await wait_until(lambda: row(database_url, op_id)["status"] in ("SUCCESS", "CANCELLED"), 30, "its end")
            return op_id

    op_id = asyncio.run(scenario())
    # Whether the worker heard the cancel or not, the row ends in exactly one final state.
    done = row(database_url, op_id)
    assert done["status"] in ("SUCCESS", "CANCELLED") and done["worker"] is None and done["finished"]
