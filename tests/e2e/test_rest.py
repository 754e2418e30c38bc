"""REST over real HTTP on loopback: the rank contract, input errors, health, models, admin."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ADMIN_TOKEN, Server, World, export_bundle

pytestmark = pytest.mark.timeout(180)


def rank(server: Server, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/rank", json=body, timeout=10.0, **kwargs)


def assert_error(resp: httpx.Response, status: int, code: str, *fragments: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["code"] == code, err
    for fragment in fragments:
        assert fragment in err["message"], err
    assert err["request_id"] == resp.headers["x-request-id"]
    return dict(err)


# -- the happy path --------------------------------------------------------------------------------


def test_rank_orders_by_fused_score(live_server: Server, world: World) -> None:
    models = httpx.get(live_server.base_url + "/v1/models").json()
    weights = models["current"]["fusion"]["weights"]
    candidates = world.known_items[:40]
    resp = rank(live_server, {"user_id": world.long_user, "candidates": candidates, "top_n": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "tiny/1" and body["arm"] and body["degraded"] is False
    items = body["items"]
    assert len(items) == 10
    assert {it["item_id"] for it in items} <= set(candidates)
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    for it in items:
        assert set(it["scores"]) == {"click", "cart", "buy"}
        assert all(0.0 <= p <= 1.0 for p in it["scores"].values())
        fused = sum(weights[t] * p for t, p in it["scores"].items())
        assert it["score"] == pytest.approx(fused, rel=1e-5, abs=1e-6)
    assert "timings_ms" not in body


def test_the_heap_is_frozen_for_the_garbage_collector_once_loaded(live_server: Server) -> None:
    # the process's long-lived objects are kept out of every collection's walk (server CPU per request)
    deadline = time.monotonic() + 30
    while "heap frozen for the garbage collector" not in live_server.logs():
        assert time.monotonic() < deadline, live_server.logs()[-2000:]
        time.sleep(0.1)
    line = next(line for line in live_server.logs().splitlines() if "heap frozen" in line)
    objects = int(re.search(r'"objects": ?(\d+)', line).group(1))  # type: ignore[union-attr]
    assert objects > 10_000, line  # the modules, the model and the store client at least


def test_all_candidates_returned_when_top_n_exceeds_them(live_server: Server, world: World) -> None:
    resp = rank(live_server, {"user_id": world.long_user, "candidates": world.known_items[:5], "top_n": 50})
    assert resp.status_code == 200
    assert sorted(it["item_id"] for it in resp.json()["items"]) == sorted(world.known_items[:5])


def test_debug_adds_stage_timings(live_server: Server, world: World) -> None:
    resp = rank(live_server, {"user_id": world.long_user, "candidates": world.known_items[:8], "debug": True})
    body = resp.json()
    assert {"queue", "fetch", "retrieve", "score", "fuse", "total"} <= set(body["timings_ms"])
    assert body["debug"]["user_known"] is True and body["debug"]["history_length"] > 0


def test_request_time_is_accepted(live_server: Server, world: World) -> None:
    body = {"user_id": world.long_user, "candidates": world.known_items[:5], "request_time": 1_690_000_000}
    assert rank(live_server, body).status_code == 200


def test_debug_reports_the_history_the_rank_searched(live_server: Server, world: World) -> None:
    """A rank at a past request_time searches only the behaviours before it, and says so."""
    body = {"user_id": world.long_user, "candidates": world.known_items[:3], "debug": True}
    now = rank(live_server, body).json()["debug"]
    assert now["history_length"] > 0 and now["history_newest_ts"] is not None
    before_all = rank(live_server, {**body, "request_time": 1}).json()["debug"]
    assert (before_all["history_length"], before_all["history_newest_ts"]) == (0, None)
    middle = rank(live_server, {**body, "request_time": now["history_newest_ts"]}).json()["debug"]
    assert 0 < middle["history_length"] < now["history_length"]
    assert middle["history_newest_ts"] < now["history_newest_ts"]


def test_unknown_user_is_cold_start(live_server: Server, world: World) -> None:
    resp = rank(live_server, {"user_id": world.unknown_user, "candidates": world.known_items[:5], "debug": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["degraded"] is False and len(body["items"]) == 5
    assert body["debug"]["user_known"] is False


def test_unknown_items_are_ranked(live_server: Server, world: World) -> None:
    candidates = [world.unknown_item, world.unknown_item + 1, *world.known_items[:3]]
    resp = rank(live_server, {"user_id": world.long_user, "candidates": candidates})
    assert resp.status_code == 200, resp.text
    assert sorted(it["item_id"] for it in resp.json()["items"]) == sorted(candidates)


def test_empty_candidates(live_server: Server, world: World) -> None:
    resp = rank(live_server, {"user_id": world.long_user, "candidates": []})
    assert resp.status_code == 200, resp.text
    assert resp.json()["items"] == []


def test_request_id_is_echoed(live_server: Server, world: World) -> None:
    resp = rank(live_server, {"user_id": 1, "candidates": [1]}, headers={"X-Request-ID": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123" and resp.json()["request_id"] == "abc-123"
    resp = rank(live_server, {"user_id": 1, "candidates": [1]}, headers={"X-Request-ID": "bad id\twith spaces"})
    generated = resp.headers["x-request-id"]
    assert generated != "bad id\twith spaces" and resp.json()["request_id"] == generated
    resp = rank(live_server, {"user_id": 1, "candidates": [1]})
    assert len(resp.headers["x-request-id"]) == 32


# -- bad input: always a 4xx envelope that names the problem, never a 500 ----------------------------


def test_too_many_candidates_names_the_limit(live_server: Server) -> None:
    resp = rank(live_server, {"user_id": 1, "candidates": list(range(201))})
    assert_error(resp, 422, "invalid_request", "201 candidates", "limit of 200")


def test_top_n_over_the_limit(live_server: Server) -> None:
    assert_error(rank(live_server, {"user_id": 1, "candidates": [1], "top_n": 101}), 422, "invalid_request", "100")
    assert_error(rank(live_server, {"user_id": 1, "candidates": [1], "top_n": 0}), 422, "invalid_request", "top_n")


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"user_id": "abc", "candidates": [1]}, ["user_id", "integer", "'abc'"]),  # this model's ids are integers
        ({"user_id": 1, "candidates": [1, "sku-2"]}, ["candidates[1]", "'sku-2'"]),
        ({"user_id": "", "candidates": [1]}, ["body.user_id", "at least 1 character"]),
        ({"user_id": 4.0, "candidates": [1]}, ["body.user_id", "integers in 0..", "or strings", "(got 4.0)"]),
        ({"user_id": 1, "candidates": [1.5, 2]}, ["body.candidates.0"]),
        ({"user_id": 1, "candidates": [1.0]}, ["body.candidates.0"]),
        ({"user_id": 1, "candidates": "1,2"}, ["body.candidates", "list"]),
        ({"user_id": 1, "candidates": [True]}, ["body.candidates.0"]),
        ({"user_id": 1}, ["body.candidates", "required"]),
        ({"candidates": [1]}, ["body.user_id", "required"]),
        ({"user_id": None, "candidates": [1]}, ["body.user_id"]),
        ({"user_id": -1, "candidates": [1]}, ["body.user_id", "greater than or equal to 0"]),
        ({"user_id": 2**63, "candidates": [1]}, ["body.user_id", "less than or equal to"]),
        ({"user_id": 1, "candidates": [1], "debug": "yes"}, ["body.debug", "boolean"]),
        ({"user_id": 1, "candidates": [1], "top_n": "5"}, ["body.top_n"]),
        ({"user_id": 1, "candidates": [1], "topN": 5}, ["body.topN", "Extra inputs"]),
        ([1, 2, 3], ["body", "object"]),
    ],
)
def test_wrong_types_are_422(live_server: Server, body: Any, fragments: list[str]) -> None:
    assert_error(rank(live_server, body), 422, "invalid_request", *fragments)


def test_candidate_id_out_of_int64_range(live_server: Server) -> None:
    assert_error(rank(live_server, {"user_id": 1, "candidates": [2**64]}), 422, "invalid_request", "candidate")


# -- ids as integers or strings, request context -------------------------------------------------------


def test_string_ids_are_read_as_this_models_integer_ids_and_echoed_as_sent(live_server: Server, world: World) -> None:
    known = world.known_items[:6]
    as_ints = rank(live_server, {"user_id": world.long_user, "candidates": known, "top_n": 6}).json()
    mixed = [str(x) for x in known[:3]] + known[3:]
    resp = rank(live_server, {"user_id": str(world.long_user), "candidates": mixed, "top_n": 6})
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    sent = {str(x): x for x in mixed}
    for it in items:  # each id comes back with the JSON type it was sent with
        assert it["item_id"] == sent[str(it["item_id"])] and type(it["item_id"]) is type(sent[str(it["item_id"])])
    # "42" and 42 are the same id to an integer-id model: the same ranking and scores
    assert [str(it["item_id"]) for it in items] == [str(it["item_id"]) for it in as_ints["items"]]
    assert [it["score"] for it in items] == pytest.approx([it["score"] for it in as_ints["items"]])


@pytest.mark.parametrize(
    "context",
    [
        {"device": "ios"},  # the tiny model declares no context features: every name is unknown
        {"hour": True},
        {"hour": "13"},
        {"device": {"os": "ios"}},
        {"device": "x" * 300},
    ],
)
def test_context_the_model_does_not_declare_is_422(live_server: Server, world: World, context: Any) -> None:
    name = next(iter(context))
    resp = rank(live_server, {"user_id": world.long_user, "candidates": world.known_items[:3], "context": context})
    assert_error(resp, 422, "invalid_request", f"context.{name}", "unknown context feature")


def test_empty_or_null_context_is_fine(live_server: Server, world: World) -> None:
    for context in ({}, None):
        resp = rank(live_server, {"user_id": world.long_user, "candidates": world.known_items[:3], "context": context})
        assert resp.status_code == 200, resp.text


def test_context_must_be_an_object(live_server: Server, world: World) -> None:
    resp = rank(live_server, {"user_id": world.long_user, "candidates": [1], "context": "ios"})
    assert_error(resp, 422, "invalid_request", "body.context")


@pytest.mark.parametrize("raw", [b'{"user_id": 1,', b"not json", b"", b'{"user_id": 1, "candidates": [1]} trailing'])
def test_malformed_json(live_server: Server, raw: bytes) -> None:
    resp = httpx.post(
        live_server.base_url + "/v1/rank", content=raw, headers={"content-type": "application/json"}, timeout=10
    )
    assert_error(resp, 422, "invalid_request", "JSON" if raw else "body")


@pytest.mark.parametrize("raw", [b'{"user_id": 1, "candidates": ["\\ud800", "a"]}',
                                 b'{"user_id": "\\udfff", "candidates": [1]}',
                                 b'{"user_id": 1, "candidates": [1], "context": {"\\ud800": "x"}}'])
def test_a_lone_surrogate_is_422_not_500(live_server: Server, raw: bytes) -> None:
    """Valid JSON, not valid Unicode: no id, name or error message can be encoded from it."""
    resp = httpx.post(
        live_server.base_url + "/v1/rank", content=raw, headers={"content-type": "application/json"}, timeout=10
    )
    assert_error(resp, 422, "invalid_request", "surrogate")


def test_missing_content_type_says_what_to_send(live_server: Server) -> None:
    resp = httpx.post(live_server.base_url + "/v1/rank", content=b'{"user_id": 1, "candidates": [1]}',
                      headers={"content-type": "text/plain"}, timeout=10)
    assert_error(resp, 422, "invalid_request", "application/json")


def test_body_over_the_limit_is_413(live_server: Server) -> None:
    big = b'{"user_id": 1, "candidates": [' + b",".join([b"1234567"] * 20_000) + b"]}"
    resp = httpx.post(live_server.base_url + "/v1/rank", content=big, headers={"content-type": "application/json"})
    assert_error(resp, 413, "payload_too_large", "65536 bytes")

    def chunks() -> Any:  # no Content-Length: the limit applies while reading
        for _ in range(20):
            yield b" " * 8192

    resp = httpx.post(live_server.base_url + "/v1/rank", content=chunks(), headers={"content-type": "application/json"})
    assert_error(resp, 413, "payload_too_large")


def test_unknown_route_and_method(live_server: Server) -> None:
    assert_error(httpx.get(live_server.base_url + "/v1/nope"), 404, "not_found")
    assert_error(httpx.get(live_server.base_url + "/v1/rank"), 405, "method_not_allowed")


# -- health, metrics, models --------------------------------------------------------------------------


def test_health_endpoints(live_server: Server) -> None:
    assert httpx.get(live_server.base_url + "/livez").json() == {"status": "alive"}
    ready = httpx.get(live_server.base_url + "/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["model"] == "tiny/1" and body["store"]["ok"] is True


def test_metrics_are_prometheus_text(live_server: Server, world: World) -> None:
    rank(live_server, {"user_id": world.long_user, "candidates": world.known_items[:5]})
    resp = httpx.get(live_server.base_url + "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert 'rankserve_stage_seconds_bucket{le="0.0005",stage="fetch"}' in text
    assert 'rankserve_requests_total{code="ok",transport="rest"}' in text
    assert 'rankserve_requests_total{code="invalid_request",transport="rest"}' in text
    assert 'rankserve_model_info{name="tiny",version="1"} 1.0' in text


def test_models_lists_current_and_loaded(live_server: Server) -> None:
    body = httpx.get(live_server.base_url + "/v1/models").json()
    assert body["current"]["key"] == "tiny/1"
    assert body["current"]["tasks"] == ["click", "cart", "buy"]
    assert body["current"]["actions"] == ["click", "cart", "fav", "buy"]  # what POST /v1/events takes
    assert (body["current"]["runtime"], body["current"]["scorer_runtime"]) == ("onnx", "onnx")
    assert "scorer_quantization" in body["current"] and body["current"]["scorer_quantization"] is None
    assert [m["key"] for m in body["loaded"]] == ["tiny/1"]
    assert body["refused"] == []


def test_openapi_documents_the_schemas(live_server: Server) -> None:
    spec = httpx.get(live_server.base_url + "/openapi.json").json()
    op = spec["paths"]["/v1/rank"]["post"]
    examples = op["requestBody"]["content"]["application/json"]["examples"]
    assert {"basic", "string_ids", "context"} <= set(examples)
    assert examples["context"]["value"]["context"] == {"device": "ios", "hour": 13}
    schemas = spec["components"]["schemas"]
    assert {"RankRequest", "RankResponse", "ErrorResponse"} <= set(schemas)
    request = schemas["RankRequest"]["properties"]
    id_types = {"integer", "string"}
    assert {branch["type"] for branch in request["user_id"]["anyOf"]} == id_types
    assert {branch["type"] for branch in request["candidates"]["items"]["anyOf"]} == id_types
    assert {branch["type"] for branch in request["context"]["anyOf"]} == {"object", "null"}
    assert {branch["type"] for branch in schemas["RankedItem"]["properties"]["item_id"]["anyOf"]} == id_types


# -- admin ------------------------------------------------------------------------------------------


def test_admin_reload_requires_the_token(live_server: Server) -> None:
    url = live_server.base_url + "/v1/admin/reload"
    assert_error(httpx.post(url), 401, "unauthorized", "Bearer")
    assert_error(httpx.post(url, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert_error(httpx.post(url, headers={"Authorization": f"Basic {ADMIN_TOKEN}"}), 401, "unauthorized")
    ok = httpx.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"model": "tiny/1", "previous": "tiny/1"}
    missing = httpx.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, json={"version": 7}, timeout=60)
    assert_error(missing, 409, "bundle_rejected", "no version 7")
    assert_error(httpx.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, json={"version": "7"}),
                 422, "invalid_request", "body.version")


# -- readiness and the no-model state (own servers) ---------------------------------------------------


def test_readiness_flips_only_after_load(make_server: Any, world: World, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    server = make_server(model_dir)
    server.wait_http()
    ready = httpx.get(server.base_url + "/readyz")
    assert ready.status_code == 503
    assert "no model" in ready.json()["reason"]
    assert httpx.get(server.base_url + "/livez").status_code == 200
    assert_error(rank(server, {"user_id": world.long_user, "candidates": [1, 2]}), 503, "model_unavailable")
    assert httpx.get(server.base_url + "/v1/models").json()["current"] is None
    # admin is disabled on this server (no token configured): 404, whatever is sent
    resp = httpx.post(server.base_url + "/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert_error(resp, 404, "not_found", "RANKSERVE_ADMIN_TOKEN")

    export_bundle(world, model_dir)  # the poller picks it up, loads and warms it up
    server.wait_ready(timeout=60)
    resp = rank(server, {"user_id": world.long_user, "candidates": world.known_items[:5]})
    assert resp.status_code == 200 and resp.json()["model"] == "tiny/1"
    assert server.stop() == 0
    assert "unhandled error" not in server.logs()


def test_store_down_means_not_ready_but_ranking_degrades(make_server: Any, world: World, tmp_path: Path) -> None:
    from feature_store.embedded import free_port

    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    server = make_server(model_dir, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                         RANKSERVE_FEATURE_STORE__REQUEST_TIMEOUT_S="0.2")
    server.wait_http()
    deadline_body: dict[str, Any] = {}
    for _ in range(300):  # the model loads even though the store is down
        deadline_body = httpx.get(server.base_url + "/readyz").json()
        if deadline_body["model"]:
            break
        time.sleep(0.1)
    assert deadline_body["ready"] is False and "feature store" in deadline_body["reason"], deadline_body
    resp = rank(server, {"user_id": world.long_user, "candidates": world.known_items[:5]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["degraded"] is True and len(resp.json()["items"]) == 5
    assert server.stop() == 0


def test_two_workers_share_both_ports(make_server: Any, world: World, tmp_path: Path) -> None:
    import grpc

    from service.transports.grpc.server import pb2, pb2_grpc

    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    server = make_server(model_dir, RANKSERVE_WORKERS="2")
    server.wait_ready(timeout=120)
    # From the first ready answer on, every request is answered in full, also while the other
    # worker is still loading: a worker takes no connection before its first load is over.
    body = {"user_id": world.long_user, "candidates": world.known_items[:5]}
    statuses: list[int] = []
    deadline = time.monotonic() + 120
    while server.logs().count("initial model loaded") < 2 and time.monotonic() < deadline:
        statuses.append(rank(server, body, headers={"Connection": "close"}).status_code)
    assert server.logs().count("initial model loaded") == 2, server.logs()[-4000:]
    for _ in range(10):  # a new connection each time: the kernel hands them to either worker
        statuses.append(rank(server, body, headers={"Connection": "close"}).status_code)
    assert set(statuses) == {200}, statuses
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = pb2_grpc.RankerStub(channel).Rank(pb2.RankRequest(**body), timeout=10)
    assert reply.model == "tiny/1" and len(reply.items) == 5
    assert server.stop() == 0
    logs = server.logs()
    assert logs.count("serving core closed") == 2 and "unhandled error" not in logs
