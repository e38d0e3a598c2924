"""The scheduler's statements: claim, complete, touch, give back, cancel requests, and its connection's planner settings.

Each is one statement however many operations it covers. Every statement that
changes a PROCESSING row checks that the row is still held by the same worker
for the same attempt, so a late or duplicate StatusUpdate can never overwrite
a newer state (a retry, a cancel, a recovery).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from damops.backoff import DEFAULT_POLICY, RetryPolicy, retry_delay
from damops.dispatch import Completion, Lease

# Array parameters are sent in binary (%(name)b): psycopg's text array dumper
# quotes and escapes element by element, 2-3x the cost of dumping a cycle's
# parameters. Binary arrays refuse lists that mix int and float.
#
# The scheduler runs these statements as generic plans (PLANNER_SETTINGS below),
# planned once for any parameters. A statement that looks rows up by id and then
# checks they are still PROCESSING writes that check as `o.status || '' =
# 'PROCESSING'`: written plainly, it lets the planner read
# operations_processing_idx instead, whose statistics (taken when few rows were
# PROCESSING) make it look like one row, and with hundreds PROCESSING the generic
# plan scanned them all once per StatusUpdate. The `|| ''` leaves only the
# primary key to look the ids up.

# The scheduler's connection plans each statement once, for any parameters.
# PostgreSQL's default (plan_cache_mode auto) re-plans a prepared statement on
# every execution while its generic plan's estimate loses to the custom ones, as
# the cycle's does once a backlog of NEW rows was analyzed: ~0.5 ms of server CPU
# per cycle, half of PostgreSQL's CPU in a cycle of a few operations. A generic
# plan is kept until the next ANALYZE, so one made while the table was empty must
# not read it sequentially: with seq scans off every statement here reads only
# index ranges, whatever the table holds by then.
PLANNER_SETTINGS = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}
SET_PLANNER_SETTINGS_SQL = """
SELECT set_config(name, value, %(local)s) FROM unnest(%(names)s::text[], %(values)s::text[]) AS s(name, value)
"""


def planner_settings_params(settings: Mapping[str, str] = PLANNER_SETTINGS, *, local: bool = False) -> dict[str, Any]:
    """SET_PLANNER_SETTINGS_SQL's parameters: for the session, or (``local``) the transaction."""
    return {"names": list(settings), "values": list(settings.values()), "local": local}


# Bounds on what one attempt may leave in the database.
MAX_TRACEBACK_CHARS = 16_000
MAX_ERROR_CHARS = 8_000
MAX_PROGRESS_MESSAGE_CHARS = 1_000

# Two index ranges (see migration 0002): operations ready now in (priority, id)
# order, and delayed ones (scheduled, or a retry's backoff) whose run_after has
# passed. Each range locks at most `limit` rows with SKIP LOCKED; the outer
# query keeps the best `limit` of both. Rows scheduled for later are never read.
CLAIM_SQL = """
UPDATE damops.operations AS o
SET status = 'PROCESSING', updated = now(), started = now(), attempts = o.attempts + 1,
    worker = w.name, last_worker = w.name, run_after = NULL, progress_message = NULL, progress_fraction = NULL
FROM (
    SELECT id, row_number() OVER (ORDER BY priority, id) AS slot
    FROM (
        SELECT id, priority FROM (
            SELECT * FROM (
                SELECT id, priority FROM damops.operations
                WHERE pool = %(pool)s AND run_after IS NULL
                  AND (status = 'NEW'
                       OR (status = 'WAIT' AND updated < now() - make_interval(secs => %(wait_interval)s)))
                ORDER BY priority, id
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            ) AS ready
            UNION ALL
            SELECT * FROM (
                SELECT id, priority FROM damops.operations
                WHERE pool = %(pool)s AND status = 'NEW' AND run_after IS NOT NULL AND run_after <= now()
                ORDER BY run_after
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            ) AS due
        ) AS candidates
        ORDER BY priority, id
        LIMIT %(limit)s
    ) AS locked
) AS claimed
JOIN unnest(%(free_workers)b::text[]) WITH ORDINALITY AS w(name, slot) USING (slot)
WHERE o.id = claimed.id
RETURNING o.id, o.trigger_function, o.inputs, o.attempts, o.worker, o.trace_context
"""

