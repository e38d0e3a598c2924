"""The producer's API and read-only views of operations.

``enqueue`` takes the caller's own psycopg connection, so an operation can be
created in the same transaction as the application's own writes: it becomes
visible (and the schedulers are woken) only when that transaction commits.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb


class Status(str, enum.Enum):
    NEW = "NEW"
    WAIT = "WAIT"
    PROCESSING = "PROCESSING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"

    @property
    def final(self) -> bool:
        return self in (Status.SUCCESS, Status.FAILED)


@dataclass
class OperationRow:
    id: int
    pool: str
    trigger_function: str
    inputs: Any
    status: str
    priority: int
    attempts: int
    max_attempts: int
    worker: str | None
    result: Any
    error: str | None
    created: datetime
    updated: datetime

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["created"] = self.created.isoformat()
        data["updated"] = self.updated.isoformat()
        return data


@dataclass(frozen=True)
class NewOperation:
    trigger_function: str
    inputs: Any = None
    pool: str = "default"
    priority: int = 0
    max_attempts: int = 3


def _check(op: NewOperation) -> None:
    if not op.trigger_function or not op.trigger_function.strip():
        raise ValueError("trigger_function must be a non-empty name")
    if op.max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {op.max_attempts}")
    try:
        json.dumps(op.inputs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"inputs of {op.trigger_function!r} are not JSON-serializable: {exc}") from None


def enqueue(
    conn: psycopg.Connection,
    trigger_function: str,
    inputs: Any = None,
    *,
    pool: str = "default",
    priority: int = 0,
    max_attempts: int = 3,
) -> int:
    """Insert one operation in ``conn``'s current transaction; return its id."""
    return enqueue_many(conn, [NewOperation(trigger_function, inputs, pool, priority, max_attempts)])[0]


def enqueue_many(conn: psycopg.Connection, operations: Sequence[NewOperation] | Iterable[NewOperation]) -> list[int]:
    """Insert many operations with one statement; return their ids in order."""
    ops = list(operations)
    for op in ops:
        _check(op)
    if not ops:
        return []
    rows = conn.execute(
        """
        INSERT INTO damops.operations (trigger_function, inputs, pool, priority, max_attempts)
        SELECT * FROM unnest(%s::text[], %s::jsonb[], %s::text[], %s::int[], %s::int[])
        RETURNING id
        """,
        (
            [op.trigger_function for op in ops],
            [Jsonb(op.inputs) for op in ops],
            [op.pool for op in ops],
            [op.priority for op in ops],
            [op.max_attempts for op in ops],
        ),
    ).fetchall()
    return [row[0] for row in rows]


def get(conn: psycopg.Connection, operation_id: int) -> OperationRow | None:
    with conn.cursor(row_factory=class_row(OperationRow)) as cur:
        return cur.execute("SELECT * FROM damops.operations WHERE id = %s", (operation_id,)).fetchone()


def list_operations(
    conn: psycopg.Connection, status: str | None = None, pool: str | None = None, limit: int = 50
) -> list[OperationRow]:
    with conn.cursor(row_factory=class_row(OperationRow)) as cur:
        return cur.execute(
            """
            SELECT * FROM damops.operations
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
