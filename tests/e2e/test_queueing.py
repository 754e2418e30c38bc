"""A burst of concurrent requests queues before its fetches, not between fetch and computation.

Ranking computes on the event loop, one request after the other. A request fetches only once it
has a turn (`service.core.COMPUTE_TURNS`), so a fetch never waits behind a queue of other
requests' computations, and its budget (`RANKSERVE_FETCH_BUDGET_S`) keeps measuring the store:
a burst far deeper than the budget allows for the computations ahead of it is ranked with its
features, none degraded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, World, export_bundle

pytestmark = pytest.mark.timeout(300)

BURST = 300
CANDIDATES = 500


async def test_a_deep_burst_spends_no_fetch_budget_waiting_for_computations(
    make_server: Any, world: World, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    # far less than BURST computations of CANDIDATES candidates take (about 0.6 s on a loaded 2-core machine),
    # and well above one fetch on that machine (up to 83 ms measured beside a training run; the default is 0.1)
    budget_s = 0.25
    server: Server = make_server(model_dir, RANKSERVE_FETCH_BUDGET_S=str(budget_s), RANKSERVE_REQUEST_TIMEOUT_S="120",
                                 RANKSERVE_MAX_WAITING_REQUESTS=str(BURST))
    await asyncio.to_thread(server.wait_ready)
    candidates = [*world.known_items, *range(10**9, 10**9 + CANDIDATES - len(world.known_items))]
    body = {"user_id": world.long_user, "candidates": candidates, "top_n": 10, "debug": True}
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120.0, limits=limits) as client:
        started = asyncio.get_running_loop().time()
        responses = await asyncio.gather(*(client.post("/v1/rank", json=body) for _ in range(BURST)))
        seconds = asyncio.get_running_loop().time() - started
    assert server.stop() == 0

    assert [r.status_code for r in responses] == [200] * BURST, {r.status_code: r.text for r in responses}
    bodies = [r.json() for r in responses]
    degraded = [b["debug"]["degraded_reason"] for b in bodies if b["degraded"]]
    assert not degraded, f"{len(degraded)} of {BURST} degraded ({set(degraded)}) in a burst of {seconds:.2f}s"
    computing_ms = sum(b["timings_ms"]["retrieve"] + b["timings_ms"]["score"] for b in bodies)
    # the burst did queue: the computations ahead of the last request outlast the fetch budget
    # (else this test would pass without turns), and that wait shows as the queue stage
    assert computing_ms > 1000 * budget_s, computing_ms
    assert max(b["timings_ms"]["queue"] for b in bodies) > 1000 * budget_s / 2
