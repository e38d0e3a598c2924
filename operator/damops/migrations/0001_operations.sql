-- The operations table: one row per operation, from NEW to a final state.
CREATE TABLE damops.operations (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pool             text        NOT NULL DEFAULT 'default',
    trigger_function text        NOT NULL CHECK (trigger_function <> ''),
    inputs           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status           text        NOT NULL DEFAULT 'NEW'
                     CHECK (status IN ('NEW', 'WAIT', 'PROCESSING', 'SUCCESS', 'FAILED')),
    priority         integer     NOT NULL DEFAULT 0,
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    worker           text,
    result           jsonb,
    error            text,
    created          timestamptz NOT NULL DEFAULT now(),
    updated          timestamptz NOT NULL DEFAULT now()
);

-- The claim reads only claimable rows in (pool, priority, id) order: a partial
-- index keeps it an index scan however many finished rows the table holds.
CREATE INDEX operations_claimable_idx
    ON damops.operations (pool, priority, id)
    WHERE status IN ('NEW', 'WAIT');

-- Housekeeping looks for PROCESSING rows by age, and cleanup for FAILED rows by age.
CREATE INDEX operations_processing_idx
    ON damops.operations (updated)
    WHERE status = 'PROCESSING';
CREATE INDEX operations_failed_idx
    ON damops.operations (created, id)
    WHERE status = 'FAILED';

-- A queue table churns: vacuum and analyze it far more often than the defaults,
-- and leave room on each page for HOT updates.
ALTER TABLE damops.operations SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Producers wake the schedulers of their pool (payload = pool name). A
-- statement-level trigger sends one notification per pool per INSERT, however
-- many rows it carries.
CREATE FUNCTION damops.notify_new_operations() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pool_name text;
BEGIN
    FOR pool_name IN SELECT DISTINCT pool FROM inserted WHERE status = 'NEW' LOOP
        PERFORM pg_notify('damops_operations', pool_name);
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER operations_notify
    AFTER INSERT ON damops.operations
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT
    EXECUTE FUNCTION damops.notify_new_operations();