# The outcome, decided once per row (`decided`, which also locks it), then
# written to the operation and to its attempt history in the same statement.
# - a cancel was requested: success still wins (it finished first), anything
#   else ends CANCELLED;
# - a retryable failure goes back to NEW, not before now() + its delay, while
#   attempts remain (max_attempts NULL = the MAX_ATTEMPTS setting);
# - WAIT gives the attempt back (waiting is not failing).
_COMPLETE_CTES = """
u AS (
    SELECT * FROM unnest(%(ids)b::bigint[], %(attempts)b::int[], %(workers)b::text[], %(outcomes)b::text[],
                         %(results)b::jsonb[], %(errors)b::text[], %(retryables)b::bool[],
                         %(delays)b::float8[], %(tracebacks)b::text[])
        AS u(id, attempt, worker, outcome, result, error, retryable, delay, traceback)
), decided AS (
    SELECT o.id, u.attempt, u.worker, u.outcome, u.result, u.error, u.retryable, u.delay, u.traceback,
           CASE
               WHEN o.cancel_requested IS NOT NULL AND u.outcome <> 'success' THEN 'CANCELLED'
               WHEN u.outcome = 'success' THEN 'SUCCESS'
               WHEN u.outcome = 'wait' THEN 'WAIT'
               WHEN u.retryable AND o.attempts < coalesce(o.max_attempts, %(default_max_attempts)s) THEN 'NEW'
               ELSE 'FAILED'
           END AS status
    FROM damops.operations AS o JOIN u ON o.id = u.id
    WHERE o.status || '' = 'PROCESSING' AND o.attempts = u.attempt AND o.worker = u.worker
    ORDER BY o.id  -- rows locked in id order, as cancel does: no deadlock between the two
    FOR UPDATE OF o
), done AS (
    UPDATE damops.operations AS o
    SET status = d.status,
        result = CASE WHEN d.status = 'SUCCESS' THEN d.result ELSE o.result END,
        error = CASE
            WHEN d.status = 'CANCELLED' THEN 'cancelled' || coalesce(': ' || d.error, '')
            WHEN d.status = 'SUCCESS' THEN NULL
            ELSE d.error END,
        attempts = CASE WHEN d.status = 'WAIT' THEN greatest(o.attempts - 1, 0) ELSE o.attempts END,
        run_after = CASE WHEN d.status = 'NEW' THEN now() + make_interval(secs => d.delay) END,
        finished = CASE WHEN d.status IN ('SUCCESS', 'FAILED', 'CANCELLED') THEN now() END,
        worker = NULL,
        updated = now()
    FROM decided AS d
    WHERE o.id = d.id
    RETURNING o.id, o.status, o.trigger_function, o.attempts, o.started, o.created,
              d.attempt, d.worker, d.outcome, d.error, d.traceback
), history AS (
    INSERT INTO damops.attempts (operation_id, attempt, worker, outcome, status, error, traceback, started)
    SELECT id, attempt, worker, outcome, status, error, traceback, started FROM done
)"""
# What each written StatusUpdate did: the columns of :class:`Completed`.
_COMPLETED_COLUMNS = """id, status, trigger_function, attempts, extract(epoch FROM now() - started)::float8 AS duration,
       extract(epoch FROM started - created)::float8 AS waited"""
COMPLETE_SQL = f"WITH {_COMPLETE_CTES}\nSELECT {_COMPLETED_COLUMNS}\nFROM done"

# A dispatch cycle's StatusUpdates and its claim as one statement: one round trip
# and one implicit transaction (the scheduler's connection is in autocommit), no
# BEGIN and COMMIT messages. The two change disjoint rows (PROCESSING ones; NEW
# and WAIT ones) seen in one snapshot: a retry put back to NEW here is claimable
# from the next cycle on. Rows: ``completed`` true, then the columns of
# :class:`Completed`; false, then a claim's (see :func:`split_cycle_rows`).
COMPLETE_AND_CLAIM_SQL = f"""WITH {_COMPLETE_CTES}, leased AS ({CLAIM_SQL})
SELECT true AS completed, {_COMPLETED_COLUMNS},
       NULL::jsonb AS inputs, NULL::text AS worker, NULL::jsonb AS trace_context
FROM done
UNION ALL
SELECT false, id, NULL, trigger_function, attempts, NULL, NULL, inputs, worker, trace_context
FROM leased
"""

