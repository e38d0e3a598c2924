"""Optional OpenTelemetry spans: enqueue -> claim -> run, one trace from the producer to the worker.

Nothing here needs OpenTelemetry: it is imported lazily, and without it (or
with tracing off) every hook is a ``tracer is None`` check.

* **enqueue** (producer side, :func:`enqueue_span`): a PRODUCER span through
  the global OpenTelemetry API, as any instrumented library does: it records
  when the application set up a tracer provider, and is a no-op otherwise.
  Its W3C trace context (``traceparent``, ``tracestate``) is stored in the
  operation's ``trace_context`` column.
* **claim** (scheduler, :func:`claimed`): a CLIENT span per claimed operation,
  child of the stored context; the Operation frame carries the claim span's
  context to the worker (or, when the scheduler does not trace, the stored one).
* **run** (worker, :func:`run`): a CONSUMER span around the trigger function,
  child of the frame's context, current while it runs (its own spans nest
  under it, and JSON log lines carry its trace and span ids).

damops's own processes (``damops run``, ``damops operator``, ``damops
worker``) emit spans when ``DAMOPS_TRACING`` is true (see :func:`configure`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from damops.dispatch import Lease
    from damops.operations import NewOperation
    from damops.protocol import Operation, StatusUpdate

log = logging.getLogger("damops.tracing")

INSTRUMENTATION = "damops"
# OTEL_TRACES_EXPORTER names damops knows itself; any other is looked up in this
# entry-point group, ``otlp`` by its protocol (see :func:`entry_point_names`).
EXPORTER_ENTRY_POINTS = "opentelemetry_traces_exporter"
# The entry points of the OTLP exporters, by OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL
# ("otlp": the opentelemetry-exporter-otlp package's name for its gRPC one).
OTLP_BY_PROTOCOL: dict[str, tuple[str, ...]] = {
    "http/protobuf": ("otlp_proto_http",),
    "grpc": ("otlp_proto_grpc", "otlp"),
}
FILE_EXPORTER = "jsonl"  # one JSON object per span, appended to DAMOPS_TRACING_FILE

# The tracer of damops's own processes; None: no claim or run spans (the hot path checks only this).
tracer: Tracer | None = None
_api: Any = None  # the opentelemetry.trace module, once imported
_propagator: Any = None  # W3C TraceContext: what is stored with an operation is always traceparent/tracestate


def enabled_by(environ: Mapping[str, str]) -> bool:
    """DAMOPS_TRACING true, and OpenTelemetry's own OTEL_SDK_DISABLED not."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return environ.get("DAMOPS_TRACING", "").strip().lower() in ("1", "true", "yes", "on")


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """OTEL_TRACES_EXPORTER as a list (the specification's default is otlp); ``none`` means none."""
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    return [n for n in names if n != "none"]


def entry_point_names(name: str, environ: Mapping[str, str]) -> list[str]:
    """The exporter entry points an OTEL_TRACES_EXPORTER name may be, the first installed
    one wins. ``otlp`` is the exporter of OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (else
    OTEL_EXPORTER_OTLP_PROTOCOL); with neither set, http/protobuf (the specification's
    default, and what damops[otel] installs), then grpc. A protocol not in
    OTLP_BY_PROTOCOL raises ValueError naming the variable."""
    if name != "otlp":
        return [name]
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(variable, "").strip()
        if protocol:
            if protocol not in OTLP_BY_PROTOCOL:
                raise ValueError(f"{variable}={protocol!r}: expected one of {', '.join(OTLP_BY_PROTOCOL)}")
            return list(OTLP_BY_PROTOCOL[protocol])
    return [point for points in OTLP_BY_PROTOCOL.values() for point in points]


def service_attributes(role: str, environ: Mapping[str, str]) -> dict[str, str]:
    """service.name defaults to damops-<role> unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES names one."""
    if environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        return {}
    return {"service.name": f"damops-{role}"}


def _load_api() -> bool:
    global _api, _propagator
    if _api is None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            _api = False
            return False
        _api, _propagator = trace, TraceContextTextMapPropagator()
    return bool(_api)


def configure(role: str, environ: Mapping[str, str] | None = None) -> bool:
    """Called once at the start of a damops process: with DAMOPS_TRACING true,
    set up the OpenTelemetry SDK (a TracerProvider exporting to OTEL_TRACES_EXPORTER)
    unless the process already has one (opentelemetry-instrument, or an application
    embedding the scheduler), and emit claim and run spans. True when tracing."""
    global tracer
    environ = os.environ if environ is None else environ
    if not enabled_by(environ):
        return False
    if not _load_api():
        log.warning("DAMOPS_TRACING is set but OpenTelemetry is not installed (pip install 'damops[otel]'): no spans")
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        log.warning("DAMOPS_TRACING is set but the OpenTelemetry SDK is not installed (pip install 'damops[otel]')")
        return False
    provider = _api.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        processors = [_processor(name, environ) for name in exporter_names(environ)]
        if not any(processors):
            log.warning("DAMOPS_TRACING is set but no span exporter could be set up: no spans")
            return False
        provider = TracerProvider(resource=Resource.create(service_attributes(role, environ)))
        for processor in processors:
            if processor is not None:
                provider.add_span_processor(processor)
        _api.set_tracer_provider(provider)
    from damops import __version__

    tracer = provider.get_tracer(INSTRUMENTATION, __version__)
    return True


