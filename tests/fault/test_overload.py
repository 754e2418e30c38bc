"""Overload: with a slow feature store and a burst of concurrent requests beyond
RANKSERVE_MAX_WAITING_REQUESTS, the excess is refused at once, over REST with 503 and
Retry-After, over gRPC with RESOURCE_EXHAUSTED; the admitted requests are ranked; nothing fails
with a 500."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import Server, World, export_bundle
from tests.fault.proxy import LatencyProxy

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]

BOUND = 2
BURST_REST, BURST_GRPC = 16, 8


async def test_burst_beyond_the_bound_is_shed_with_retry_after(make_server: Any, world: World, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    upstream = int(world.redis_url.rsplit(":", 1)[1].split("/")[0])
    with LatencyProxy(upstream) as proxy:
        # a long fetch budget: a slow store keeps requests in progress instead of degrading them
        server: Server = make_server(model_dir, redis_url=proxy.url(), RANKSERVE_MAX_WAITING_REQUESTS=str(BOUND),
                                     RANKSERVE_FETCH_BUDGET_S="2.0", RANKSERVE_REQUEST_TIMEOUT_S="5.0")
        await asyncio.to_thread(server.wait_ready)
        proxy.set_delay(0.3)
        body = {"user_id": world.long_user, "candidates": world.known_items[:20], "top_n": 5}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client, \
                grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb2_grpc.RankerStub(channel)

            async def grpc_rank() -> str:
                try:
                    await stub.Rank(pb2.RankRequest(**body), timeout=30)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            rest = [client.post("/v1/rank", json=body) for _ in range(BURST_REST)]
            results = await asyncio.gather(*rest, *(grpc_rank() for _ in range(BURST_GRPC)))
        assert server.stop() == 0

    responses = [r for r in results if isinstance(r, httpx.Response)]
    grpc_codes = [r for r in results if isinstance(r, str)]
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) + grpc_codes.count("OK") >= 1, (statuses, grpc_codes)  # the admitted are ranked
    assert statuses.count(503) >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1", r.headers
            assert r.json()["error"]["code"] == "overloaded"
            assert f"limit {BOUND}" in r.json()["error"]["message"]
    assert set(grpc_codes) <= {"OK", "RESOURCE_EXHAUSTED"}, grpc_codes
    assert "RESOURCE_EXHAUSTED" in grpc_codes, grpc_codes
    print(f"\noverload: REST {statuses.count(200)} ranked / {statuses.count(503)} shed, gRPC "
          f"{grpc_codes.count('OK')} ranked / {grpc_codes.count('RESOURCE_EXHAUSTED')} shed (bound {BOUND})")
