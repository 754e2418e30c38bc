"""Tracing configuration: off without an endpoint, a clear refusal without the packages, and only the
W3C trace-context headers are taken from a request (the end-to-end path is tests/e2e/test_tracing.py)."""

from __future__ import annotations

import sys

import pytest

from service.observability.tracing import Tracing, TracingUnavailable, trace_carrier
from service.settings import Settings


def test_no_endpoint_means_no_tracing() -> None:
    assert Tracing.from_settings(Settings()) is None


def test_endpoint_without_the_packages_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.resources", None)  # import raises ImportError
    with pytest.raises(TracingUnavailable, match=r"rankserve\[otel\]"):
        Tracing.from_settings(Settings(otel_endpoint="http://127.0.0.1:4317"))


def test_trace_carrier_takes_only_trace_context() -> None:
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "v=1",
               "authorization": "Bearer secret", "x-request-id": "r1"}
    assert trace_carrier(headers.get) == {"traceparent": headers["traceparent"], "tracestate": "v=1"}
    assert trace_carrier({"x-request-id": "r1"}.get) is None
    assert trace_carrier({"traceparent": b"bytes-metadata"}.get) is None  # binary gRPC metadata is ignored


def test_span_status_says_what_the_caller_was_told() -> None:
    """A service error's message goes into the span; a bug's text (which may hold data) does not."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.errors import InvalidRequest

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    for error in (InvalidRequest("top_n must be between 1 and 100, got 500"), RuntimeError("user 42 secret row")):
        span = tracing.start(None, 1_000)
        assert span is not None
        span.finish([("fetch", 1_000, 2_000)], {"rankserve.candidates": 3}, error)
    statuses = [s.status.description for s in exporter.get_finished_spans() if s.name == "rankserve.rank"]
    assert statuses == ["top_n must be between 1 and 100, got 500", "internal error (RuntimeError)"]
    provider.shutdown()


def test_log_line_of_the_endpoint_hides_credentials() -> None:
    from service.observability.tracing import _without_credentials

    assert _without_credentials("https://user:pw@collector:4318/v1/traces") == "https://collector:4318/v1/traces"
    assert _without_credentials("http://collector:4317") == "http://collector:4317"
