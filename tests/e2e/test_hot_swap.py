"""Model lifecycle under load: hot swap with zero failed requests, a tampered bundle refused while
the old model keeps serving, memory that stays flat over many swaps, and a graceful SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from export.exporter import write_bundle
from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import ADMIN_TOKEN, BUNDLE_NAME, Server, World, export_bundle
from tests.helpers import tiny_model

pytestmark = pytest.mark.timeout(240)

REST_CLIENTS = 4
PAUSE_S = 0.05  # per client between requests: bounds the load to a few hundred requests over the test


@dataclass
class Outcome:
    started: float
    finished: float
    transport: str
    model: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Concurrent REST and gRPC clients ranking in a loop until stopped."""

    server: Server
    world: World
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def body(self, i: int) -> dict[str, Any]:
        items = self.world.known_items
        return {"user_id": self.world.long_user, "candidates": items[i % 20 : i % 20 + 25], "top_n": 10}

    async def rest_client(self, k: int) -> None:
        async with httpx.AsyncClient(base_url=self.server.base_url, timeout=10.0) as client:
            i = k
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = await client.post("/v1/rank", json=self.body(i))
                    ok = resp.status_code == 200
                    self.outcomes.append(Outcome(t0, time.monotonic(), "rest", resp.json().get("model") if ok else None,
                                                 None if ok else f"{resp.status_code} {resp.text}"))
                except httpx.HTTPError as exc:
                    self.outcomes.append(Outcome(t0, time.monotonic(), "rest", error=repr(exc)))
                i += 1
                await asyncio.sleep(PAUSE_S)

    async def grpc_client(self) -> None:
        async with grpc.aio.insecure_channel(self.server.grpc_target) as channel:
            stub = pb2_grpc.RankerStub(channel)
            i = 0
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = await stub.Rank(pb2.RankRequest(**self.body(i)), timeout=10)
                    self.outcomes.append(Outcome(t0, time.monotonic(), "grpc", resp.model))
                except grpc.aio.AioRpcError as exc:
                    self.outcomes.append(Outcome(t0, time.monotonic(), "grpc", error=f"{exc.code()} {exc.details()}"))
                i += 1
                await asyncio.sleep(PAUSE_S)

    def start(self) -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(self.rest_client(k)) for k in range(REST_CLIENTS)]
        return [*tasks, asyncio.create_task(self.grpc_client())]

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    def models_seen(self) -> set[str | None]:
        return {o.model for o in self.outcomes}


async def wait_for(predicate: Any, seconds: float, what: str) -> None:
    try:
        async with asyncio.timeout(seconds):
            while True:  # polls another process's state: no event to wait on
                if await predicate():
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise TimeoutError(what) from None


def tamper(bundle: Path, staging: Path, final: Path) -> None:
    """Copy `bundle`, flip one byte of a table, and move it into place in one rename."""
    shutil.copytree(bundle, staging)
    table = staging / "tables" / "item_key.npy"
    os.chmod(table, 0o644)
    data = bytearray(table.read_bytes())
    data[-1] ^= 0xFF
    table.write_bytes(bytes(data))
    staging.rename(final)


