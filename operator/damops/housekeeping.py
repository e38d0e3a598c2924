"""Housekeeping (seed: Expired operation, Default task).

Periodic jobs, all but the last run by one instance at a time (an advisory
lock taken per run; every scheduler may try):

* expired operations: PROCESSING for longer than MAX_OPERATION_PROCESSING_TIME
  go back to NEW while attempts remain (max_attempts NULL = MAX_ATTEMPTS), else
  FAILED saying they expired; one whose cancel was requested ends CANCELLED;
* failed-operations cleanup (``failureOperationHeartbeat``): every
  POLL_FAILED_OPERATIONS_INTERVAL, delete FAILED operations created more than
  FAILED_OPERATION_THRESHOLD_TIME_HOURS ago and those beyond the newest
  FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS, in bounded batches, logging each;
  then the same retention for SUCCESS and CANCELLED operations (by finish
  time, their own settings), summarised in one log line;
* periodic operations (DAMOPS_PERIODIC, see damops.periodic) on every run;
  one operation per tick is guaranteed by the database, not by the lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import psycopg

from damops import lifecycle, logs
from damops.config import Settings
from damops.db import HOUSEKEEPING_LOCK_KEY
from damops.periodic import Schedule, parse_schedules, run_periodic

log = logging.getLogger("damops.housekeeping")
cleanup_log = logging.getLogger("damops.housekeeping.failed_cleanup")

DELETE_BATCH = 1000

# The WHERE clause re-checks status and age: PostgreSQL re-evaluates it on a
# row that changed while we waited for its lock, so an operation that has just
# finished is never overwritten.
RECOVER_EXPIRED_SQL = """
WITH expired AS (
    UPDATE damops.operations AS o
    SET status = CASE
            WHEN o.cancel_requested IS NOT NULL THEN 'CANCELLED'
            WHEN o.attempts < coalesce(o.max_attempts, %(default_max_attempts)s) THEN 'NEW'
            ELSE 'FAILED' END,
        error = format('operation expired: PROCESSING for longer than MAX_OPERATION_PROCESSING_TIME (%%ss)'
                       ' on worker %%s, attempt %%s of %%s', %(limit)s, coalesce(o.worker, '?'), o.attempts,
                       coalesce(o.max_attempts, %(default_max_attempts)s)),
        finished = CASE WHEN o.cancel_requested IS NOT NULL
                          OR o.attempts >= coalesce(o.max_attempts, %(default_max_attempts)s) THEN now() END,
        run_after = NULL,
        worker = NULL,
        updated = now()
    FROM (SELECT id, worker FROM damops.operations
          WHERE status = 'PROCESSING' AND updated < now() - make_interval(secs => %(limit)s)
          ORDER BY id
          FOR UPDATE) AS before
    WHERE o.id = before.id AND o.status = 'PROCESSING' AND o.updated < now() - make_interval(secs => %(limit)s)
    RETURNING o.id, o.status, o.attempts, before.worker, o.error, o.started, o.trigger_function, o.pool
), history AS (
    INSERT INTO damops.attempts (operation_id, attempt, worker, outcome, status, error, started)
    SELECT id, attempts, worker, 'expired', status, error, started FROM expired
)
SELECT id, status, attempts, trigger_function, pool, worker FROM expired
"""

DELETE_OLD_FAILED_SQL = """
DELETE FROM damops.operations
WHERE id IN (
    SELECT id FROM damops.operations
    WHERE status = 'FAILED' AND created < now() - make_interval(secs => %(age)s)
    ORDER BY created, id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
) AND status = 'FAILED'
RETURNING id, trigger_function, created, attempts, error, pool
"""

DELETE_EXCESS_FAILED_SQL = """
DELETE FROM damops.operations
WHERE id IN (
    SELECT id FROM damops.operations
    WHERE status = 'FAILED'
    ORDER BY created DESC, id DESC
    OFFSET %(keep)s
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
) AND status = 'FAILED'
RETURNING id, trigger_function, created, attempts, error, pool
"""


@dataclass(frozen=True)
class CleanupResult:
    by_age: int
    by_count: int


def _try_lock(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (HOUSEKEEPING_LOCK_KEY,)).fetchone()
    return bool(row and row[0])


def _try_session_lock(conn: psycopg.Connection) -> bool:
    """For jobs that span many short transactions."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (HOUSEKEEPING_LOCK_KEY,)).fetchone()
    return bool(row and row[0])


def recover_expired_operations(
    conn: psycopg.Connection, max_processing_seconds: float, default_max_attempts: int = 3
) -> dict[int, str] | None:
    """One run; returns {id: new status}, or None when another instance holds the lock."""
    with conn.transaction():
        if not _try_lock(conn):
            return None
        rows = conn.execute(
            RECOVER_EXPIRED_SQL, {"limit": max_processing_seconds, "default_max_attempts": default_max_attempts}
        ).fetchall()
    for op_id, status, attempt, trigger_function, pool, worker in rows:
        log.warning(
            "expired operation %d recovered: now %s",
            op_id,
            status,
            extra=logs.fields(op_id, trigger_function, attempt, pool, worker),
        )
    return {row[0]: row[1] for row in rows}


