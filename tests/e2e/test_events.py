"""Fresh behaviour end to end: `POST /v1/events` and gRPC `PushEvents` on a real server, a real
`rankserve consume` process, and the next rank of the user searching the new events.

A private embedded Valkey holds the tiny data set (appends change histories, so the session's
shared store stays untouched).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from feature_store.embedded import EmbeddedValkey, free_port
from feature_store.redis_store import create_store
from feature_store.store import EmbeddedConfig, FeatureStoreConfig
from ingest.bulk import clusterer_from_bundle, ingest_log
from tests.e2e.conftest import EVENTS_TOKEN, FEATURE_VERSION, REPO, Server, World, export_bundle, tiny_event_log

SHARDS = "4"


@pytest.fixture
def private_store(world: World) -> Iterator[str]:
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:

        async def ingest() -> None:
            async with create_store(FeatureStoreConfig(url=valkey.url)) as store:
                await ingest_log(store, tiny_event_log(world.schema), world.schema, FEATURE_VERSION, activate=True,
                                 clusterer=clusterer_from_bundle(world.bundle_src))  # clusters the long user

        asyncio.run(ingest())
        yield valkey.url


@pytest.fixture
def consumer(private_store: str, world: World, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    log_path = tmp_path / "consume.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "consume", "--redis-url", private_store, "--shards", SHARDS,
             "--metrics-port", str(port), "--lease-ms", "1000", "--cluster-bundle", str(world.bundle_src)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            yield proc, port, log_path
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def server(world: World, private_store: str, tmp_path: Path) -> Iterator[Server]:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    env = {"RANKSERVE_EVENTS_TOKEN": EVENTS_TOKEN, "RANKSERVE_EVENT_SHARDS": SHARDS}
    srv = Server(model_dir, private_store, tmp_path / "server.log", env).start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.logs()[-4000:]
        assert "unhandled error" not in srv.logs()


def newest(server: Server, user: int) -> tuple[int | None, int]:
    body = httpx.post(server.base_url + "/v1/rank", json={"user_id": user, "candidates": [1, 2], "debug": True},
                      timeout=10).json()
    return body["debug"]["history_newest_ts"], body["debug"]["history_length"]


def wait_for(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def post(server: Server, events: list[dict[str, Any]], token: str | None = EVENTS_TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"} if token else {
        "content-type": "application/json"}
    # ASCII JSON: a lone surrogate travels as its \\u escape, as a client's JSON encoder sends it
    return httpx.post(server.base_url + "/v1/events", content=json.dumps({"events": events}).encode(),
                      headers=headers, timeout=10)


def test_posted_and_pushed_events_reach_the_next_rank(
    server: Server, consumer: tuple[subprocess.Popen[bytes], int, Path], world: World
) -> None:
    proc, metrics_port, log_path = consumer
    user, item = world.long_user, world.known_items[0]
    before_ts, before_len = newest(server, user)
    assert before_ts is not None
    t = before_ts + 100
    r = post(server, [{"event_id": "rest-1", "user_id": user, "item_id": item, "action": "buy", "timestamp": t}])
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1}
    wait_for(lambda: newest(server, user)[0] == t)
    assert newest(server, user)[1] in (before_len, before_len + 1)  # + 1, unless the history is at its cap

    # the same event again (a producer's retry) changes nothing; a new user gets a history
    assert post(server, [{"event_id": "rest-1", "user_id": user, "item_id": item, "action": "buy",
                          "timestamp": t}]).status_code == 202
    fresh = world.unknown_user
    assert newest(server, fresh) == (None, 0)

    from service.transports.grpc.server import pb2, pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb2_grpc.RankerStub(channel)
        reply = stub.PushEvents(
            pb2.PushEventsRequest(events=[pb2.Event(event_id="grpc-1", user_id=fresh, item_id=item, action="click",
                                                    timestamp=t + 1)]),
            metadata=(("authorization", f"Bearer {EVENTS_TOKEN}"),), timeout=10)
        assert reply.accepted == 1
        with pytest.raises(grpc.RpcError) as refused:
            stub.PushEvents(pb2.PushEventsRequest(events=[pb2.Event(event_id="g", user_id=1, action="teleport",
                                                                    timestamp=1)]),
                            metadata=(("authorization", f"Bearer {EVENTS_TOKEN}"),), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "events[0]" in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as unauthenticated:
            stub.PushEvents(pb2.PushEventsRequest(), timeout=10)
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # rankserve_requests_total counts rank requests: the pushes (accepted, invalid, unauthenticated) are not in it
    served = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert 'rankserve_requests_total{code="unauthenticated",transport="grpc"}' not in served
    assert 'rankserve_requests_total{code="invalid_request",transport="grpc"}' not in served
    wait_for(lambda: newest(server, fresh) == (t + 1, 1))
    assert newest(server, user)[0] == t  # the repeated id was not appended again

    def counted() -> bool:  # the counters move just after the appends they count
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        return all(line in metrics for line in ('rankserve_consumer_events_total{outcome="appended"} 2.0',
                                                'rankserve_consumer_events_total{outcome="duplicate"} 1.0',
                                                # the long user's event joined its nearest cluster
                                                'rankserve_consumer_cluster_ids_total{outcome="assigned"} 1.0',
                                                'rankserve_consumer_cluster_ids_total{outcome="no_clustering"} 1.0',
                                                "rankserve_consumer_shards_owned 4.0",
                                                'rankserve_consumer_lag{stream="rs:ev:{s0}"}',
                                                'rankserve_consumer_pending{stream="rs:ev:{s0}"}'))

    wait_for(counted)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log_path.read_text()[-3000:]
    assert "consumer stopped" in log_path.read_text()


@pytest.mark.parametrize(
    ("event", "token", "status", "needle"),
    [
        ({"event_id": "a", "user_id": 1, "item_id": 2, "action": "teleport", "timestamp": 1}, EVENTS_TOKEN, 422,
         "events[0]: action 'teleport'"),
        ({"event_id": "a", "user_id": 1, "item_id": 2, "action": "buy", "timestamp": -1}, EVENTS_TOKEN, 422,
         "timestamp"),
        ({"event_id": "", "user_id": 1, "item_id": 2, "action": "buy", "timestamp": 1}, EVENTS_TOKEN, 422,
         "event_id"),
        ({"event_id": "a", "user_id": "x", "item_id": 2, "action": "buy", "timestamp": 1}, EVENTS_TOKEN, 422,
         "user_id"),
        ({"event_id": "a", "user_id": 1, "item_id": 2, "action": "buy", "timestamp": 1, "extra": 1}, EVENTS_TOKEN, 422,
         "extra"),
        ({"event_id": "a\ud800", "user_id": 1, "item_id": 2, "action": "buy", "timestamp": 1}, EVENTS_TOKEN, 422,
         "events.0.event_id: Input should be a valid string"),  # a lone surrogate: no id can encode it
        ({"event_id": "a", "user_id": "\udfff", "item_id": 2, "action": "buy", "timestamp": 1}, EVENTS_TOKEN, 422,
         "events.0.user_id: Input should be a valid string"),
        ({"event_id": "a", "user_id": 1, "item_id": 2, "action": "buy", "timestamp": 1}, "wrong", 401, "events token"),
        ({"event_id": "a", "user_id": 1, "item_id": 2, "action": "buy", "timestamp": 1}, None, 401, "events token"),
    ],
)
def test_bad_event_batches_are_refused_naming_the_field(
    server: Server, event: dict[str, Any], token: str | None, status: int, needle: str
) -> None:
    r = post(server, [event], token)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_event_endpoints_are_off_without_a_token(world: World, private_store: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    srv = Server(model_dir, private_store, tmp_path / "server.log").start()
    try:
        srv.wait_ready()
        r = post(srv, [{"event_id": "a", "user_id": 1, "item_id": 2, "action": "buy", "timestamp": 1}])
        assert r.status_code == 404
        assert "RANKSERVE_EVENTS_TOKEN" in r.json()["error"]["message"]
    finally:
        assert srv.stop() == 0


@pytest.mark.timeout(600)
def test_events_endpoint_fuzz(server: Server) -> None:
    """schemathesis on POST /v1/events with the events token: no 5xx, documented answers, bad input refused."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import CHECKS as REGISTRY
    from schemathesis.checks import load_all_checks

    from tests.e2e.test_fuzz_rest import CHECKS

    load_all_checks()
    checks = REGISTRY.get_by_names(CHECKS)
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", timeout=10)
    operation = schema["/v1/events"]["POST"]
    statuses: dict[int, int] = {}

    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @settings(max_examples=150, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def one(case: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {EVENTS_TOKEN}"}
            response = case.call_and_validate(base_url=server.base_url, checks=checks, timeout=10)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        one()
    print(f"\n/v1/events fuzz statuses: {dict(sorted(statuses.items()))}")
    assert not any(code >= 500 for code in statuses)
    assert statuses.get(202, 0) > 0 and statuses.get(422, 0) > 0


def test_a_caller_without_the_token_learns_nothing_about_the_body(server: Server) -> None:
    r = httpx.post(server.base_url + "/v1/events", json={"events": "not a list", "extra": 1}, timeout=10)
    assert r.status_code == 401, r.text


def test_a_history_past_its_cap_is_searched_as_its_newest_cap(world: World, private_store: str,
                                                               tmp_path: Path) -> None:
    """The store trims capped sequences lazily: a user may hold a few events past the schema's
    `max_length`. The rank searches the newest `max_length`, as the model's training samples did,
    even when the service reads more (a store read limit above the cap)."""
    import numpy as np
    import redis

    from feature_store import keys
    from feature_store.codecs import SEQ_RECORD_SIZE, encode_sequence

    cap = world.schema.spec.max_sequence_length
    client = redis.Redis.from_url(private_store)
    key = keys.sequence_key(FEATURE_VERSION, world.long_user)
    stored = client.get(key)
    assert stored is not None and len(stored) // SEQ_RECORD_SIZE < cap
    older = cap  # events older than every stored one, so that the newest `cap` hold some of them
    dense = np.arange(older)  # the store holds dense indices: items 1..50, categories 1..12
    junk = encode_sequence(dense % 50 + 1, dense % 12 + 1, dense % 4, 1_000_000 + dense)
    client.set(key, junk + stored)  # cap + the user's own events: past the cap
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    srv = Server(model_dir, private_store, tmp_path / "server.log",
                 {"RANKSERVE_FEATURE_STORE__MAX_SEQUENCE_LENGTH": str(2 * cap)}).start()
    body = {"user_id": world.long_user, "candidates": world.known_items[:20], "debug": True}
    try:
        srv.wait_ready()
        past = httpx.post(srv.base_url + "/v1/rank", json=body, timeout=10).json()
        client.set(key, (junk + stored)[-cap * SEQ_RECORD_SIZE :])  # what a trim to the cap leaves
        trimmed = httpx.post(srv.base_url + "/v1/rank", json=body, timeout=10).json()
    finally:
        assert srv.stop() == 0
        client.close()
    assert past["debug"]["history_length"] == trimmed["debug"]["history_length"] == cap
    assert past["items"] == trimmed["items"]
