"""What the dashboard reads, as SQL built apart from its execution.

The list is paged by keyset (``id < before``, newest first), so any page costs
one backward walk of the primary key however large the table is; only the
filters actually given become WHERE terms (a plan for exactly that query),
and every value is a bound parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from damops.lifecycle import stats
from damops.operations import FINAL_STATUSES, Status
from damops.ui.filters import OperationFilter, Page

# The list shows no inputs or results (they can be large) and the start of the error.
LIST_COLUMNS = sql.SQL(
    "id, pool, trigger_function, status, priority, attempts, max_attempts, worker, last_worker,"
    " left(error, 300) AS error, created, updated, run_after, started, finished, cancel_requested,"
    " progress_message, progress_fraction"
)


def filter_terms(f: OperationFilter) -> tuple[list[sql.Composable], dict[str, Any]]:
    terms: list[sql.Composable] = []
    params: dict[str, Any] = {}
    if f.statuses:
        terms.append(sql.SQL("status = ANY(%(statuses)s::text[])"))
        params["statuses"] = list(f.statuses)
    for column, name, value in (
        ("pool", "pool", f.pool),
        ("trigger_function", "trigger_function", f.trigger_function),
        ("id", "id", f.id),
    ):
        if value is not None:
            terms.append(sql.SQL("{} = %({})s").format(sql.Identifier(column), sql.SQL(name)))
            params[name] = value
    if f.since is not None:
        terms.append(sql.SQL("created >= %(since)s"))
        params["since"] = f.since
    if f.until is not None:
        terms.append(sql.SQL("created < %(until)s"))
        params["until"] = f.until
    if f.error is not None:
        # The same match as `damops retry --error`: a substring, any case.
        terms.append(sql.SQL("strpos(lower(coalesce(error, '')), lower(%(error)s)) > 0"))
        params["error"] = f.error
    return terms, params


def list_query(f: OperationFilter, page: Page) -> tuple[sql.Composed, dict[str, Any]]:
    terms, params = filter_terms(f)
    if page.before is not None:
        terms.append(sql.SQL("id < %(before)s"))
        params["before"] = page.before
    where = sql.SQL(" AND ").join(terms) if terms else sql.SQL("true")
    # One row more than the page: tells whether an older page exists.
    params["limit"] = page.limit + 1
    query = sql.SQL("SELECT {} FROM damops.operations WHERE {} ORDER BY id DESC LIMIT %(limit)s").format(
        LIST_COLUMNS, where
    )
    return query, params


@dataclass
class OperationsPage:
    rows: list[dict[str, Any]]
    older: int | None  # the `before` of the next (older) page, None on the last


def list_page(conn: psycopg.Connection, f: OperationFilter, page: Page) -> OperationsPage:
    query, params = list_query(f, page)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, params).fetchall()
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    return OperationsPage(rows, rows[-1]["id"] if more and rows else None)


# Finished operations per minute over the last hour: an index-only range of
# the index on (status, finished) when no pool is asked for. date_trunc on the
# timestamp, not arithmetic on its epoch: half the cost on 500,000 rows an hour.
THROUGHPUT_SQL = """
SELECT date_trunc('minute', finished) AS minute, status, count(*)
FROM damops.operations
WHERE status = ANY(%(final)s::text[]) AND finished >= %(since)s {pool}
GROUP BY 1, 2
"""


def throughput(conn: psycopg.Connection, pool: str | None, now: datetime | None = None) -> dict[str, list[int]]:
    """Per minute of the last hour (60 points, oldest first): succeeded, failed, cancelled."""
    now = now or datetime.now(UTC)
    last = int(now.timestamp()) // 60 * 60
    minutes = [last - 60 * i for i in range(59, -1, -1)]
    since = datetime.fromtimestamp(minutes[0], UTC)
    query = THROUGHPUT_SQL.format(pool="AND pool = %(pool)s" if pool is not None else "")
    rows = conn.execute(query, {"final": list(FINAL_STATUSES), "since": since, "pool": pool}).fetchall()
    counts = {(int(minute.timestamp()), status): int(n) for minute, status, n in rows}
    series: dict[str, list[int]] = {"minutes": minutes}
    for name, status in (("succeeded", "SUCCESS"), ("failed", "FAILED"), ("cancelled", "CANCELLED")):
        series[name] = [counts.get((minute, status), 0) for minute in minutes]
    return series


@dataclass
class PoolOverview:
    pool: str
    counts: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in Status})
    scheduled: int = 0
    oldest_waiting_seconds: float | None = None
    finished_last_hour: int = 0
    failed_last_hour: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "total": self.total}


def overview(conn: psycopg.Connection, pool: str | None = None) -> list[PoolOverview]:
    """Per pool: counts by status, scheduled for later, oldest waiting age, finished in the last hour."""
    pools: dict[str, PoolOverview] = {}
    for row in stats(conn, pool, window=3600.0):
        p = pools.setdefault(row.pool, PoolOverview(row.pool))
        p.counts[row.status] = row.count
        p.scheduled += row.scheduled
        p.finished_last_hour += row.finished_recently
        if row.status == "FAILED":
            p.failed_last_hour = row.finished_recently
        if row.oldest_waiting_seconds is not None:
            p.oldest_waiting_seconds = max(p.oldest_waiting_seconds or 0.0, row.oldest_waiting_seconds)
    return list(pools.values())


# Failed operations grouped by what went wrong (the first 200 characters of the error).
FAILED_GROUPS_SQL = """
SELECT pool, trigger_function, coalesce(left(error, 200), '') AS error, count(*) AS count,
       max(finished) AS last_failed, max(id) AS latest_id
