"""Request limits at their edges, over REST and gRPC (tests/e2e/test_rest.py and test_grpc.py
cover the plain over-limit cases): exactly at each limit is accepted, one past it is refused with
a message naming the limit; ids too long to be int64 (huge integer literals), deeply nested
JSON and over-long request ids are refused or replaced, never a 5xx."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import Server, World
from tests.e2e.test_rest import assert_error, rank

pytestmark = pytest.mark.timeout(120)

MAX_CANDIDATES, MAX_TOP_N = 200, 100  # the live_server's settings


def raw_rank(server: Server, body: bytes) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/rank", content=body, headers={"content-type": "application/json"},
                      timeout=10)


def test_exactly_at_the_limits_is_accepted(live_server: Server, world: World) -> None:
    candidates = [*world.known_items, *range(10**12, 10**12 + MAX_CANDIDATES - len(world.known_items))]
    assert len(candidates) == MAX_CANDIDATES
    resp = rank(live_server, {"user_id": 2**63 - 1, "candidates": candidates, "top_n": MAX_TOP_N})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["items"]) == MAX_TOP_N
    over = rank(live_server, {"user_id": 1, "candidates": [*candidates, 1], "top_n": MAX_TOP_N})
    assert_error(over, 422, "invalid_request", f"{MAX_CANDIDATES + 1} candidates", f"limit of {MAX_CANDIDATES}")
    assert_error(rank(live_server, {"user_id": 1, "candidates": [1], "top_n": MAX_TOP_N + 1}), 422,
                 "invalid_request", "top_n", str(MAX_TOP_N))


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"user_id": ' + b"9" * 400 + b', "candidates": [1]}', "body.user_id"),
        # past Python's 4,300-digit limit the JSON parser itself refuses the number
        (b'{"user_id": 1, "candidates": [' + b"9" * 5000 + b"]}", "too many digits"),
        (b'{"user_id": 1, "candidates": [-' + b"9" * 30 + b"]}", "candidate"),
        (b'{"user_id": 1e400, "candidates": [1]}', "body.user_id"),
        (b'{"user_id": 1, "candidates": [1], "top_n": ' + b"9" * 100 + b"}", "top_n"),
        (b'{"user_id": 1, "candidates": [1], "request_time": ' + b"9" * 100 + b"}", "request_time"),
    ],
)
def test_ids_too_long_for_int64(live_server: Server, raw: bytes, fragment: str) -> None:
    err = assert_error(raw_rank(live_server, raw), 422, "invalid_request", fragment)
    assert len(err["message"]) < 500, "the message quotes the input only briefly"


@pytest.mark.parametrize("depth", [100, 5_000, 20_000])
def test_deeply_nested_json(live_server: Server, depth: int) -> None:
    body = b'{"user_id": 1, "candidates": ' + b"[" * depth + b"]" * depth + b"}"
    assert_error(raw_rank(live_server, body), 422, "invalid_request")


@pytest.mark.parametrize(("given", "kept"), [("a" * 128, True), ("a" * 129, False), ("x" * 8000, False)])
def test_request_id_length(live_server: Server, given: str, kept: bool) -> None:
    resp = rank(live_server, {"user_id": 1, "candidates": [1]}, headers={"X-Request-ID": given})
    assert resp.status_code == 200
    assert (resp.headers["x-request-id"] == given) is kept
    assert len(resp.headers["x-request-id"]) <= 128


def test_grpc_at_the_limits(live_server: Server, world: World) -> None:
    candidates = [*world.known_items, *range(10**12, 10**12 + MAX_CANDIDATES - len(world.known_items))]
    with grpc.insecure_channel(live_server.grpc_target) as channel:
        stub = pb2_grpc.RankerStub(channel)
        resp = stub.Rank(pb2.RankRequest(user_id=2**63 - 1, candidates=candidates, top_n=MAX_TOP_N), timeout=10)
        assert len(resp.items) == MAX_TOP_N
        cases: list[tuple[dict[str, Any], str]] = [
            ({"user_id": 1, "candidates": [*candidates, 1]}, f"limit of {MAX_CANDIDATES}"),
            ({"user_id": 1, "candidates": [1], "top_n": MAX_TOP_N + 1}, f"top_n must be between 1 and {MAX_TOP_N}"),
            ({"user_id": -(2**63), "candidates": [1]}, "user_id must be an integer"),
            ({"user_id": 1, "candidates": [-(2**63)]}, "candidate ids must be integers"),
            ({"user_id": 1, "candidates": [1], "request_time": 2**63 - 1}, "request_time"),
        ]
        for fields, fragment in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Rank(pb2.RankRequest(**fields), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in (info.value.details() or ""), info.value
        long_id = (("x-request-id", "r" * 129),)
        _, call = stub.Rank.with_call(pb2.RankRequest(user_id=1, candidates=[1]), timeout=10, metadata=long_id)
        assert dict(call.initial_metadata())["x-request-id"] != "r" * 129
