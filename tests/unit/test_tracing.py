"""damops.tracing's decisions, and what tracing off leaves on the hot path."""

from __future__ import annotations

import pytest

from damops import protocol, tracing
from damops.dispatch import Lease


def test_tracing_is_on_only_when_asked_and_not_disabled_by_opentelemetrys_own_switch():
    assert not tracing.enabled_by({})
    assert not tracing.enabled_by({"DAMOPS_TRACING": "0"})
    assert tracing.enabled_by({"DAMOPS_TRACING": "true"})
    assert not tracing.enabled_by({"DAMOPS_TRACING": "1", "OTEL_SDK_DISABLED": "true"})


def test_exporters_follow_otel_traces_exporter_with_the_specifications_default():
    assert tracing.exporter_names({}) == ["otlp"]
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "console, jsonl"}) == ["console", "jsonl"]
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []


def test_otlp_is_the_exporter_of_the_otlp_protocol_variables_http_first_when_none_is_set():
    assert tracing.entry_point_names("otlp", {}) == ["otlp_proto_http", "otlp_proto_grpc", "otlp"]
    assert tracing.entry_point_names("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == ["otlp_proto_grpc", "otlp"]
    both = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    assert tracing.entry_point_names("otlp", both) == ["otlp_proto_http"]  # the signal's own variable wins
    assert tracing.entry_point_names("zipkin", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == ["zipkin"]
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        tracing.entry_point_names("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_the_service_name_defaults_to_the_role_unless_the_environment_names_one():
    assert tracing.service_attributes("worker", {}) == {"service.name": "damops-worker"}
    assert tracing.service_attributes("worker", {"OTEL_SERVICE_NAME": "renders"}) == {}
    assert tracing.service_attributes("worker", {"OTEL_RESOURCE_ATTRIBUTES": "service.name=x,team=y"}) == {}


def test_without_damops_tracing_nothing_is_configured():
    assert tracing.configure("worker", {}) is False
    assert tracing.tracer is None


def test_an_untraced_operation_frame_is_unchanged_and_a_traced_one_carries_its_context():
    plain = Lease(1, 1, "w", "noop", {"a": 1}).operation()
    assert b"trace_context" not in protocol.encode(plain)
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    traced = Lease(1, 1, "w", "noop", None, carrier).operation()
    decoded = protocol.decode(protocol.encode(traced)[protocol.HEADER_BYTES :])
    assert isinstance(decoded, protocol.Operation) and decoded.trace_context == carrier


def test_a_stored_trace_context_that_is_not_one_starts_a_new_trace():
    if not tracing._load_api():
        return  # without OpenTelemetry there is nothing to extract
    from opentelemetry import trace

    for garbage in (None, {}, {"traceparent": 5}, {"traceparent": "nonsense"}, ["x"]):
        context = tracing._context(garbage)  # type: ignore[arg-type]
        assert context is None or not trace.get_current_span(context).get_span_context().is_valid
    good = tracing._context({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert format(trace.get_current_span(good).get_span_context().trace_id, "032x") == (
        "0af7651916cd43dd8448eb211c80319c"
    )