def _processor(name: str, environ: Mapping[str, str]) -> Any:
    """The span processor for one exporter name, or None (logged) when it cannot be had."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    if name == FILE_EXPORTER:
        path = environ.get("DAMOPS_TRACING_FILE")
        if not path:
            log.warning("OTEL_TRACES_EXPORTER=%s needs DAMOPS_TRACING_FILE", FILE_EXPORTER)
            return None
        # Written as each span ends: a worker killed a moment later has lost nothing.
        return SimpleSpanProcessor(file_exporter(path))
    if name == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter())
    from importlib.metadata import entry_points

    try:
        candidates = entry_point_names(name, environ)
    except ValueError as exc:
        log.warning("OpenTelemetry span exporter %r: %s; skipping it", name, exc)
        return None
    installed = {point.name: point for point in entry_points(group=EXPORTER_ENTRY_POINTS)}
    found = next((installed[candidate] for candidate in candidates if candidate in installed), None)
    if found is None:
        log.warning(
            "no OpenTelemetry span exporter %r installed (OTEL_TRACES_EXPORTER; looked for %s); skipping it",
            name,
            ", ".join(candidates),
        )
        return None
    try:
        exporter = found.load()()
    except Exception as exc:  # noqa: BLE001 - a broken exporter must not stop the process
        log.warning("the OpenTelemetry span exporter %r could not be set up: %s", name, exc)
        return None
    return BatchSpanProcessor(exporter)


def file_exporter(path: str) -> Any:
    """A SpanExporter appending one JSON object per span to ``path``. Each batch is
    one write() to a file opened with O_APPEND, so processes can share the file."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            text = "".join(json.dumps(span_record(span), default=str) + "\n" for span in spans)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            return SpanExportResult.SUCCESS

    return JsonLinesExporter()


def span_record(span: Any) -> dict[str, Any]:
    """A finished span as plain JSON: hex ids, the parent's span id, attributes, status."""
    context, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "service": (span.resource.attributes or {}).get("service.name"),
        "pid": os.getpid(),
    }


def _context(carrier: Mapping[str, Any] | None) -> Any:
    """The OpenTelemetry context a stored trace context names (an empty one: a new trace)."""
    if not carrier or not isinstance(carrier, Mapping):
        return None
    return _propagator.extract({k: v for k, v in carrier.items() if isinstance(k, str) and isinstance(v, str)})


def _carrier(span: Span) -> dict[str, str] | None:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=_api.set_span_in_context(span))
    return carrier or None


# --- producer ----------------------------------------------------------------


class EnqueueSpan:
    """The producer's span around one enqueue call; ``trace_context`` is stored with each operation."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.trace_context = _carrier(span)

    def enqueued(self, ids: Sequence[int]) -> None:
        if len(ids) == 1:
            self.span.set_attribute("messaging.message.id", str(ids[0]))
        self.span.set_attribute("damops.operation.ids", list(ids[:100]))


@contextlib.contextmanager
def enqueue_span(ops: Sequence[NewOperation]) -> Iterator[EnqueueSpan | None]:
    """Around an enqueue: a PRODUCER span on the global tracer, or None without OpenTelemetry."""
    if not _load_api():
        yield None
        return
    pool_names = sorted({op.pool for op in ops})
    names = sorted({op.trigger_function for op in ops})
    attributes: dict[str, Any] = {
        "messaging.system": "damops",
        "messaging.operation.type": "send",
        "messaging.batch.message_count": len(ops),
        "damops.pools": pool_names,
        "damops.trigger_functions": names[:20],
    }
    if len(pool_names) == 1:
        attributes["messaging.destination.name"] = pool_names[0]
    name = f"enqueue {pool_names[0]}" if len(pool_names) == 1 else "enqueue"
    with _api.get_tracer(INSTRUMENTATION).start_as_current_span(
        name, kind=_api.SpanKind.PRODUCER, attributes=attributes
    ) as span:
        yield EnqueueSpan(span)


# --- scheduler -----------------------------------------------------------------


def claimed(leases: Sequence[Lease], pool: str, started: float) -> list[Lease]:
    """A claim span per lease, child of its stored trace context, from ``started``
    (time.monotonic() at the cycle's start) to now; each lease then carries its
    claim span's context to the worker."""
    assert tracer is not None
    start_ns = time.time_ns() - int((time.monotonic() - started) * 1e9)
    traced = []
    for lease in leases:
        span = tracer.start_span(
            f"claim {pool}",
            context=_context(lease.trace_context),
            kind=_api.SpanKind.CLIENT,
            start_time=start_ns,
            attributes={
                "messaging.system": "damops",
                "messaging.operation.type": "receive",
                "messaging.destination.name": pool,
                "messaging.message.id": str(lease.id),
                "damops.trigger_function": lease.trigger_function,
                "damops.attempt": lease.attempt,
                "damops.worker": lease.worker,
            },
        )
        carrier = _carrier(span)
        span.end()
        traced.append(dataclasses.replace(lease, trace_context=carrier))
    return traced


# --- worker --------------------------------------------------------------------


def run(op: Operation, pool: str | None, worker: str, handle: Callable[[Operation], StatusUpdate]) -> StatusUpdate:
    """``handle(op)`` inside a run span, child of the context the frame carries."""
    assert tracer is not None
    attributes: dict[str, Any] = {
        "messaging.system": "damops",
        "messaging.operation.type": "process",
        "messaging.message.id": str(op.id),
        "damops.trigger_function": op.trigger_function,
        "damops.attempt": op.attempt,
        "damops.worker": worker,
    }
    if pool:
        attributes["messaging.destination.name"] = pool
    with tracer.start_as_current_span(
        f"run {op.trigger_function}",
        context=_context(op.trace_context),
        kind=_api.SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        update = handle(op)
        span.set_attribute("damops.outcome", update.outcome)
        if update.outcome == "failure":
            span.set_attribute("damops.retryable", update.retryable)
            first = (update.error or "").strip().splitlines()
            span.set_status(_api.Status(_api.StatusCode.ERROR, first[0] if first else None))
        return update


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, for log lines; None outside one."""
    context = _api.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
