"""A 5,000-request soak over REST and gRPC: no failures, and the server's resident memory grows
by less than 5% once warmed up (a leak per request, even of a few KB, would show: 5,000 x 4 KB is
20 MB, about 5% of the process).

RSS is read from /proc/<pid>/status of the server process (`rankserve serve` with one worker
serves in that process). 1 in 20 requests is invalid on purpose, so the error paths are soaked
too.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Server, World, export_bundle
from tests.fault.load import LoadGen

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

WARM_UP_REQUESTS = 1000
SOAK_REQUESTS = 5000
MAX_GROWTH = 0.05


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def test_soak_5000_requests_without_memory_growth(make_server: Any, world: World, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    server: Server = make_server(model_dir, RANKSERVE_POLL_INTERVAL_S="10")
    await asyncio.to_thread(server.wait_ready)
    assert server.proc is not None
    pid = server.proc.pid

    warm = LoadGen(server, world, rest_clients=3, grpc_clients=2, pause_s=0.0, max_requests=WARM_UP_REQUESTS,
                   invalid_every=20).start()
    await warm.wait_done(120)
    await asyncio.sleep(0.5)
    baseline = rss_bytes(pid)

    samples: list[int] = []
    soak = LoadGen(server, world, rest_clients=3, grpc_clients=2, pause_s=0.0, max_requests=SOAK_REQUESTS,
                   invalid_every=20)
    started = time.monotonic()
    soak.start()

    async def sample() -> None:
        while not soak.stop.is_set():
            samples.append(rss_bytes(pid))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    await soak.wait_done(240)
    elapsed = time.monotonic() - started
    await sampler
    await asyncio.sleep(0.5)
    final = rss_bytes(pid)

    outcomes = soak.outcomes
    assert len(outcomes) == SOAK_REQUESTS
    assert soak.wrong() == [] and warm.wrong() == [], (soak.wrong() + warm.wrong())[:5]
    invalid = sum(o.invalid for o in outcomes)
    assert invalid == SOAK_REQUESTS // 20
    growth = (final - baseline) / baseline
    peak = max([*samples, final])
    p99 = sorted(o.latency for o in outcomes if not o.invalid)[int(0.99 * (SOAK_REQUESTS - invalid))]
    print(f"\nsoak: {len(outcomes)} requests ({invalid} invalid on purpose, all answered 422/INVALID_ARGUMENT) "
          f"in {elapsed:.1f} s ({len(outcomes) / elapsed:.0f}/s), 0 failed, client p99 {p99 * 1000:.0f} ms; "
          f"RSS {baseline / 2**20:.1f} MiB after {WARM_UP_REQUESTS} warm-up requests, {final / 2**20:.1f} MiB after "
          f"(peak {peak / 2**20:.1f}): growth {growth * 100:+.2f}%")
    assert growth < MAX_GROWTH, (baseline, final)
    assert server.stop() == 0
    assert "unhandled error" not in server.logs()
