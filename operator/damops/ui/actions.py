"""The dashboard's actions, on the same lifecycle functions as the CLI.

Each returns an Outcome: the HTTP status it deserves and one line saying
what happened, shared by the pages and the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from damops import lifecycle
from damops.config import parse_duration
from damops.operations import FINAL_STATUSES, get
from damops.ui.filters import BadRequest, OperationFilter, parse_statuses

MAX_AGE = 100 * 365 * 86400.0


@dataclass
class Outcome:
    status: int  # HTTP status: 200 done, 404 no such operation, 409 not in a state for it
    message: str
    ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.status == 200, "message": self.message, "ids": self.ids}


def retry_one(conn: psycopg.Connection, op_id: int) -> Outcome:
    retried = lifecycle.retry(conn, [op_id])
    if retried:
        return Outcome(200, f"operation {op_id} is back to NEW", retried)
    row = get(conn, op_id)
    if row is None:
        return Outcome(404, f"no operation with id {op_id}")
    if row.status not in lifecycle.RETRYABLE_STATUSES:
        return Outcome(409, f"operation {op_id} is {row.status}: only FAILED or CANCELLED operations can be retried")
    return Outcome(409, f"operation {op_id} not retried: another unfinished operation holds its unique key")


def cancel_one(conn: psycopg.Connection, op_id: int) -> Outcome:
    result = lifecycle.cancel(conn, [op_id])
    if result.cancelled:
        return Outcome(200, f"operation {op_id} cancelled", result.cancelled)
    if result.requested:
        return Outcome(200, f"operation {op_id} is running: its worker is told to stop", result.requested)
    if result.not_found:
        return Outcome(404, f"no operation with id {op_id}")
    status = result.already_final.get(op_id, "final")
    return Outcome(409, f"operation {op_id} is already {status}: nothing to cancel")


def bulk_retry(conn: psycopg.Connection, f: OperationFilter) -> Outcome:
    """Every FAILED or CANCELLED operation matching the filter's statuses, pool,
    trigger function and error text (the list's time range is by creation,
    retry's by finish: it is not applied)."""
    statuses = [s for s in f.statuses if s in lifecycle.RETRYABLE_STATUSES] if f.statuses else None
    if f.statuses and not statuses:
        raise BadRequest("retry works on FAILED or CANCELLED operations: the filter has neither")
    retried = lifecycle.retry(
        conn,
        [f.id] if f.id else None,
        statuses=statuses or lifecycle.RETRYABLE_STATUSES,
        pool=f.pool,
        trigger_function=f.trigger_function,
        error=f.error,
    )
    return Outcome(200, f"{len(retried)} operation(s) back to NEW", retried)


def purge_params(params: Mapping[str, Any]) -> tuple[list[str], float, str | None]:
    statuses = list(parse_statuses(str(params.get("status") or "")))
    if len(statuses) != 1 or statuses[0] not in FINAL_STATUSES:
        raise BadRequest(f"purge needs one status of {', '.join(FINAL_STATUSES)}")
    try:
        older_than = parse_duration(str(params.get("older_than") or ""))
    except ValueError as exc:
        raise BadRequest(f"older_than: {exc}") from None
    if older_than > MAX_AGE:
        raise BadRequest("older_than must be at most 100 years")
    pool = str(params.get("pool") or "").strip() or None
    return statuses, older_than, pool


def purge(conn: psycopg.Connection, params: Mapping[str, Any]) -> Outcome:
    statuses, older_than, pool = purge_params(params)
    deleted = lifecycle.purge(conn, statuses, older_than=older_than, pool=pool)
    return Outcome(200, f"deleted {deleted} {statuses[0]} operation(s)")
