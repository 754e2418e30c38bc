"""gRPC over loopback: Rank, status codes for bad input, health, reflection, request ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import Server, World, export_bundle

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def channel(live_server: Server) -> Any:
    with grpc.insecure_channel(live_server.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def call_rank(channel: grpc.Channel, metadata: Any = None, **fields: Any) -> Any:
    stub = pb2_grpc.RankerStub(channel)
    return stub.Rank.with_call(pb2.RankRequest(**fields), timeout=10, metadata=metadata)


def rpc_error(channel: grpc.Channel, **fields: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call_rank(channel, **fields)
    return info.value


def test_rank_happy_path(channel: grpc.Channel, world: World) -> None:
    resp, call = call_rank(channel, user_id=world.long_user, candidates=world.known_items[:30], top_n=7)
    assert resp.model == "tiny/1" and resp.arm and not resp.degraded
    assert len(resp.items) == 7
    scores = [it.score for it in resp.items]
    assert scores == sorted(scores, reverse=True)
    for it in resp.items:
        assert set(it.scores) == {"click", "cart", "buy"}
        assert all(0.0 <= p <= 1.0 for p in it.scores.values())
    assert not resp.timings_ms and not resp.HasField("debug")
    rid = dict(call.initial_metadata())["x-request-id"]
    assert resp.request_id == rid and len(rid) == 32


def test_rank_matches_rest(channel: grpc.Channel, live_server: Server, world: World) -> None:
    import httpx

    body = {"user_id": world.long_user, "candidates": world.known_items[10:30], "top_n": 5,
            "request_time": 1_700_000_000}
    rest = httpx.post(live_server.base_url + "/v1/rank", json=body).json()
    resp, _ = call_rank(channel, **body)
    assert [it.item_id for it in resp.items] == [it["item_id"] for it in rest["items"]]
    assert [it.score for it in resp.items] == pytest.approx([it["score"] for it in rest["items"]])


def test_request_id_metadata_is_echoed(channel: grpc.Channel, world: World) -> None:
    resp, call = call_rank(channel, metadata=(("x-request-id", "grpc-req-1"),), user_id=1, candidates=[1, 2])
    assert resp.request_id == "grpc-req-1"
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-req-1"


def test_debug_fills_timings(channel: grpc.Channel, world: World) -> None:
    resp, _ = call_rank(channel, user_id=world.long_user, candidates=world.known_items[:5], debug=True)
    assert {"queue", "fetch", "retrieve", "score", "fuse", "total"} <= set(resp.timings_ms)
    assert resp.debug["user_known"] is True


def test_cold_start_unknown_items_and_empty(channel: grpc.Channel, world: World) -> None:
    resp, _ = call_rank(channel, user_id=world.unknown_user, candidates=[world.unknown_item, *world.known_items[:3]])
    assert len(resp.items) == 4 and not resp.degraded
    resp, _ = call_rank(channel, user_id=world.long_user, candidates=[])
    assert list(resp.items) == []


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"user_id": 1, "candidates": list(range(201))}, "limit of 200"),
        ({"user_id": -5, "candidates": [1]}, "user_id must be an integer"),
        ({"user_id": 1, "candidates": [-1]}, "candidate ids must be integers"),
        ({"user_id": 1, "candidates": [1], "top_n": 0}, "top_n must be between 1 and 100"),
        ({"user_id": 1, "candidates": [1], "top_n": 101}, "top_n must be between 1 and 100"),
        ({"user_id": 1, "candidates": [1], "request_time": -1}, "request_time"),
    ],
)
def test_bad_input_is_invalid_argument(channel: grpc.Channel, fields: dict[str, Any], fragment: str) -> None:
    err = rpc_error(channel, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert fragment in (err.details() or "")


def test_string_keys_are_accepted_and_echoed(channel: grpc.Channel, world: World) -> None:
    known = world.known_items[:6]
    ints, _ = call_rank(channel, user_id=world.long_user, candidates=known, top_n=6)
    keys, _ = call_rank(channel, user_key=str(world.long_user), candidate_keys=[str(x) for x in known], top_n=6)
    assert [it.item_key for it in keys.items] == [str(it.item_id) for it in ints.items]
    assert all(it.item_id == 0 for it in keys.items) and all(it.item_key == "" for it in ints.items)
    assert [it.score for it in keys.items] == pytest.approx([it.score for it in ints.items])


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"user_id": 1, "user_key": "1", "candidates": [1]}, "user_id or user_key"),
        ({"user_id": 1, "candidates": [1], "candidate_keys": ["1"]}, "candidates or candidate_keys"),
        ({"user_key": "u-1", "candidates": [1]}, "user_id 'u-1' is not an integer"),
        ({"user_id": 1, "candidate_keys": ["1", "sku-2"]}, "candidates[1]"),
        ({"user_id": 1, "candidates": [1], "context": {"device": "ios"}}, "context.device: unknown"),
        ({"user_id": 1, "candidates": [1], "context": {"hour": True}}, "context.hour"),
        ({"user_id": 1, "candidates": [1], "context": {"hour": "13"}}, "context.hour"),
        ({"user_id": 1, "candidates": [1], "context": {"device": {"os": "ios"}}}, "context.device"),
        ({"user_id": 1, "candidates": [1], "context": {"device": "x" * 300}}, "context.device"),
    ],
)
def test_bad_ids_and_context_are_invalid_argument(channel: grpc.Channel, fields: dict[str, Any], fragment: str) -> None:
    err = rpc_error(channel, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert fragment in (err.details() or ""), err.details()


def test_empty_context_is_fine(channel: grpc.Channel, world: World) -> None:
    resp, _ = call_rank(channel, user_id=world.long_user, candidates=world.known_items[:3], context={})
    assert len(resp.items) == 3


def test_undecodable_message_is_invalid_argument(channel: grpc.Channel) -> None:
    raw = channel.unary_unary("/rankserve.v1.Ranker/Rank")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff\xff\x0f", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode" in (info.value.details() or "")


def test_message_over_the_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    err = rpc_error(channel, user_id=1, candidates=list(range(2**40, 2**40 + 20_000)))  # > 64 KiB
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_is_serving(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "rankserve.v1.Ranker"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=5)))
    names = {s.name for s in resp.list_services_response.service}
    assert {"rankserve.v1.Ranker", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_no_model_is_unavailable_then_serving(make_server: Any, world: World, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    server = make_server(model_dir)
    server.wait_http()
    with grpc.insecure_channel(server.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        health = health_pb2_grpc.HealthStub(ch)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        err = rpc_error(ch, user_id=world.long_user, candidates=[1, 2])
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "no model" in (err.details() or "")

        export_bundle(world, model_dir)
        server.wait_ready()
        # health follows readiness within the monitor interval
        watch = health.Watch(health_pb2.HealthCheckRequest(service="rankserve.v1.Ranker"), timeout=10)
        for update in watch:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                break
        resp, _ = call_rank(ch, user_id=world.long_user, candidates=world.known_items[:3])
        assert resp.model == "tiny/1"
    assert server.stop() == 0