FROM damops.operations
WHERE status = 'FAILED' AND (%(pool)s::text IS NULL OR pool = %(pool)s)
GROUP BY 1, 2, 3
ORDER BY count DESC, last_failed DESC NULLS LAST
LIMIT %(limit)s
"""


def failed_groups(conn: psycopg.Connection, pool: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(FAILED_GROUPS_SQL, {"pool": pool, "limit": limit}).fetchall()


# What the database knows of workers: those holding an operation now, and
# those that finished one in the last hour (free and pending ones it cannot see).
BUSY_WORKERS_SQL = """
SELECT pool, worker, id AS operation_id, trigger_function, started, updated,
       extract(epoch FROM now() - updated)::float8 AS last_touched_seconds_ago
FROM damops.operations WHERE status = 'PROCESSING'
ORDER BY pool, worker LIMIT 500
"""
# The newest finished operations of each final status (backward ranges of the
# index on (status, finished)): bounded, however busy the last hour was.
RECENT_WORKERS_SQL = """
SELECT pool, last_worker AS worker, count(*) AS finished, max(finished) AS last_finished,
       extract(epoch FROM now() - max(finished))::float8 AS last_touched_seconds_ago
FROM (
    (SELECT pool, last_worker, finished FROM damops.operations WHERE status = 'SUCCESS'
     ORDER BY status, finished DESC LIMIT %(sample)s)
    UNION ALL
    (SELECT pool, last_worker, finished FROM damops.operations WHERE status = 'FAILED'
     ORDER BY status, finished DESC LIMIT %(sample)s)
    UNION ALL
    (SELECT pool, last_worker, finished FROM damops.operations WHERE status = 'CANCELLED'
     ORDER BY status, finished DESC LIMIT %(sample)s)
) AS newest
WHERE last_worker IS NOT NULL AND finished >= now() - interval '1 hour'
GROUP BY 1, 2 ORDER BY last_finished DESC LIMIT 200
"""
RECENT_SAMPLE = 2000


def workers_from_database(conn: psycopg.Connection) -> dict[str, list[dict[str, Any]]]:
    with conn.cursor(row_factory=dict_row) as cur:
        busy = cur.execute(BUSY_WORKERS_SQL).fetchall()
        recent = cur.execute(RECENT_WORKERS_SQL, {"sample": RECENT_SAMPLE}).fetchall()
    return {"busy": busy, "recent": recent}


LAST_TICKS_SQL = "SELECT name, last_tick FROM damops.periodic"


def last_ticks(conn: psycopg.Connection) -> dict[str, datetime]:
    return dict(conn.execute(LAST_TICKS_SQL).fetchall())


def ago(seconds: float | None) -> str:
    """A short age for people: 42s, 3.5m, 2.0h, 1.2d."""
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def since(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return ""
    seconds = ((now or datetime.now(UTC)) - when) / timedelta(seconds=1)
    return f"in {ago(-seconds)}" if seconds < 0 else f"{ago(seconds)} ago"