# Progress refreshes lastTouched and keeps the latest message and fraction; a
# progress() call without a message (or fraction) keeps the previous one.
TOUCH_SQL = """
UPDATE damops.operations AS o
SET updated = now(),
    progress_message = coalesce(u.message, o.progress_message),
    progress_fraction = coalesce(u.fraction, o.progress_fraction)
FROM unnest(%(ids)b::bigint[], %(messages)b::text[], %(fractions)b::float8[]) AS u(id, message, fraction)
WHERE o.id = u.id AND o.status || '' = 'PROCESSING'
"""

# After a connection error in a cycle the claim may or may not have committed:
# rows PROCESSING for workers that were free when it was sent can only come
# from that claim (minus those whose StatusUpdate is still to be written).
RESOLVE_CLAIMS_SQL = """
SELECT id, trigger_function, inputs, attempts, worker, trace_context FROM damops.operations
WHERE status = 'PROCESSING' AND pool = %(pool)s AND worker = ANY(%(workers)b::text[])
  AND NOT id = ANY(%(settled)b::bigint[])
"""

# Operations left PROCESSING by workers of a local run that died (their
# processes died with it): recovered as retryable failures at start-up.
HELD_BY_SQL = """
SELECT id, attempts, worker FROM damops.operations
WHERE status = 'PROCESSING' AND pool = %(pool)s AND worker LIKE %(prefix)s
"""

# Shutdown: unfinished operations go back to NEW without using up an attempt;
# one whose cancel was requested ends CANCELLED instead.
RELEASE_SQL = """
UPDATE damops.operations AS o
SET status = CASE WHEN o.cancel_requested IS NOT NULL THEN 'CANCELLED' ELSE 'NEW' END,
    attempts = CASE WHEN o.cancel_requested IS NOT NULL THEN o.attempts ELSE greatest(o.attempts - 1, 0) END,
    finished = CASE WHEN o.cancel_requested IS NOT NULL THEN now() END,
    worker = NULL, updated = now(),
    error = CASE WHEN o.cancel_requested IS NOT NULL THEN 'cancelled: ' || %(reason)s ELSE %(reason)s END
FROM unnest(%(ids)b::bigint[], %(attempts)b::int[], %(workers)b::text[]) AS u(id, attempt, worker)
WHERE o.id = u.id AND o.status || '' = 'PROCESSING' AND o.attempts = u.attempt AND o.worker = u.worker
RETURNING o.id
"""

# PROCESSING operations of a pool whose cancel was requested: the scheduler
# sends each worker a cancel (the `damops_cancel` NOTIFY, payload = pool, says when to look).
CANCEL_REQUESTED_SQL = """
SELECT id, attempts, worker FROM damops.operations
WHERE pool = %(pool)s AND status = 'PROCESSING' AND cancel_requested IS NOT NULL
ORDER BY id
"""
CANCEL_NOTIFY_CHANNEL = "damops_cancel"


@dataclass(frozen=True)
class Completed:
    """A row of COMPLETE_SQL's result: what a StatusUpdate did."""

    id: int
    status: str
    trigger_function: str
    attempts: int
    duration: float | None
    waited: float | None = None  # enqueue to the start of this run (the queue time on attempt 1)

    @property
    def final(self) -> bool:
        return self.status in ("SUCCESS", "FAILED", "CANCELLED")

    def describe(self) -> str:
        """One log line: id, trigger function, outcome, attempts, duration of the run."""
        took = f" in {self.duration:.2f}s" if self.duration is not None else ""
        return f"operation {self.id} {self.trigger_function}: {self.status} (attempt {self.attempts}){took}"


def claim_params(pool: str, workers: Sequence[str], wait_interval: float) -> dict[str, Any]:
    return {"pool": pool, "limit": len(workers), "free_workers": list(workers), "wait_interval": wait_interval}


