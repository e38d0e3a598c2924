"""The producer's API and read-only views of operations.

``enqueue`` takes the caller's own psycopg connection, so an operation can be
created in the same transaction as the application's own writes: it becomes
visible (and the schedulers are woken) only when that transaction commits.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from damops import tracing
from damops.config import pool_problem
from damops.protocol import json_problem

# PostgreSQL's integer column; a priority outside it could never be stored.
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
MAX_TRIGGER_NAME = 1000
MAX_UNIQUE_KEY = 1000


class Status(str, enum.Enum):
    NEW = "NEW"
    WAIT = "WAIT"
    PROCESSING = "PROCESSING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in (Status.SUCCESS, Status.FAILED, Status.CANCELLED)


FINAL_STATUSES = tuple(s.value for s in Status if s.final)


@dataclass
class OperationRow:
    id: int
    pool: str
    trigger_function: str
    inputs: Any
    status: str
    priority: int
    attempts: int
    max_attempts: int | None
    worker: str | None
    result: Any
    error: str | None
    created: datetime
    updated: datetime
    run_after: datetime | None = None
    unique_key: str | None = None
    cancel_requested: datetime | None = None
    started: datetime | None = None
    finished: datetime | None = None
    last_worker: str | None = None
    progress_message: str | None = None
    progress_fraction: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.__dict__.items()}


@dataclass
class AttemptRow:
    attempt: int
    worker: str | None
    outcome: str
    status: str
    error: str | None
    traceback: str | None
    started: datetime | None
    finished: datetime

    def as_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.__dict__.items()}


_COLUMNS = ", ".join(f.name for f in fields(OperationRow))


@dataclass(frozen=True)
class NewOperation:
    trigger_function: str
    inputs: Any = None
    pool: str = "default"
    priority: int = 0
    # None: the MAX_ATTEMPTS setting, read when the operation fails.
    max_attempts: int | None = None
    # Not claimed before this time (timezone-aware, or naive meaning UTC).
    run_after: datetime | None = None
    unique_key: str | None = None


def operation_problem(op: NewOperation) -> str | None:
    """None when ``op`` can be delivered; else one line naming what is wrong."""
    name = op.trigger_function
    if not isinstance(name, str) or not name.strip():
        return "trigger_function must be a non-empty name"
    if len(name) > MAX_TRIGGER_NAME or json_problem(name):
        return f"trigger function name {name[:40]!r}... is not a usable name"
    problem = pool_problem(op.pool)
    if problem:
        return problem
    if isinstance(op.priority, bool) or not isinstance(op.priority, int):
        return f"priority must be an integer, got {op.priority!r}"
    if not PRIORITY_MIN <= op.priority <= PRIORITY_MAX:
        return f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}, got {op.priority}"
    if op.max_attempts is not None and (
        isinstance(op.max_attempts, bool) or not isinstance(op.max_attempts, int) or not 1 <= op.max_attempts <= 1000
    ):
        return f"max_attempts must be between 1 and 1000, got {op.max_attempts!r}"
    if op.run_after is not None and not isinstance(op.run_after, datetime):
        return f"run_after must be a datetime, got {type(op.run_after).__name__}"
    if op.unique_key is not None and (
        not isinstance(op.unique_key, str) or not op.unique_key or len(op.unique_key) > MAX_UNIQUE_KEY
    ):
        return f"unique_key must be a non-empty string of at most {MAX_UNIQUE_KEY} characters"
    if op.unique_key is not None and json_problem(op.unique_key):
        return f"unique_key {json_problem(op.unique_key)}"
    problem = json_problem(op.inputs)
    if problem:
        return f"inputs of {name!r} cannot be delivered (not JSON-serializable): the value {problem}"
    return None


def _check(op: NewOperation) -> None:
    problem = operation_problem(op)
    if problem:
        raise ValueError(problem)


def _when(run_after: datetime | None, delay: timedelta | float | None) -> datetime | None:
    if run_after is not None and delay is not None:
        raise ValueError("give run_after or delay, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if seconds != seconds or seconds < 0:
            raise ValueError(f"delay must be a non-negative duration, got {delay!r}")
        return datetime.now(UTC) + timedelta(seconds=seconds)
    if run_after is not None and isinstance(run_after, datetime) and run_after.tzinfo is None:
        return run_after.replace(tzinfo=UTC)
    return run_after


def enqueue(
    conn: psycopg.Connection,
    trigger_function: str,
    inputs: Any = None,
    *,
    pool: str = "default",
    priority: int = 0,
    max_attempts: int | None = None,
    run_after: datetime | None = None,
    delay: timedelta | float | None = None,
    unique_key: str | None = None,
) -> int:
    """Insert one operation in ``conn``'s current transaction; return its id.

    ``run_after`` (or ``delay`` from now): not claimed before then. With
    ``unique_key``, while an operation with that key is not final, the existing
    operation's id is returned and nothing is inserted.
    """
    op = NewOperation(trigger_function, inputs, pool, priority, max_attempts, _when(run_after, delay), unique_key)
    return enqueue_many(conn, [op])[0]


# trace_context: the producer's span (damops.tracing), one for the whole call.
# The arrays travel in binary (as in damops.store): cheaper to dump and to parse.
INSERT_SQL = """
INSERT INTO damops.operations
    (trigger_function, inputs, pool, priority, max_attempts, run_after, unique_key, trace_context)
SELECT trigger_function, inputs, pool, priority, max_attempts, run_after, unique_key, %(trace_context)s::jsonb
FROM unnest(%(trigger_functions)b::text[], %(inputs)b::jsonb[], %(pools)b::text[], %(priorities)b::int[],
            %(max_attempts)b::int[], %(run_afters)b::timestamptz[], %(unique_keys)b::text[])
     WITH ORDINALITY AS u(trigger_function, inputs, pool, priority, max_attempts, run_after, unique_key, n)
