"""OpenTelemetry spans enqueue -> claim -> run: the producer's trace continues
into the worker. The producer is this test (the SDK's in-memory exporter); the
scheduler and its workers are a real `damops run` whose processes append their
spans to a JSON-lines file (OTEL_TRACES_EXPORTER=jsonl)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from damops.operations import NewOperation, enqueue, enqueue_many
from tests.integration.observed import DamopsRun
from tests.support.engine import running_engine, settings, wait_final

pytest.importorskip("opentelemetry.sdk.trace", reason="needs the otel extra")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

POOL = "traced-pool"


@pytest.fixture
def producer_spans() -> InMemorySpanExporter:
    """This process as a traced application: the global provider exports to memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def hex_ids(span) -> tuple[str, str]:
    context = span.get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def read_spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_spans(path: Path, predicate, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        spans = read_spans(path)
        if predicate(spans):
            return spans
        if time.monotonic() > deadline:
            raise AssertionError(f"spans never complete; have {json.dumps(spans, indent=1)}")
        time.sleep(0.1)


def by_operation(spans: list[dict], kind: str, op_id: int) -> dict[int, dict]:
    """attempt -> the span of that kind (claim or run) for the operation."""
    found = [s for s in spans if s["name"].startswith(kind) and s["attributes"]["messaging.message.id"] == str(op_id)]
    attempts = {s["attributes"]["damops.attempt"]: s for s in found}
    assert len(attempts) == len(found), found  # one span per attempt
    return attempts


def test_a_producers_trace_continues_through_the_scheduler_into_the_worker(database_url, producer_spans, tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    env = {"DAMOPS_TRACING": "1", "OTEL_TRACES_EXPORTER": "jsonl", "DAMOPS_TRACING_FILE": str(spans_file)}
    with DamopsRun(database_url, POOL, env=env) as run:
        run.wait_ready()
        tracer = trace.get_tracer("test-producer")
        with psycopg.connect(database_url) as conn:
            with tracer.start_as_current_span("handle a request") as request:
                ok, flaky = enqueue_many(
                    conn, [NewOperation("noop", pool=POOL), NewOperation("flaky", {"succeed_on": 2}, pool=POOL)]
                )
            alone = enqueue(conn, "noop", pool=POOL)  # no span around it: its enqueue span starts a trace
            conn.commit()
            stored = dict(
                conn.execute(
                    "SELECT id, trace_context FROM damops.operations WHERE id = ANY(%s)", ([ok, flaky, alone],)
                ).fetchall()
            )
        # `damops enqueue` traces too when told to: its enqueue span goes to the same file.
        produced = subprocess.run(
            [sys.executable, "-m", "damops", "enqueue", "noop", "--pool", POOL],
            env=dict(os.environ, DATABASE_URL=database_url, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert produced.returncode == 0, produced.stderr
        from_cli = int(produced.stdout.strip())
        assert asyncio.run(wait_final(database_url, [ok, flaky, alone, from_cli])) == {
            ok: "SUCCESS",
            flaky: "SUCCESS",
            alone: "SUCCESS",
            from_cli: "SUCCESS",
        }
        expected = {(ok, 1), (flaky, 1), (flaky, 2), (alone, 1), (from_cli, 1)}
        spans = wait_spans(
            spans_file,
            lambda spans: (
                {
                    (int(s["attributes"]["messaging.message.id"]), s["attributes"]["damops.attempt"])
                    for s in spans
                    if s["name"].startswith("run ")
                }
                >= expected
            ),
        )
        log_lines = run.json_lines()

    request_trace, _ = hex_ids(request)
    batch, single = [s for s in producer_spans.get_finished_spans() if s.name == f"enqueue {POOL}"]
    assert batch.kind is trace.SpanKind.PRODUCER and batch.parent.span_id == request.get_span_context().span_id
    assert single.parent is None  # a root: `alone` was enqueued outside any span
    batch_trace, batch_span = hex_ids(batch)
    assert batch_trace == request_trace
    # The W3C trace context stored with the operation is the enqueue span's.
    assert stored[ok] == stored[flaky] and stored[ok]["traceparent"].split("-")[1:3] == [batch_trace, batch_span]

    for op_id, enqueue_span, attempts in ((ok, batch, 1), (flaky, batch, 2), (alone, single, 1)):
        trace_id, enqueue_id = hex_ids(enqueue_span)
        claims, runs = by_operation(spans, "claim ", op_id), by_operation(spans, "run ", op_id)
        assert set(claims) == set(runs) == set(range(1, attempts + 1))
        for attempt in range(1, attempts + 1):
            claim, ran = claims[attempt], runs[attempt]
            # producer -> scheduler -> worker: one trace, each span the child of the one before.
            assert claim["trace_id"] == ran["trace_id"] == trace_id
            assert claim["parent_span_id"] == enqueue_id
            assert ran["parent_span_id"] == claim["span_id"]
            assert (claim["service"], claim["kind"]) == ("damops-scheduler", "CLIENT")
            assert (ran["service"], ran["kind"]) == ("damops-worker", "CONSUMER")
            assert claim["pid"] != ran["pid"]  # two processes
            assert ran["attributes"]["messaging.destination.name"] == POOL
    [cli_enqueue] = [s for s in spans if s["name"] == f"enqueue {POOL}"]
    assert (cli_enqueue["service"], cli_enqueue["kind"], cli_enqueue["parent_span_id"]) == (
        "damops-cli",
        "PRODUCER",
        None,
    )
    assert cli_enqueue["attributes"]["messaging.message.id"] == str(from_cli)
    cli_claim, cli_run = by_operation(spans, "claim ", from_cli)[1], by_operation(spans, "run ", from_cli)[1]
    assert cli_claim["trace_id"] == cli_run["trace_id"] == cli_enqueue["trace_id"]
    assert (cli_claim["parent_span_id"], cli_run["parent_span_id"]) == (cli_enqueue["span_id"], cli_claim["span_id"])

    failed_run = by_operation(spans, "run ", flaky)[1]
    assert failed_run["status"] == "ERROR" and "transient failure" in failed_run["status_description"]
    assert by_operation(spans, "run ", flaky)[2]["status"] == "UNSET"

    # JSON log lines written inside the run span carry its trace and span ids.
    [raised] = [line for line in log_lines if line.get("operation_id") == flaky and "raised" in line["message"]]
    assert (raised["trace_id"], raised["span_id"]) == (request_trace, failed_run["span_id"])


def test_a_scheduler_that_does_not_trace_passes_the_producers_context_to_the_worker(
    database_url, producer_spans, tmp_path, monkeypatch
):
    """Only the workers trace (their environment): the run span is the enqueue span's child."""
    spans_file = tmp_path / "spans.jsonl"
    for name, value in {
        "DAMOPS_TRACING": "1",
        "OTEL_TRACES_EXPORTER": "jsonl",
        "DAMOPS_TRACING_FILE": str(spans_file),
    }.items():
        monkeypatch.setenv(name, value)

    async def scenario() -> int:
        async with running_engine(database_url, settings(worker_count=1)):

            def produce() -> int:
                with psycopg.connect(database_url) as conn:
                    return enqueue(conn, "noop")

            op_id = await asyncio.to_thread(produce)
            await wait_final(database_url, [op_id])
            return op_id

    from damops import tracing

    assert tracing.tracer is None  # this process (the scheduler here) was never configured
    op_id = asyncio.run(scenario())
    spans = wait_spans(spans_file, lambda spans: any(s["name"] == "run noop" for s in spans))
    [enqueued] = [s for s in producer_spans.get_finished_spans() if s.name == "enqueue default"]
    [ran] = [s for s in spans if s["name"] == "run noop"]
    assert ran["attributes"]["messaging.message.id"] == str(op_id)
    assert (ran["trace_id"], ran["parent_span_id"]) == hex_ids(enqueued)
    assert not [s for s in spans if s["name"].startswith("claim")]


BLOCK_OPENTELEMETRY = '''
import sys

class _NoOpenTelemetry:
    """As if the otel extra were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, _NoOpenTelemetry())
'''


def test_without_opentelemetry_tracing_on_changes_nothing_but_a_warning(database_url, tmp_path):
    blocker = tmp_path / "no-otel"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_OPENTELEMETRY)

    pythonpath = os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])
    probe = subprocess.run(
        [sys.executable, "-c", "import opentelemetry"], env=dict(os.environ, PYTHONPATH=pythonpath), capture_output=True
    )
    assert probe.returncode != 0  # the block works
    spans_file = tmp_path / "spans.jsonl"
    env = {
        "PYTHONPATH": pythonpath,
        "DAMOPS_TRACING": "1",
        "OTEL_TRACES_EXPORTER": "jsonl",
        "DAMOPS_TRACING_FILE": str(spans_file),
    }
    with DamopsRun(database_url, POOL, workers=1, env=env) as run:
        run.wait_ready()
        produced = subprocess.run(
            [sys.executable, "-m", "damops", "enqueue", "noop", "--pool", POOL],
            env=dict(os.environ, PYTHONPATH=pythonpath, DATABASE_URL=database_url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert produced.returncode == 0, produced.stderr
        op_id = int(produced.stdout.strip())
        assert asyncio.run(wait_final(database_url, [op_id])) == {op_id: "SUCCESS"}
        warnings = [line for line in run.json_lines() if "OpenTelemetry is not installed" in line["message"]]
    assert {line["logger"] for line in warnings} == {"damops.tracing"}
    assert len(warnings) == 2  # the scheduler's process and its one worker's
    assert not spans_file.exists()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT trace_context FROM damops.operations WHERE id = %s", (op_id,)).fetchone() == (None,)


class OtlpReceiver:
    """A collector's OTLP/HTTP endpoint on a real socket: keeps each exported span
    as (service name, span name, attributes)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[tuple[str, str, dict[str, str]]] = []
        self.paths: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            attributes = {
                                a.key: str(a.value.string_value or a.value.int_value) for a in span.attributes
                            }
                            receiver.spans.append((resource.get("service.name", ""), span.name, attributes))
                receiver.paths.add(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_with_nothing_but_an_endpoint_spans_go_to_an_otlp_collector_over_http(database_url):
    """OTEL_TRACES_EXPORTER's default (otlp) is the HTTP exporter damops[otel] installs:
    the scheduler's claim span and the worker's run span reach the collector."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="needs the otel extra's OTLP exporter")
    receiver = OtlpReceiver()
    env = {
        "DAMOPS_TRACING": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s rather than 5 s
    }
    try:
        with DamopsRun(database_url, POOL, workers=1, env=env) as run:
            run.wait_ready()
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, "noop", pool=POOL)
            assert asyncio.run(wait_final(database_url, [op_id])) == {op_id: "SUCCESS"}
            wanted = {("damops-scheduler", f"claim {POOL}"), ("damops-worker", "run noop")}
            deadline = time.monotonic() + 60
            while True:
                got = {
                    (service, name)
                    for service, name, attrs in receiver.spans
                    if attrs.get("messaging.message.id") == str(op_id)
                }
                if got >= wanted:
                    break
                assert time.monotonic() < deadline, (
                    f"the collector got {receiver.spans}; log: {run.stderr.text[-3000:]}"
                )
                time.sleep(0.1)
            assert "exporter" not in run.stderr.text  # no warning about a missing or broken one
    finally:
        receiver.close()
    assert receiver.paths == {"/v1/traces"}
