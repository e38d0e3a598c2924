-- The operation lifecycle: backoff and scheduled runs (run_after), unique
-- operations, cancel, attempt history, progress, periodic ticks.

-- CANCELLED is a final state, like SUCCESS and FAILED.
ALTER TABLE damops.operations DROP CONSTRAINT operations_status_check;
ALTER TABLE damops.operations ADD CONSTRAINT operations_status_check
    CHECK (status IN ('NEW', 'WAIT', 'PROCESSING', 'SUCCESS', 'FAILED', 'CANCELLED'));

-- NULL max_attempts means "the MAX_ATTEMPTS setting of whoever completes it",
-- so changing the setting takes effect for every operation that did not set
-- its own. Existing rows keep the 3 they were given.
ALTER TABLE damops.operations ALTER COLUMN max_attempts DROP NOT NULL;
ALTER TABLE damops.operations ALTER COLUMN max_attempts DROP DEFAULT;

-- A pool name a scheduler can serve: 1 to 63 characters (a Kubernetes name),
-- no white space or control characters. NOT VALID: rows written before this
-- migration are not re-checked (no scheduler could serve them anyway).
ALTER TABLE damops.operations ADD CONSTRAINT operations_pool_check
    CHECK (length(pool) BETWEEN 1 AND 63 AND pool !~ '[[:space:][:cntrl:]]') NOT VALID;

ALTER TABLE damops.operations
    -- Not claimed before this time: a scheduled operation, or a retry's backoff.
    ADD COLUMN run_after         timestamptz,
    -- While an operation with this key is not final, enqueueing the key again
    -- returns that operation's id.
    ADD COLUMN unique_key        text CHECK (unique_key <> ''),
    -- Set by a cancel of a PROCESSING operation; its scheduler tells the worker.
    ADD COLUMN cancel_requested  timestamptz,
    -- The current (or last) attempt's start, the end of the operation, and the
    -- worker of the last attempt (kept when `worker` is cleared at the end).
    ADD COLUMN started           timestamptz,
    ADD COLUMN finished          timestamptz,
    ADD COLUMN last_worker       text,
    -- The latest context.progress() of the current attempt.
    ADD COLUMN progress_message  text,
    ADD COLUMN progress_fraction double precision;

-- Finished operations of the old schema get a finish time, so retention by age works on them.
UPDATE damops.operations SET finished = updated WHERE status IN ('SUCCESS', 'FAILED');

-- The claim reads two index ranges: operations ready now, in (priority, id)
-- order, and delayed operations whose time has come, in run_after order. Rows
-- scheduled for later are in neither range, so however many there are, the
-- claim never walks past them.
DROP INDEX damops.operations_claimable_idx;
CREATE INDEX operations_claimable_idx
    ON damops.operations (pool, priority, id)
    WHERE status IN ('NEW', 'WAIT') AND run_after IS NULL;
CREATE INDEX operations_delayed_idx
    ON damops.operations (pool, run_after)
    WHERE status = 'NEW' AND run_after IS NOT NULL;

CREATE UNIQUE INDEX operations_unique_key_idx
    ON damops.operations (unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('NEW', 'WAIT', 'PROCESSING');

CREATE INDEX operations_cancel_requested_idx
    ON damops.operations (pool)
    WHERE status = 'PROCESSING' AND cancel_requested IS NOT NULL;

-- Retention of SUCCESS and CANCELLED operations, and purge by hand, go by finish time.
CREATE INDEX operations_done_idx
    ON damops.operations (status, finished, id)
    WHERE status IN ('SUCCESS', 'FAILED', 'CANCELLED');

-- One row per finished attempt (and per wait), written by the same statement
-- that records the StatusUpdate. Deleted with its operation.
CREATE TABLE damops.attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_id bigint      NOT NULL REFERENCES damops.operations (id) ON DELETE CASCADE,
    attempt      integer     NOT NULL,
    worker       text,
    outcome      text        NOT NULL,
    status       text        NOT NULL,
    error        text,
    traceback    text,
    started      timestamptz,
    finished     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX attempts_operation_idx ON damops.attempts (operation_id, id);

-- Periodic schedules: the last tick an operation was enqueued for. The row
-- lock on a schedule's row makes "one operation per tick" hold however many
-- housekeepers run.
CREATE TABLE damops.periodic (
    name      text PRIMARY KEY,
    last_tick timestamptz NOT NULL
);

-- A new operation scheduled for later wakes nobody: the notification is for
-- operations claimable now.
CREATE OR REPLACE FUNCTION damops.notify_new_operations() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pool_name text;
BEGIN
    FOR pool_name IN
        SELECT DISTINCT pool FROM inserted
        WHERE status = 'NEW' AND (run_after IS NULL OR run_after <= now())
    LOOP
        PERFORM pg_notify('damops_operations', pool_name);
    END LOOP;
    RETURN NULL;
END;
$$;