def _delete_in_batches(conn: psycopg.Connection, sql: str, params: dict[str, object], reason: str) -> int:
    deleted = 0
    while True:
        with conn.transaction():  # one short transaction per batch: no long lock
            rows = conn.execute(sql, {**params, "batch": DELETE_BATCH}).fetchall()
        for op_id, trigger_function, created, attempts, error, pool in rows:
            cleanup_log.info(
                json.dumps(
                    {
                        "event": "failed_operation_deleted",
                        "reason": reason,
                        "id": op_id,
                        "trigger_function": trigger_function,
                        "created": created.isoformat(),
                        "attempts": attempts,
                        "error": error,
                    }
                ),
                extra=logs.fields(op_id, trigger_function, attempts, pool),
            )
        deleted += len(rows)
        if len(rows) < DELETE_BATCH:
            return deleted


def cleanup_failed_operations(
    conn: psycopg.Connection, threshold_hours: float, limit_records: int
) -> CleanupResult | None:
    """One run of the failed-operations cleanup; None when another instance holds the lock."""
    # A session lock: the cleanup spans many short transactions.
    if not _try_session_lock(conn):
        return None
    try:
        by_age = _delete_in_batches(
            conn,
            DELETE_OLD_FAILED_SQL,
            {"age": threshold_hours * 3600.0},
            "older than FAILED_OPERATION_THRESHOLD_TIME_HOURS",
        )
        by_count = _delete_in_batches(
            conn, DELETE_EXCESS_FAILED_SQL, {"keep": limit_records}, "beyond FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS"
        )
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (HOUSEKEEPING_LOCK_KEY,))
    if by_age or by_count:
        log.info("failed-operations cleanup deleted %d by age and %d by count", by_age, by_count)
    return CleanupResult(by_age, by_count)


@dataclass(frozen=True)
class RetentionResult:
    """Deleted per status: (by age, by count)."""

    deleted: dict[str, tuple[int, int]]


def retain_finished_operations(
    conn: psycopg.Connection, limits: dict[str, tuple[float, int]]
) -> RetentionResult | None:
    """Retention of SUCCESS and CANCELLED operations: ``limits`` maps a status to
    (threshold hours, records kept). None when another instance holds the lock."""
    if not _try_session_lock(conn):
        return None
    deleted: dict[str, tuple[int, int]] = {}
    try:
        for status, (hours, keep) in limits.items():
            by_age = lifecycle.purge(conn, [status], older_than=hours * 3600.0, batch=DELETE_BATCH)
            by_count = lifecycle.purge_excess(conn, status, keep, batch=DELETE_BATCH)
            deleted[status] = (by_age, by_count)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (HOUSEKEEPING_LOCK_KEY,))
    summary = ", ".join(f"{s} {a} by age and {c} by count" for s, (a, c) in deleted.items() if a or c)
    if summary:
        log.info("retention deleted %s", summary)
    return RetentionResult(deleted)


def retention_limits(settings: Settings) -> dict[str, tuple[float, int]]:
    return {
        "SUCCESS": (
            settings.success_operation_threshold_time_hours,
            settings.success_operation_threshold_limit_records,
        ),
        "CANCELLED": (
            settings.cancelled_operation_threshold_time_hours,
            settings.cancelled_operation_threshold_limit_records,
        ),
    }


class Housekeeper:
    """Runs both jobs on their intervals until stopped; survives database outages."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self._stop = asyncio.Event()
        self.last_cleanup: CleanupResult | None = None
        self.last_retention: RetentionResult | None = None
        self.schedules: list[Schedule] = parse_schedules(settings.periodic)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        next_cleanup = time.monotonic()  # failureOperationHeartbeat: first run at start-up
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self._recover)
                if self.schedules:
                    await asyncio.to_thread(self._periodic)
                if time.monotonic() >= next_cleanup:
                    self.last_cleanup = await asyncio.to_thread(self._cleanup)
                    self.last_retention = await asyncio.to_thread(self._retain)
                    next_cleanup = time.monotonic() + self.settings.poll_failed_operations_interval
            except (psycopg.Error, ValueError, RuntimeError) as exc:  # next run tries again
                log.warning("housekeeping skipped a run: %s", str(exc).strip().splitlines()[0] if str(exc) else exc)
            try:
                await asyncio.wait_for(self._stop.wait(), self.settings.housekeeping_interval)
            except TimeoutError:
                pass

    def _recover(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            recover_expired_operations(conn, self.settings.max_operation_processing_time, self.settings.max_attempts)

    def _periodic(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            run_periodic(conn, self.schedules)

    def _retain(self) -> RetentionResult | None:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            return retain_finished_operations(conn, retention_limits(self.settings))

    def _cleanup(self) -> CleanupResult | None:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            return cleanup_failed_operations(
                conn,
                self.settings.failed_operation_threshold_time_hours,
                self.settings.failed_operation_threshold_limit_records,
            )