def bound_traceback(text: str | None) -> str | None:
    """Keep the end of a long traceback: the innermost frames and the error are there."""
    if text is None or len(text) <= MAX_TRACEBACK_CHARS:
        return text
    return "[... truncated ...]\n" + text[-(MAX_TRACEBACK_CHARS - 20) :]


def bound_error(text: str | None) -> str | None:
    """Keep the start of a long error message: what went wrong comes first."""
    if text is None or len(text) <= MAX_ERROR_CHARS:
        return text
    return text[: MAX_ERROR_CHARS - 16] + " [... truncated]"


def complete_params(
    completions: Sequence[Completion], *, policy: RetryPolicy = DEFAULT_POLICY, default_max_attempts: int = 3
) -> dict[str, Any]:
    updates = [c.update for c in completions]
    return {
        "ids": [u.id for u in updates],
        "attempts": [u.attempt for u in updates],
        "workers": [c.worker for c in completions],
        "outcomes": [u.outcome for u in updates],
        "results": [Jsonb(u.result) if u.outcome == "success" else None for u in updates],
        "errors": [bound_error(u.error) for u in updates],
        "retryables": [u.retryable for u in updates],
        # Used only by rows that go back to NEW; computed for all, it is cheap.
        "delays": [retry_delay(u.attempt, u.retry_after, policy) for u in updates],
        "tracebacks": [bound_traceback(u.traceback) for u in updates],
        "default_max_attempts": default_max_attempts,
    }


def complete_and_claim_params(completion: dict[str, Any], claim: dict[str, Any]) -> dict[str, Any]:
    """COMPLETE_AND_CLAIM_SQL's parameters: both statements' (their names must not meet)."""
    shared = completion.keys() & claim.keys()
    if shared:
        raise ValueError(f"parameters named in both statements: {sorted(shared)}")
    return {**completion, **claim}


def completed_rows(rows: Iterable[Sequence[Any]]) -> list[Completed]:
    return [Completed(*row) for row in rows]


def split_cycle_rows(rows: Iterable[Sequence[Any]]) -> tuple[list[tuple[Any, ...]], list[Lease]]:
    """COMPLETE_AND_CLAIM_SQL's rows as (COMPLETE_SQL's rows, the claimed leases)."""
    completed, claimed = [], []
    for row in rows:
        if row[0]:
            completed.append(tuple(row[1:7]))
        else:
            op_id, _, trigger_function, attempt, _, _, inputs, worker, trace_context = row[1:]
            claimed.append(lease_from_claim((op_id, trigger_function, inputs, attempt, worker, trace_context)))
    return completed, claimed


def _fraction(value: float | None) -> float | None:
    if value is None or value != value:  # NaN says nothing
        return None
    return min(1.0, max(0.0, float(value)))


def touch_params(progress: Mapping[int, tuple[str | None, float | None]] | Iterable[int]) -> dict[str, Any]:
    """``progress`` maps operation id -> (message, fraction); a plain set of ids only touches."""
    items = list(progress.items()) if isinstance(progress, Mapping) else [(op_id, (None, None)) for op_id in progress]
    return {
        "ids": [op_id for op_id, _ in items],
        "messages": [None if m is None else str(m)[:MAX_PROGRESS_MESSAGE_CHARS] for _, (m, _f) in items],
        "fractions": [_fraction(f) for _, (_m, f) in items],
    }


def release_params(leases: Sequence[Lease], reason: str) -> dict[str, Any]:
    return {
        "ids": [lease.id for lease in leases],
        "attempts": [lease.attempt for lease in leases],
        "workers": [lease.worker for lease in leases],
        "reason": reason,
    }


def lease_from_claim(row: Sequence[Any]) -> Lease:
    """A row of CLAIM_SQL or RESOLVE_CLAIMS_SQL as the lease it gives its worker."""
    op_id, trigger_function, inputs, attempt, worker, trace_context = row
    return Lease(op_id, attempt, worker, trigger_function, inputs, trace_context)


def cancel_requested_params(pool: str) -> dict[str, Any]:
    return {"pool": pool}
