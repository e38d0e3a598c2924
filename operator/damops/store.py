"""The scheduler's statements: claim, complete, touch, give back.

Each is one statement however many operations it covers. Every statement that
changes a PROCESSING row checks that the row is still held by the same worker
for the same attempt, so a late or duplicate StatusUpdate can never overwrite
a newer state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from damops.dispatch import Completion, Lease

CLAIM_SQL = """
UPDATE damops.operations AS o
SET status = 'PROCESSING', updated = now(), attempts = o.attempts + 1, worker = w.name
FROM (
    SELECT id, row_number() OVER (ORDER BY priority, id) AS slot
    FROM (
        SELECT id, priority FROM damops.operations
        WHERE pool = %(pool)s
          AND (status = 'NEW'
               OR (status = 'WAIT' AND updated < now() - make_interval(secs => %(wait_interval)s)))
        ORDER BY priority, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS locked
) AS claimed
JOIN unnest(%(workers)s::text[]) WITH ORDINALITY AS w(name, slot) USING (slot)
WHERE o.id = claimed.id
RETURNING o.id, o.trigger_function, o.inputs, o.attempts, o.worker
"""

# Retryable failures go back to NEW while attempts remain; WAIT gives the
# attempt back (waiting is not failing).
COMPLETE_SQL = """
UPDATE damops.operations AS o
SET status = CASE
        WHEN u.outcome = 'success' THEN 'SUCCESS'
        WHEN u.outcome = 'wait' THEN 'WAIT'
        WHEN u.retryable AND o.attempts < o.max_attempts THEN 'NEW'
        ELSE 'FAILED' END,
    result = CASE WHEN u.outcome = 'success' THEN u.result ELSE o.result END,
    error = u.error,
    attempts = CASE WHEN u.outcome = 'wait' THEN greatest(o.attempts - 1, 0) ELSE o.attempts END,
    worker = NULL,
    updated = now()
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(workers)s::text[], %(outcomes)s::text[],
            %(results)s::jsonb[], %(errors)s::text[], %(retryables)s::bool[])
     AS u(id, attempt, worker, outcome, result, error, retryable)
WHERE o.id = u.id AND o.status = 'PROCESSING' AND o.attempts = u.attempt AND o.worker = u.worker
RETURNING o.id, o.status
"""

TOUCH_SQL = """
UPDATE damops.operations SET updated = now()
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'PROCESSING'
"""

# After a connection error in a cycle the claim may or may not have committed:
# rows PROCESSING for workers that were free when it was sent can only come
# from that claim (minus those whose StatusUpdate is still to be written).
RESOLVE_CLAIMS_SQL = """
SELECT id, trigger_function, inputs, attempts, worker FROM damops.operations
WHERE status = 'PROCESSING' AND pool = %(pool)s AND worker = ANY(%(workers)s::text[])
  AND NOT id = ANY(%(settled)s::bigint[])
"""

# Operations left PROCESSING by workers of a local run that died (their
# processes died with it): recovered as retryable failures at start-up.
HELD_BY_SQL = """
SELECT id, attempts, worker FROM damops.operations
WHERE status = 'PROCESSING' AND pool = %(pool)s AND worker LIKE %(prefix)s
"""

# Shutdown, and hand-overs that never reached the trigger function: back to
# NEW without using up an attempt.
RELEASE_SQL = """
UPDATE damops.operations AS o
SET status = 'NEW', attempts = greatest(o.attempts - 1, 0), worker = NULL, updated = now(),
    error = %(reason)s
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(workers)s::text[]) AS u(id, attempt, worker)
WHERE o.id = u.id AND o.status = 'PROCESSING' AND o.attempts = u.attempt AND o.worker = u.worker
RETURNING o.id
"""


def claim_params(pool: str, workers: Sequence[str], wait_interval: float) -> dict[str, Any]:
    return {"pool": pool, "limit": len(workers), "workers": list(workers), "wait_interval": wait_interval}


def complete_params(completions: Sequence[Completion]) -> dict[str, Any]:
    updates = [c.update for c in completions]
    return {
        "ids": [u.id for u in updates],
        "attempts": [u.attempt for u in updates],
        "workers": [c.worker for c in completions],
        "outcomes": [u.outcome for u in updates],
        "results": [Jsonb(u.result) if u.outcome == "success" else None for u in updates],
        "errors": [u.error for u in updates],
        "retryables": [u.retryable for u in updates],
    }


def touch_params(progress: Mapping[int, tuple[str | None, float | None]]) -> dict[str, Any]:
    """Progress reported per operation id: (message, fraction), the latest of each."""
    return {
        "ids": list(progress),
        "messages": [message for message, _ in progress.values()],
        "fractions": [fraction for _, fraction in progress.values()],
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
    op_id, trigger_function, inputs, attempt, worker = row
    return Lease(op_id, attempt, worker, trigger_function, inputs)
