"""Seed glossary: Expired operation, Expired worker, Wait operation, failed-operations cleanup."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import psycopg

from damops import store
from damops.housekeeping import cleanup_failed_operations, recover_expired_operations
from damops.operations import enqueue
from tests.support import blocking
from tests.support.engine import (
    enqueue_in_thread,
    fetch_row,
    row,
    running_engine,
    settings,
    wait_final,
    wait_until,
    wait_until_db,
)


def _set(conn, op_id, **columns):
    assignments = ", ".join(f"{name} = %({name})s" for name in columns)
    conn.execute(f"UPDATE damops.operations SET {assignments} WHERE id = %(id)s", {**columns, "id": op_id})


def _age(conn, op_id, column, seconds):
    conn.execute(
        f"UPDATE damops.operations SET {column} = now() - make_interval(secs => %s) WHERE id = %s", (seconds, op_id)
    )


def test_expired_operation_goes_back_to_new_then_fails_when_attempts_are_used_up(conn):
    retry = enqueue(conn, "noop", max_attempts=3)
    last = enqueue(conn, "noop", max_attempts=2)
    fresh = enqueue(conn, "noop")
    for op_id, attempts in ((retry, 1), (last, 2), (fresh, 1)):
        _set(conn, op_id, status="PROCESSING", attempts=attempts, worker="w-gone")
    _age(conn, retry, "updated", 120)
    _age(conn, last, "updated", 120)

    changed = recover_expired_operations(conn, max_processing_seconds=60)

    assert changed == {retry: "NEW", last: "FAILED"}
    assert row_of(conn, retry)["status"] == "NEW" and row_of(conn, retry)["worker"] is None
    failed = row_of(conn, last)
    assert failed["status"] == "FAILED"
    assert "operation expired" in failed["error"] and "MAX_OPERATION_PROCESSING_TIME" in failed["error"]
    assert row_of(conn, fresh)["status"] == "PROCESSING"  # not old enough


def test_expiry_never_overwrites_an_operation_that_just_finished(conn):
    done = enqueue(conn, "noop")
    _set(conn, done, status="SUCCESS", attempts=1)
    _age(conn, done, "updated", 3600)
    assert recover_expired_operations(conn, max_processing_seconds=60) == {}
    assert row_of(conn, done)["status"] == "SUCCESS"


def test_expiry_waits_for_a_concurrent_finish_and_then_leaves_it_alone(database_url, conn):
    op_id = enqueue(conn, "noop")
    _set(conn, op_id, status="PROCESSING", attempts=1, worker="w1")
    _age(conn, op_id, "updated", 120)
    with psycopg.connect(database_url) as finisher:
        # The StatusUpdate holds the row lock when housekeeping arrives...
        finisher.execute("UPDATE damops.operations SET status = 'SUCCESS', updated = now() WHERE id = %s", (op_id,))
        finisher_pid = finisher.info.backend_pid

        async def race():
            pending = asyncio.create_task(asyncio.to_thread(_recover_in_new_connection, database_url))

            async def blocked():
                return pending.done() or await asyncio.to_thread(_sessions_blocked_by, database_url, finisher_pid)

            await wait_until(blocked, 30, "housekeeping to wait for the finisher's row lock")
            assert not pending.done()  # it waits on the lock, it did not skip the row
            finisher.commit()
            return await pending

        result = asyncio.run(race())
    # ...and re-checks status and age after the lock is released.
    assert result == {}
    assert row_of(conn, op_id)["status"] == "SUCCESS"


def _sessions_blocked_by(database_url, pid):
    with psycopg.connect(database_url, autocommit=True) as observer:
        return observer.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)
        ).fetchone()[0]


def _recover_in_new_connection(database_url):
    with psycopg.connect(database_url, autocommit=True) as other:
        return recover_expired_operations(other, max_processing_seconds=60)


def row_of(conn, op_id):
    cur = conn.execute("SELECT * FROM damops.operations WHERE id = %s", (op_id,))
    return dict(zip([d.name for d in cur.description], cur.fetchone()))


def test_expired_operation_recovered_by_the_running_engine(database_url):
    async def scenario():
        # 3 s, not 1 s: the recovered run itself must not expire on a loaded machine.
        config = settings(max_operation_processing_time=3.0, worker_count=1)
        async with running_engine(database_url, config):
            with psycopg.connect(database_url, autocommit=True) as conn:
                # An operation a crashed scheduler left PROCESSING.
                op_id = enqueue(conn, "noop")
                _set(conn, op_id, status="PROCESSING", attempts=1, worker="crashed-scheduler-w1")
                _age(conn, op_id, "updated", 10)
            await wait_final(database_url, [op_id], timeout=20)
            return op_id

    op_id = asyncio.run(scenario())
    recovered = row(database_url, op_id)
    assert recovered["status"] == "SUCCESS" and recovered["attempts"] == 2


def test_expired_worker_is_killed_and_replaced_and_its_operation_recovered(database_url, tmp_path):
    async def scenario():
        config = settings(worker_count=1, max_worker_active_time=1.5)
        async with running_engine(database_url, config) as engine:
            first_pid = engine.worker_pids().pop()
            started = tmp_path / "started"
            started.mkdir()
            # Never released and no progress: the worker expires while holding it.
            op_id = await enqueue_in_thread(
                database_url,
                "tests.support.blocking:hold",
                {"started_dir": str(started), "release": str(tmp_path / "never")},
                max_attempts=1,
            )
            # The started file appears with the pid in it (written atomically).
            running = await wait_until(lambda: blocking.started_pids(started), 20, "the held operation to start")
            assert running == {op_id: first_pid}
            await wait_final(database_url, [op_id], timeout=30)
            # A new worker process replaced the killed one, and it is free again.
            await wait_until(lambda: engine.scheduler.snapshot().free == 1, 30, "the replacement worker")
            assert engine.worker_pids() != {first_pid}
            assert engine.scheduler.stats.expired_workers == 1
            follow_up = await enqueue_in_thread(database_url, "tests.support.triggers:pid")
            await wait_final(database_url, [follow_up])
            return op_id, first_pid, follow_up

    op_id, first_pid, follow_up = asyncio.run(scenario())
    expired = row(database_url, op_id)
    assert expired["status"] == "FAILED"
    assert "expired" in expired["error"] and "MAX_WORKER_ACTIVE_TIME" in expired["error"]
    assert row(database_url, follow_up)["result"]["pid"] != first_pid


def test_wait_operation_is_not_claimed_before_the_wait_interval(conn):
    waiting = enqueue(conn, "noop")
    _set(conn, waiting, status="WAIT")

    async def claim():
        async with await psycopg.AsyncConnection.connect(conn.info.dsn, autocommit=True) as aconn:
            cur = await aconn.execute(store.CLAIM_SQL, store.claim_params("default", ["w1"], wait_interval=60))
            return [store.lease_from_claim(row) for row in await cur.fetchall()]

    assert asyncio.run(claim()) == []  # WAIT for 0 s of a 60 s interval: not claimable
    _age(conn, waiting, "updated", 61)
    claimed = asyncio.run(claim())
    assert [c.id for c in claimed] == [waiting]
    assert row_of(conn, waiting)["status"] == "PROCESSING"


def test_wait_operation_runs_again_after_operation_wait_interval(database_url, tmp_path):
    interval = 1.0
    runs = tmp_path / "runs"

    async def scenario():
        config = settings(worker_count=1, operation_wait_interval=interval)
        async with running_engine(database_url, config):
            not_before = time.time() + 1.5
            # wait_once WAITs on its first run whatever the timing, and records when each run started.
            once = await enqueue_in_thread(database_url, "tests.support.blocking:wait_once", {"runs": str(runs)})
            example = await enqueue_in_thread(database_url, "wait_until", {"not_before": not_before}, max_attempts=1)
            await wait_final(database_url, [once, example], timeout=20)
            return once, example, not_before

    once, example, not_before = asyncio.run(scenario())
    ran = [float(line) for line in runs.read_text().split()]
    assert len(ran) == 2  # one WAIT, then the run that succeeded
    # The second run started no sooner than OPERATION_WAIT_INTERVAL after the
    # first one asked to wait (same clock; 50 ms for its resolution).
    assert ran[1] - ran[0] >= interval - 0.05, ran
    done = row(database_url, once)
    assert done["status"] == "SUCCESS" and done["result"]["ran_at"] == ran[1]
    assert done["attempts"] == 1  # waiting used no attempt
    example_done = row(database_url, example)
    assert example_done["status"] == "SUCCESS"
    assert example_done["result"]["ran_at"] >= not_before
    # Waiting used no attempt even though max_attempts is 1.
    assert example_done["attempts"] == 1


def _failed(conn, count, hours_old):
    ids = [enqueue(conn, "fail") for _ in range(count)]
    conn.execute(
        "UPDATE damops.operations SET status = 'FAILED', attempts = 3, error = 'RuntimeError: x',"
        " created = now() - make_interval(hours => %s) WHERE id = ANY(%s)",
        (hours_old, ids),
    )
    return ids


def test_failed_cleanup_by_age_logs_every_deleted_operation(conn, caplog):
    old = _failed(conn, 3, hours_old=25)
    recent = _failed(conn, 2, hours_old=1)
    succeeded = enqueue(conn, "noop")
    conn.execute(
        "UPDATE damops.operations SET status = 'SUCCESS', created = now() - interval '48 hours' WHERE id = %s",
        (succeeded,),
    )
    with caplog.at_level(logging.INFO, logger="damops.housekeeping.failed_cleanup"):
        result = cleanup_failed_operations(conn, threshold_hours=24, limit_records=20000)

    assert (result.by_age, result.by_count) == (3, 0)
    remaining = {r[0] for r in conn.execute("SELECT id FROM damops.operations")}
    assert remaining == set(recent) | {succeeded}
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "damops.housekeeping.failed_cleanup"]
    assert sorted(entry["id"] for entry in logged) == sorted(old)
    for entry in logged:
        assert entry["event"] == "failed_operation_deleted"
        assert entry["trigger_function"] == "fail" and entry["attempts"] == 3
        assert entry["error"] == "RuntimeError: x" and entry["created"]
        assert "FAILED_OPERATION_THRESHOLD_TIME_HOURS" in entry["reason"]


def test_failed_cleanup_by_count_keeps_the_newest(conn, caplog):
    older = _failed(conn, 5, hours_old=3)
    newer = _failed(conn, 4, hours_old=1)
    with caplog.at_level(logging.INFO, logger="damops.housekeeping.failed_cleanup"):
        result = cleanup_failed_operations(conn, threshold_hours=24, limit_records=4)
    assert (result.by_age, result.by_count) == (0, 5)
    remaining = {r[0] for r in conn.execute("SELECT id FROM damops.operations")}
    assert remaining == set(newer)
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "damops.housekeeping.failed_cleanup"]
    assert sorted(e["id"] for e in logged) == sorted(older)
    assert all("FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS" in e["reason"] for e in logged)


class _DeleteRecorder(psycopg.Cursor):
    """Records, for each DELETE on the operations table, how many rows it
    deleted and in which transaction (its xid)."""

    deletes: list[tuple[int, int]]

    def execute(self, query, params=None, **kwargs):
        result = super().execute(query, params, **kwargs)
        if isinstance(query, str) and query.lstrip().startswith("DELETE FROM damops.operations"):
            # A plain cursor: the xid query itself is not recorded.
            xid = psycopg.Cursor(self.connection).execute("SELECT pg_current_xact_id()::text").fetchone()[0]
            self.connection.deletes.append((self.rowcount, int(xid)))
        return result


def test_failed_cleanup_deletes_a_large_backlog_in_bounded_batches(database_url):
    from damops import housekeeping

    batch = housekeeping.DELETE_BATCH
    total = 2 * batch + batch // 2
    with psycopg.connect(database_url, autocommit=True, cursor_factory=_DeleteRecorder) as recorded:
        recorded.deletes = []
        recorded.execute(
            "INSERT INTO damops.operations (trigger_function, status, created, error)"
            " SELECT 'fail', 'FAILED', now() - interval '2 days', 'x' FROM generate_series(1, %s)",
            (total,),
        )
        result = cleanup_failed_operations(recorded, threshold_hours=24, limit_records=20000)
        remaining = recorded.execute("SELECT count(*) FROM damops.operations").fetchone()[0]
    assert result.by_age == total
    assert remaining == 0
    sizes = [deleted for deleted, _ in recorded.deletes if deleted]
    assert sizes == [batch, batch, batch // 2], recorded.deletes  # counted, not assumed
    assert all(deleted <= batch for deleted, _ in recorded.deletes)
    # Each batch committed on its own: one transaction (xid) per DELETE.
    xids = [xid for _, xid in recorded.deletes]
    assert len(set(xids)) == len(xids), recorded.deletes


def test_only_one_instance_runs_housekeeping_at_a_time(database_url, conn):
    from damops.db import HOUSEKEEPING_LOCK_KEY

    op_id = enqueue(conn, "noop")
    _set(conn, op_id, status="PROCESSING", attempts=1, worker="w")
    _age(conn, op_id, "updated", 120)
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (HOUSEKEEPING_LOCK_KEY,))
        assert recover_expired_operations(conn, 60) is None
        assert cleanup_failed_operations(conn, 24, 20000) is None
        assert row_of(conn, op_id)["status"] == "PROCESSING"
        # released here, synchronously: a closed connection's backend lets go of it only some time later
        holder.execute("SELECT pg_advisory_unlock(%s)", (HOUSEKEEPING_LOCK_KEY,))
    assert recover_expired_operations(conn, 60) == {op_id: "NEW"}


def test_progress_keeps_a_long_operation_and_its_worker_from_expiring(database_url, tmp_path):
    limit = 2.0  # both expiry limits; progress comes every 0.2 s, touches reach the database every heartbeat

    async def scenario():
        config = settings(worker_count=1, max_worker_active_time=limit, max_operation_processing_time=limit)
        async with running_engine(database_url, config) as engine:
            pids = engine.worker_pids()
            started, release = tmp_path / "started", tmp_path / "release"
            started.mkdir()
            op_id = await enqueue_in_thread(
                database_url,
                "tests.support.blocking:hold",
                {"started_dir": str(started), "release": str(release), "progress": True},
                max_attempts=1,
            )
            await wait_until(lambda: blocking.started_pids(started), 20, "the operation to start")
            began = time.monotonic()
            await wait_until(lambda: time.monotonic() - began > 2.5 * limit, 30, "the operation to outlive both limits")
            # Proof that housekeeping looked while it was that old: an operation
            # left PROCESSING by a dead worker gets expired by the same pass.
            control = await asyncio.to_thread(_abandoned_operation, database_url, 2 * limit)
            await wait_until_db(
                lambda: row(database_url, control)["status"] == "FAILED", 30, "housekeeping to expire the control"
            )
            assert (await fetch_row(database_url, op_id))["status"] == "PROCESSING"
            blocking.release(release)
            await wait_final(database_url, [op_id], timeout=30)
            assert engine.scheduler.stats.expired_workers == 0
            assert engine.worker_pids() == pids
            return op_id

    done = row(database_url, asyncio.run(scenario()))
    assert done["status"] == "SUCCESS" and done["attempts"] == 1
    assert done["result"]["steps"] >= 10


def _abandoned_operation(database_url, age_seconds):
    with psycopg.connect(database_url, autocommit=True) as conn:
        op_id = enqueue(conn, "noop", max_attempts=1)
        _set(conn, op_id, status="PROCESSING", attempts=1, worker="dead-worker")
        _age(conn, op_id, "updated", age_seconds)
        return op_id