ORDER BY n
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND status IN ('NEW', 'WAIT', 'PROCESSING') DO NOTHING
RETURNING id, unique_key
"""

# After a conflict: the operation that holds the key. Read in a new statement,
# so (READ COMMITTED) it sees the concurrent producer's committed row.
EXISTING_KEYS_SQL = """
SELECT unique_key, id FROM damops.operations
WHERE unique_key = ANY(%(keys)b::text[]) AND status IN ('NEW', 'WAIT', 'PROCESSING')
"""


def insert_params(ops: Sequence[NewOperation], trace_context: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "trace_context": Jsonb(trace_context) if trace_context else None,
        "trigger_functions": [op.trigger_function for op in ops],
        "inputs": [Jsonb(op.inputs) for op in ops],
        "pools": [op.pool for op in ops],
        "priorities": [op.priority for op in ops],
        "max_attempts": [op.max_attempts for op in ops],
        "run_afters": [op.run_after for op in ops],
        "unique_keys": [op.unique_key for op in ops],
    }


def enqueue_many(conn: psycopg.Connection, operations: Sequence[NewOperation] | Iterable[NewOperation]) -> list[int]:
    """Insert many operations with one statement; return their ids in order.

    Checks every operation before inserting any: one that can never be
    delivered raises ValueError naming the problem, and nothing is written.
    """
    ops = [op if not isinstance(op.run_after, datetime) or op.run_after.tzinfo else _with_utc(op) for op in operations]
    for op in ops:
        _check(op)
    if not ops:
        return []
    with tracing.enqueue_span(ops) as span:
        ids = _insert(conn, ops, span.trace_context if span is not None else None)
        if span is not None:
            span.enqueued(ids)
    return ids


def _insert(conn: psycopg.Connection, ops: list[NewOperation], trace_context: dict[str, str] | None) -> list[int]:
    ids: list[int | None] = [None] * len(ops)
    pending = list(range(len(ops)))
    # A key whose holder became final between our conflict and our read is
    # free again: insert those once more (rare; bounded by the producers' churn).
    for _ in range(10):
        batch = [ops[i] for i in pending]
        rows = conn.execute(INSERT_SQL, insert_params(batch, trace_context)).fetchall()
        by_key = {key: op_id for op_id, key in rows if key is not None}
        plain = iter(op_id for op_id, key in rows if key is None)
        missing_keys = []
        for i in pending:
            key = ops[i].unique_key
            if key is None:
                ids[i] = next(plain)
            elif key in by_key:
                ids[i] = by_key[key]
            else:
                missing_keys.append(key)
        if missing_keys:
            existing: dict[str, int] = dict(conn.execute(EXISTING_KEYS_SQL, {"keys": missing_keys}).fetchall())
            for i in pending:
                held = existing.get(ops[i].unique_key or "")
                if ids[i] is None and held is not None:
                    ids[i] = held
        pending = [i for i in pending if ids[i] is None]
        if not pending:
            return [op_id for op_id in ids if op_id is not None]
    raise RuntimeError("unique keys kept changing hands while enqueueing; try again")


def _with_utc(op: NewOperation) -> NewOperation:
    from dataclasses import replace

    assert op.run_after is not None
    return replace(op, run_after=op.run_after.replace(tzinfo=UTC))


def get(conn: psycopg.Connection, operation_id: int) -> OperationRow | None:
    with conn.cursor(row_factory=class_row(OperationRow)) as cur:
        return cur.execute(f"SELECT {_COLUMNS} FROM damops.operations WHERE id = %s", (operation_id,)).fetchone()


def attempts(conn: psycopg.Connection, operation_id: int) -> list[AttemptRow]:
    """The attempt history of one operation, oldest first (retries by hand included)."""
    with conn.cursor(row_factory=class_row(AttemptRow)) as cur:
        return cur.execute(
            "SELECT attempt, worker, outcome, status, error, traceback, started, finished"
            " FROM damops.attempts WHERE operation_id = %s ORDER BY id",
            (operation_id,),
        ).fetchall()


def list_operations(
    conn: psycopg.Connection, status: str | None = None, pool: str | None = None, limit: int = 50
) -> list[OperationRow]:
    with conn.cursor(row_factory=class_row(OperationRow)) as cur:
        return cur.execute(
            f"""
            SELECT {_COLUMNS} FROM damops.operations
            WHERE (%(status)s::text IS NULL OR status = %(status)s)
              AND (%(pool)s::text IS NULL OR pool = %(pool)s)
            ORDER BY id DESC LIMIT %(limit)s
            """,
            {"status": status, "pool": pool, "limit": limit},
        ).fetchall()


def count_by_status(conn: psycopg.Connection, pool: str | None = None) -> dict[str, int]:
    counts = {status.value: 0 for status in Status}
    rows = conn.execute(
        "SELECT status, count(*) FROM damops.operations WHERE (%(pool)s::text IS NULL OR pool = %(pool)s)"
        " GROUP BY status",
        {"pool": pool},
    ).fetchall()
    counts.update({status: count for status, count in rows})
    return counts


def count_queued(conn: psycopg.Connection, pool: str) -> int:
    """Operations of ``pool`` waiting for a worker (NEW or WAIT): the queue depth."""
    row = conn.execute(
        "SELECT count(*) FROM damops.operations WHERE pool = %s AND status IN ('NEW', 'WAIT')", (pool,)
    ).fetchone()
    return int(row[0]) if row else 0
