"""Cancel, retry, purge and stats: what an operator does to operations.

Every function takes a psycopg connection and works inside the caller's
transaction when there is one (each bounded batch is then a savepoint), so the
CLI, an application and the dashboard share one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from damops.operations import FINAL_STATUSES
from damops.store import CANCEL_NOTIFY_CHANNEL

BATCH = 1000
RETRYABLE_STATUSES = ("FAILED", "CANCELLED")

# A NEW or WAIT (or scheduled) operation is cancelled at once.
CANCEL_NOW_SQL = """
UPDATE damops.operations
SET status = 'CANCELLED', error = 'cancelled before it ran', run_after = NULL, finished = now(), updated = now()
WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('NEW', 'WAIT')
RETURNING id
"""

# A PROCESSING one gets a cancel request; its scheduler hears of it by NOTIFY
# (sent on commit) and tells the worker. The outcome is decided by COMPLETE_SQL.
REQUEST_CANCEL_SQL = f"""
WITH requested AS (
    UPDATE damops.operations SET cancel_requested = coalesce(cancel_requested, now())
    WHERE id = ANY(%(ids)s::bigint[]) AND status = 'PROCESSING'
    RETURNING id, pool
)
SELECT id, pg_notify('{CANCEL_NOTIFY_CHANNEL}', pool) IS NULL FROM requested
"""

# Taken first: a completion writing one of these rows is waited for, and the
# two statements after it (each with a new snapshot) see the row as it is
# then, and nobody can change it under them. In id order: no deadlock between cancellers.
LOCK_FOR_CANCEL_SQL = """
SELECT id, status FROM damops.operations WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id FOR UPDATE
"""

# The filter shared by retry (FAILED/CANCELLED) and purge (any final status).
# Time range and age go by when the operation finished.
_FILTER = """
    status = ANY(%(statuses)s::text[])
    AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
    AND (%(pool)s::text IS NULL OR pool = %(pool)s)
    AND (%(trigger_function)s::text IS NULL OR trigger_function = %(trigger_function)s)
    AND (%(since)s::timestamptz IS NULL OR finished >= %(since)s)
    AND (%(until)s::timestamptz IS NULL OR finished < %(until)s)
    AND (%(error)s::text IS NULL OR strpos(lower(coalesce(error, '')), lower(%(error)s)) > 0)
"""

# Back to NEW with a fresh set of attempts; the attempt history stays. An
# operation whose unique key is held by another unfinished one is left alone.
RETRY_SQL = f"""
UPDATE damops.operations AS o
SET status = 'NEW', attempts = 0, worker = NULL, error = NULL, result = NULL, run_after = NULL,
    cancel_requested = NULL, finished = NULL, progress_message = NULL, progress_fraction = NULL, updated = now()
WHERE o.id IN (
    SELECT c.id FROM damops.operations AS c
    WHERE {_FILTER}
      AND (c.unique_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM damops.operations AS x
          WHERE x.unique_key = c.unique_key AND x.status IN ('NEW', 'WAIT', 'PROCESSING')))
    ORDER BY c.id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
) AND o.status = ANY(%(statuses)s::text[])
RETURNING o.id, o.pool
"""

WAKE_SQL = "SELECT pg_notify('damops_operations', pool) IS NULL FROM unnest(%(pools)s::text[]) AS pool"

PURGE_SQL = f"""
DELETE FROM damops.operations
WHERE id IN (
    SELECT id FROM damops.operations
    WHERE {_FILTER}
      AND (%(age)s::float8 IS NULL OR finished < now() - make_interval(secs => %(age)s))
    ORDER BY finished, id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
) AND status = ANY(%(statuses)s::text[])
RETURNING id
"""

PURGE_COUNT_SQL = f"""
SELECT count(*) FROM damops.operations
WHERE {_FILTER}
  AND (%(age)s::float8 IS NULL OR finished < now() - make_interval(secs => %(age)s))
"""

# Beyond the newest `keep` of a status (retention by count).
PURGE_EXCESS_SQL = """
DELETE FROM damops.operations
WHERE id IN (
    SELECT id FROM damops.operations
    WHERE status = %(status)s
    ORDER BY finished DESC NULLS LAST, id DESC
    OFFSET %(keep)s
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
) AND status = %(status)s
RETURNING id
"""

STATS_SQL = """
SELECT pool, status, count(*) AS count,
       count(*) FILTER (WHERE status = 'NEW' AND run_after > now()) AS scheduled,
       extract(epoch FROM now() - min(
           CASE WHEN status = 'NEW' AND (run_after IS NULL OR run_after <= now()) THEN coalesce(run_after, created)
                WHEN status = 'WAIT' THEN updated END))::float8 AS oldest_waiting_seconds,
       count(*) FILTER (WHERE finished > now() - make_interval(secs => %(window)s)) AS finished_recently
