"""Housekeeping (seed: Expired operation, Default task).

Two periodic jobs, each run by one instance at a time (an advisory lock taken
per run; every scheduler may try):

* expired operations: PROCESSING for longer than MAX_OPERATION_PROCESSING_TIME
  go back to NEW while attempts remain, else FAILED saying they expired;
* failed-operations cleanup (``failureOperationHeartbeat``): every
  POLL_FAILED_OPERATIONS_INTERVAL, delete FAILED operations created more than
  FAILED_OPERATION_THRESHOLD_TIME_HOURS ago and those beyond the newest
  FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS, in bounded batches, logging each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import psycopg

from damops.config import Settings
from damops.db import HOUSEKEEPING_LOCK_KEY

log = logging.getLogger("damops.housekeeping")
cleanup_log = logging.getLogger("damops.housekeeping.failed_cleanup")

DELETE_BATCH = 1000

# The WHERE clause re-checks status and age: PostgreSQL re-evaluates it on a
# row that changed while we waited for its lock, so an operation that has just
# finished is never overwritten.
RECOVER_EXPIRED_SQL = """
UPDATE damops.operations
SET status = CASE WHEN attempts < max_attempts THEN 'NEW' ELSE 'FAILED' END,
    error = format('operation expired: PROCESSING for longer than MAX_OPERATION_PROCESSING_TIME (%%ss)'
                   ' on worker %%s, attempt %%s of %%s', %(limit)s, coalesce(worker, '?'), attempts, max_attempts),
    worker = NULL,
    updated = now()
WHERE status = 'PROCESSING' AND updated < now() - make_interval(secs => %(limit)s)
RETURNING id, status
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
RETURNING id, trigger_function, created, attempts, error
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
RETURNING id, trigger_function, created, attempts, error
"""


@dataclass(frozen=True)
class CleanupResult:
    by_age: int
    by_count: int


def _try_lock(conn: psycopg.Connection) -> bool:
    return bool(conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (HOUSEKEEPING_LOCK_KEY,)).fetchone()[0])


def recover_expired_operations(conn: psycopg.Connection, max_processing_seconds: float) -> dict[int, str] | None:
    """One run; returns {id: new status}, or None when another instance holds the lock."""
    with conn.transaction():
        if not _try_lock(conn):
            return None
        rows = conn.execute(RECOVER_EXPIRED_SQL, {"limit": max_processing_seconds}).fetchall()
    for op_id, status in rows:
        log.warning("expired operation %d recovered: now %s", op_id, status)
    return dict(rows)


def _delete_in_batches(conn: psycopg.Connection, sql: str, params: dict[str, object], reason: str) -> int:
    deleted = 0
    while True:
        with conn.transaction():  # one short transaction per batch: no long lock
            rows = conn.execute(sql, {**params, "batch": DELETE_BATCH}).fetchall()
        for op_id, trigger_function, created, attempts, error in rows:
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
                )
            )
        deleted += len(rows)
        if len(rows) < DELETE_BATCH:
            return deleted


def cleanup_failed_operations(
    conn: psycopg.Connection, threshold_hours: float, limit_records: int
) -> CleanupResult | None:
    """One run of the failed-operations cleanup; None when another instance holds the lock."""
    # A session lock: the cleanup spans many short transactions.
    if not conn.execute("SELECT pg_try_advisory_lock(%s)", (HOUSEKEEPING_LOCK_KEY,)).fetchone()[0]:
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


class Housekeeper:
    """Runs both jobs on their intervals until stopped; survives database outages."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self._stop = asyncio.Event()
        self.last_cleanup: CleanupResult | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        next_cleanup = time.monotonic()  # failureOperationHeartbeat: first run at start-up
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self._recover)
                if time.monotonic() >= next_cleanup:
                    self.last_cleanup = await asyncio.to_thread(self._cleanup)
                    next_cleanup = time.monotonic() + self.settings.poll_failed_operations_interval
            except psycopg.Error as exc:
                log.warning("housekeeping skipped a run: %s", str(exc).strip().splitlines()[0] if str(exc) else exc)
            try:
                await asyncio.wait_for(self._stop.wait(), self.settings.housekeeping_interval)
            except TimeoutError:
                pass

    def _recover(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            recover_expired_operations(conn, self.settings.max_operation_processing_time)

    def _cleanup(self) -> CleanupResult | None:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            return cleanup_failed_operations(
                conn,
                self.settings.failed_operation_threshold_time_hours,
                self.settings.failed_operation_threshold_limit_records,
            )
