"""OpenTelemetry tracing end to end: a real server exports OTLP/gRPC spans to a collector that this
test runs on loopback; REST and gRPC requests join the caller's W3C trace, every stage is a child
span, a failed request's span says why, and the request's log lines carry its trace id."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from feature_store.embedded import free_port
from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import Server, World, export_bundle

pytestmark = pytest.mark.timeout(240)

STAGES = {"rankserve.queue", "rankserve.fetch", "rankserve.retrieve", "rankserve.score", "rankserve.fuse",
          "rankserve.encode"}
PARENT_SPAN = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """A minimal OTLP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[trace_pb2.Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[tuple[Server, Collector]]:
    collector = Collector()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, grpc_server)
    port = free_port()
    grpc_server.add_insecure_port(f"127.0.0.1:{port}")
    grpc_server.start()
    root = tmp_path_factory.mktemp("tracing")
    export_bundle(world, root / "models")
    env = {"RANKSERVE_OTEL_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    server = Server(root / "models", world.redis_url, root / "server.log", env).start()
    try:
        server.wait_ready()
        yield server, collector
    finally:
        server.stop()
        grpc_server.stop(grace=None)


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{PARENT_SPAN}-01"


def wait_for_trace(collector: Collector, trace_id: str, n_spans: int) -> list[trace_pb2.Span]:
    deadline = time.monotonic() + 30
    while len(spans := collector.trace(trace_id)) < n_spans:
        assert time.monotonic() < deadline, f"{len(spans)} spans of trace {trace_id} arrived, expected {n_spans}"
        time.sleep(0.1)
    return spans


def check_request_trace(spans: list[trace_pb2.Span]) -> trace_pb2.Span:
    """One SERVER root under the caller's span, each stage once as its child, inside its time."""
    roots = [s for s in spans if s.name == "rankserve.rank"]
    assert len(roots) == 1
    root = roots[0]
    assert root.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert root.parent_span_id.hex() == PARENT_SPAN
    children = [s for s in spans if s is not root]
    assert {s.name for s in children} == STAGES and len(children) == len(STAGES)
    for child in children:
        assert child.parent_span_id == root.span_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= root.end_time_unix_nano
    return root


def attributes(span: trace_pb2.Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        field = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, field)
    return out


def test_rest_request_joins_the_callers_trace(traced: tuple[Server, Collector], world: World) -> None:
    server, collector = traced
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = {"user_id": world.long_user, "candidates": world.known_items[:20], "top_n": 5}
    r = httpx.post(
        server.base_url + "/v1/rank", json=body, timeout=30,
        headers={"traceparent": traceparent(trace_id), "x-request-id": "traced-rest"},
    )
    assert r.status_code == 200, r.text
    root = check_request_trace(wait_for_trace(collector, trace_id, 1 + len(STAGES)))
    attrs = attributes(root)
    assert attrs["rankserve.request_id"] == "traced-rest"
    assert attrs["rankserve.candidates"] == 20
    assert attrs["rankserve.arm"] == r.json()["arm"]
    assert attrs["rankserve.model"] == r.json()["model"]
    assert attrs["rankserve.degraded"] is False
    assert root.status.code != trace_pb2.Status.STATUS_CODE_ERROR


def test_grpc_request_joins_the_callers_trace(traced: tuple[Server, Collector], world: World) -> None:
    server, collector = traced
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb2_grpc.RankerStub(channel)
        resp = stub.Rank(
            pb2.RankRequest(user_id=world.long_user, candidates=world.known_items[:10]),
            metadata=(("traceparent", traceparent(trace_id)),), timeout=30,
        )
    assert len(resp.items) > 0
    root = check_request_trace(wait_for_trace(collector, trace_id, 1 + len(STAGES)))
    assert attributes(root)["rankserve.candidates"] == 10


def test_failed_request_span_says_why_and_logs_carry_the_trace_id(
    traced: tuple[Server, Collector], world: World
) -> None:
    server, collector = traced
    trace_id = "5b8aa5a2d2c872e8321cf37308d69df2"
    body = {"user_id": world.long_user, "candidates": world.known_items[:3], "top_n": 10_000}
    r = httpx.post(server.base_url + "/v1/rank", json=body, timeout=30, headers={"traceparent": traceparent(trace_id)})
    assert r.status_code == 422, r.text
    (root,) = wait_for_trace(collector, trace_id, 1)
    assert root.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert "top_n must be between" in root.status.message
    # the rejection is logged with the trace id, so logs and traces join up
    deadline = time.monotonic() + 10
    while not any(_log_has_trace(line, trace_id) for line in server.logs().splitlines()):
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.1)


def _log_has_trace(line: str, trace_id: str) -> bool:
    try:
        doc = json.loads(line)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("trace_id") == trace_id