FROM damops.operations
WHERE (%(pool)s::text IS NULL OR pool = %(pool)s)
GROUP BY pool, status
ORDER BY pool, status
"""


@dataclass
class CancelResult:
    cancelled: list[int] = field(default_factory=list)  # NEW/WAIT/scheduled: CANCELLED now
    requested: list[int] = field(default_factory=list)  # PROCESSING: their workers are told
    already_final: dict[int, str] = field(default_factory=dict)
    not_found: list[int] = field(default_factory=list)


def cancel(conn: psycopg.Connection, ids: Sequence[int]) -> CancelResult:
    """Cancel operations by id (see CANCEL_NOW_SQL and REQUEST_CANCEL_SQL)."""
    params = {"ids": list(ids)}
    result = CancelResult()
    with conn.transaction():
        found: dict[int, str] = dict(conn.execute(LOCK_FOR_CANCEL_SQL, params).fetchall())
        result.cancelled = sorted(r[0] for r in conn.execute(CANCEL_NOW_SQL, params))
        result.requested = sorted(r[0] for r in conn.execute(REQUEST_CANCEL_SQL, params))
    done = set(result.cancelled) | set(result.requested)
    result.already_final = {i: s for i, s in sorted(found.items()) if i not in done and s in FINAL_STATUSES}
    result.not_found = sorted(set(ids) - set(found))
    return result


def filter_params(
    *,
    statuses: Sequence[str],
    ids: Sequence[int] | None = None,
    pool: str | None = None,
    trigger_function: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "statuses": list(statuses),
        "ids": list(ids) if ids is not None else None,
        "pool": pool,
        "trigger_function": trigger_function,
        "since": since,
        "until": until,
        "error": error,
    }


def _check_statuses(statuses: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    upper = [s.upper() for s in statuses]
    bad = [s for s in upper if s not in allowed]
    if bad or not upper:
        raise ValueError(f"{what} works on {' or '.join(allowed)} operations, not {', '.join(bad) or 'none'}")
    return upper


def retry(
    conn: psycopg.Connection,
    ids: Sequence[int] | None = None,
    *,
    statuses: Sequence[str] = RETRYABLE_STATUSES,
    pool: str | None = None,
    trigger_function: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    error: str | None = None,
    batch: int = BATCH,
) -> list[int]:
    """FAILED or CANCELLED operations back to NEW (by id, or every one matching
    the filter), in batches of ``batch``; returns the ids retried."""
    params = filter_params(
        statuses=_check_statuses(statuses, RETRYABLE_STATUSES, "retry"),
        ids=ids,
        pool=pool,
        trigger_function=trigger_function,
        since=since,
        until=until,
        error=error,
    )
    retried: list[int] = []
    while True:
        with conn.transaction():  # one short transaction (or savepoint) per batch
            rows = conn.execute(RETRY_SQL, {**params, "batch": batch}).fetchall()
            if rows:
                conn.execute(WAKE_SQL, {"pools": sorted({pool for _, pool in rows})})
        retried.extend(op_id for op_id, _ in rows)
        if len(rows) < batch:
            return sorted(retried)


def purge_params(
    statuses: Sequence[str],
    older_than: float | None,
    pool: str | None,
    trigger_function: str | None,
    ids: Sequence[int] | None,
    batch: int,
) -> dict[str, Any]:
    return {
        **filter_params(
            statuses=_check_statuses(statuses, FINAL_STATUSES, "purge"),
            ids=ids,
            pool=pool,
            trigger_function=trigger_function,
        ),
        "age": older_than,
        "batch": batch,
    }


def count_purgeable(
    conn: psycopg.Connection,
    statuses: Sequence[str],
    *,
    older_than: float | None = None,
    pool: str | None = None,
    trigger_function: str | None = None,
) -> int:
    """How many operations :func:`purge` would delete (a dry run)."""
    row = conn.execute(PURGE_COUNT_SQL, purge_params(statuses, older_than, pool, trigger_function, None, 0)).fetchone()
    return int(row[0]) if row else 0


def purge(
    conn: psycopg.Connection,
    statuses: Sequence[str],
    *,
    older_than: float | None = None,
    pool: str | None = None,
    trigger_function: str | None = None,
    ids: Sequence[int] | None = None,
    batch: int = BATCH,
) -> int:
    """Delete final operations (and their history) finished more than
    ``older_than`` seconds ago, in batches; returns how many."""
    params = purge_params(statuses, older_than, pool, trigger_function, ids, batch)
    deleted = 0
    while True:
        with conn.transaction():
            count = len(conn.execute(PURGE_SQL, params).fetchall())
        deleted += count
        if count < batch:
            return deleted


def purge_excess(conn: psycopg.Connection, status: str, keep: int, batch: int = BATCH) -> int:
    """Delete operations of ``status`` beyond the newest ``keep``, in batches."""
    deleted = 0
    while True:
        with conn.transaction():
            count = len(conn.execute(PURGE_EXCESS_SQL, {"status": status, "keep": keep, "batch": batch}).fetchall())
        deleted += count
        if count < batch:
            return deleted


@dataclass(frozen=True)
class PoolStats:
    pool: str
    status: str
    count: int
    scheduled: int
    oldest_waiting_seconds: float | None
    finished_recently: int


def stats(conn: psycopg.Connection, pool: str | None = None, window: float = 300.0) -> list[PoolStats]:
    """Per pool and status: counts, scheduled for later, oldest waiting age, and
    how many finished in the last ``window`` seconds (the recent throughput)."""
    rows = conn.execute(STATS_SQL, {"pool": pool, "window": window}).fetchall()
    return [PoolStats(*row) for row in rows]