async def test_hot_swap_and_tampered_bundle_under_load(make_server: Any, world: World, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    server: Server = make_server(model_dir, RANKSERVE_POLL_INTERVAL_S="0.3")
    await asyncio.to_thread(server.wait_ready)
    load = Load(server, world)
    tasks = load.start()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as admin:

        async def models() -> dict[str, Any]:
            return dict((await admin.get("/v1/models")).json())

        try:
            await asyncio.sleep(1.5)
            # a real export of version 2 into the live model dir (the exporter renames it into place)
            model = tiny_model(world.schema)
            await asyncio.to_thread(write_bundle, model, world.schema_dir, {}, model_dir, BUNDLE_NAME)
            await wait_for(lambda: _has_model(load, "tiny/2"), 30, "the poller never swapped in tiny/2")
            swapped_at = min(o.finished for o in load.outcomes if o.model == "tiny/2")
            await asyncio.sleep(1.0)

            tamper(model_dir / BUNDLE_NAME / "2", model_dir / BUNDLE_NAME / ".staging-3", model_dir / BUNDLE_NAME / "3")

            async def refused() -> bool:
                return any(r["path"].endswith(f"{BUNDLE_NAME}/3") for r in (await models())["refused"])

            await wait_for(refused, 30, "the tampered bundle was never refused")
            await asyncio.sleep(1.5)
        finally:
            load.stop.set()
            await asyncio.gather(*tasks)
        state = await models()
        metrics = (await admin.get("/metrics")).text

    assert load.failures() == [], load.failures()[:5]
    assert 100 <= len(load.outcomes) <= 2000, len(load.outcomes)  # bounded: a few hundred, fewer on a busy box
    assert load.models_seen() == {"tiny/1", "tiny/2"}
    # the swap is atomic: every request sent after a client saw tiny/2 was ranked by tiny/2
    late = [o for o in load.outcomes if o.started > swapped_at]
    assert late and all(o.model == "tiny/2" for o in late)
    assert {o.transport for o in late} == {"rest", "grpc"}
    assert state["current"]["key"] == "tiny/2"
    assert [m["key"] for m in state["loaded"]] == ["tiny/2"]  # tiny/1 is neither current nor pinned: unloaded
    (reason,) = [r["reason"] for r in state["refused"] if r["path"].endswith(f"{BUNDLE_NAME}/3")]
    assert "sha256 mismatch for tables/item_key.npy" in reason
    assert "rankserve_bundles_refused_total 1.0" in metrics and "rankserve_model_swaps_total 2.0" in metrics
    assert server.stop() == 0
    assert "unhandled error" not in server.logs()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


SWAPS = 50


async def test_many_hot_swaps_under_load_keep_memory_flat(make_server: Any, world: World, tmp_path: Path) -> None:
    """Each swap unloads the previous version (neither current nor pinned): RSS after the last of 50
    swaps stays within 5% of RSS after the second, while clients keep ranking throughout."""
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    server: Server = make_server(model_dir, RANKSERVE_POLL_INTERVAL_S="0", RANKSERVE_ADMIN_TOKEN=ADMIN_TOKEN)
    await asyncio.to_thread(server.wait_ready)
    assert server.proc is not None
    load = Load(server, world)
    tasks = load.start()
    rss: list[int] = []
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60.0, headers=headers) as admin:
        try:
            for version in range(2, SWAPS + 2):
                await asyncio.to_thread(export_bundle, world, model_dir, version)
                resp = await admin.post("/v1/admin/reload", json={"version": version})
                assert resp.status_code == 200, resp.text
                rss.append(rss_bytes(server.proc.pid))
        finally:
            load.stop.set()
            await asyncio.gather(*tasks)
        state = (await admin.get("/v1/models")).json()

    assert load.failures() == [], load.failures()[:5]
    assert state["current"]["key"] == f"tiny/{SWAPS + 1}"
    assert [m["key"] for m in state["loaded"]] == [f"tiny/{SWAPS + 1}"]
    after_second, after_last = rss[1], rss[-1]
    print(f"\nRSS over {SWAPS} swaps: after the 2nd {after_second / 2**20:.1f} MiB, after the last "
          f"{after_last / 2**20:.1f} MiB ({after_last / after_second:.3f}x), peak {max(rss) / 2**20:.1f} MiB, "
          f"{len(load.outcomes)} requests, 0 failed")
    assert after_last <= 1.05 * after_second, [round(r / 2**20, 1) for r in rss]
    assert server.stop() == 0


async def _has_model(load: Load, key: str) -> bool:
    return any(o.model == key for o in load.outcomes)


async def test_sigterm_drains_then_exits_0(make_server: Any, world: World, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    server: Server = make_server(model_dir)
    await asyncio.to_thread(server.wait_ready)
    load = Load(server, world)
    tasks = load.start()

    async def serving() -> bool:
        return sum(o.error is None for o in load.outcomes) >= 20

    await wait_for(serving, 30, "the server never answered 20 requests")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(server.proc.wait, 30)
    load.stop.set()
    await asyncio.gather(*tasks)
    assert code == 0, server.logs()[-3000:]
    # after SIGTERM, requests are refused at the connection (or answered): never a 5xx from a half-closed core
    assert not [o for o in load.outcomes if o.error and o.error[:1] == "5"], load.failures()[:5]
    logs = server.logs()
    assert "shutting down: draining" in logs and "serving core closed" in logs
