-- The W3C trace context (traceparent, tracestate) of the span that enqueued
-- the operation, when the producer traces with OpenTelemetry: the scheduler's
-- claim span and the worker's run span continue that trace. NULL otherwise.
-- Nullable without a default: adding it rewrites no row.
ALTER TABLE damops.operations ADD COLUMN trace_context jsonb
    CHECK (trace_context IS NULL OR jsonb_typeof(trace_context) = 'object');
