"""Two worker processes behind one port (`--workers 2`) behave as one server: /metrics answers
with the pod's totals whichever worker takes the scrape, and admin reloads (model and experiments)
reach both workers, with pollers off so that only the reload can have moved them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, World, export_bundle
from tests.e2e.workers import AUTH, FRESH, models_by_worker, poll, samples, start_two_workers, total
from tests.experiments_helpers import write_config

pytestmark = pytest.mark.timeout(300)

RANK_REQUESTS = 24
CONNECTIONS = 8


def test_two_workers_expose_one_set_of_metrics(make_server: Any, world: World, tmp_path: Path) -> None:
    server = start_two_workers(make_server, world, tmp_path)
    before = samples(server)
    assert total(before, "rankserve_requests_total") == 0
    body = {"user_id": world.long_user, "candidates": [*world.known_items[:10], world.unknown_item]}
    for _ in range(RANK_REQUESTS):
        resp = httpx.post(server.base_url + "/v1/rank", json=body, headers=FRESH, timeout=10.0)
        assert resp.status_code == 200, resp.text
    resp = httpx.post(server.base_url + "/v1/rank", headers=FRESH, timeout=10.0,
                      json={"user_id": world.unknown_user, "candidates": body["candidates"], "debug": True})
    assert resp.status_code == 200, resp.text
    unknown_per_request = len(body["candidates"]) - resp.json()["debug"]["items_known"]
    assert unknown_per_request >= 1  # the unknown item at least

    # the merged counters are exact in every scrape, whichever worker answers it (fresh connections);
    # the fetch counts reach the metrics on each worker's next readiness tick (1 s): poll for them
    def settled() -> bool:
        scrape = samples(server)
        return total(scrape, "rankserve_unknown_users_total") == 1 and total(
            scrape, "rankserve_item_cache_lookups_total") == (RANK_REQUESTS + 1) * len(body["candidates"])

    poll(settled, 60, "fetch counts mirrored into /metrics by both workers")
    for _ in range(8):
        scrape = samples(server)
        assert total(scrape, "rankserve_requests_total") == RANK_REQUESTS + 1
        assert total(scrape, "rankserve_requests_total", transport="rest", code="ok") == RANK_REQUESTS + 1
        assert total(scrape, "rankserve_arm_requests_total", arm="default", outcome="ok") == RANK_REQUESTS + 1
        assert total(scrape, "rankserve_request_seconds_count") == RANK_REQUESTS + 1
        assert total(scrape, "rankserve_unknown_items_total") == (RANK_REQUESTS + 1) * unknown_per_request
        lookups = total(scrape, "rankserve_item_cache_lookups_total")
        assert lookups == (RANK_REQUESTS + 1) * len(body["candidates"])
        assert 0 < total(scrape, "rankserve_item_cache_lookups_total", result="hit") < lookups
        # gauges merged over the live workers
        assert total(scrape, "rankserve_model_loaded") == 1
        assert total(scrape, "rankserve_model_info", name="tiny", version="1") == 1
        assert total(scrape, "rankserve_cpu_queue_depth") == 0
        assert 0 < total(scrape, "rankserve_bundle_age_seconds") < 86_400 * 365 * 5
        assert total(scrape, "rankserve_feature_set_age_seconds") > 0
        # per-process collectors would describe one worker only: absent in multiprocess mode
        assert total(scrape, "process_cpu_seconds_total") == 0
    assert server.stop() == 0


def test_a_single_process_keeps_its_own_registry(make_server: Any, world: World, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir, version=1)
    server: Server = make_server(model_dir)
    server.wait_ready()
    resp = httpx.post(server.base_url + "/v1/rank", timeout=10.0,
                      json={"user_id": world.long_user, "candidates": [world.unknown_item]})
    assert resp.status_code == 200, resp.text
    poll(lambda: total(samples(server), "rankserve_unknown_items_total") == 1, 30, "unknown item counted")
    scrape = samples(server)
    assert total(scrape, "rankserve_requests_total") == 1
    assert total(scrape, "rankserve_model_loaded") == 1
    assert total(scrape, "process_cpu_seconds_total") > 0  # the standard process collector
    assert any(name == "python_info" for name, _ in scrape)  # and the platform collector
    assert server.stop() == 0


def test_admin_reloads_reach_every_worker(make_server: Any, world: World, tmp_path: Path) -> None:
    experiments = tmp_path / "experiments.yaml"
    write_config(experiments, {"salt": "s", "arms": [{"name": "first", "share": 100, "bundle": "tiny/1"}]})
    server = start_two_workers(make_server, world, tmp_path, RANKSERVE_EXPERIMENTS_FILE=str(experiments),
                               RANKSERVE_EXPERIMENTS_POLL_INTERVAL_S="0")
    workers = set(models_by_worker(server))

    # a new version, picked up by no poller: only the admin reload (taken by one worker) loads it
    export_bundle(world, server.model_dir, version=2)
    resp = httpx.post(server.base_url + "/v1/admin/reload", headers={**AUTH, **FRESH}, timeout=60.0)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "tiny/2"
    poll(lambda: models_by_worker(server) == dict.fromkeys(workers, "tiny/2"), 60, "both workers serving tiny/2")

    # experiments: the arm "first" becomes "second"; the merged share of "first" is the maximum over
    # the live workers, so it reads 0 only once both have reloaded
    write_config(experiments, {"salt": "s", "arms": [{"name": "second", "share": 100, "bundle": "tiny/1"}]})
    resp = httpx.post(server.base_url + "/v1/admin/experiments/reload", headers={**AUTH, **FRESH}, timeout=60.0)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "loaded"

    def both_switched() -> bool:
        scrape = samples(server)
        return (total(scrape, "rankserve_arm_share_percent", arm="first") == 0
                and total(scrape, "rankserve_arm_share_percent", arm="second") == 100)

    poll(both_switched, 60, "both workers on the new experiments")
    for _ in range(10):
        resp = httpx.post(server.base_url + "/v1/rank", json={"user_id": world.long_user,
                                                             "candidates": world.known_items[:5]},
                          headers=FRESH, timeout=10.0)
        assert resp.status_code == 200 and resp.json()["arm"] == "second", resp.text
    assert server.stop() == 0
    logs = server.logs()
    assert "following another worker's reload" in logs and "unhandled error" not in logs


async def test_a_burst_of_connections_is_spread_over_the_workers(make_server: Any, world: World,
                                                                 tmp_path: Path) -> None:
    # each worker computes on its own event loop, one request after the other: a worker that took
    # every connection of a burst would serve them on one core while the other idled
    server = start_two_workers(make_server, world, tmp_path)
    counts: dict[int, int] = {}
    for _ in range(5):
        clients = [httpx.AsyncClient(base_url=server.base_url, timeout=30.0) for _ in range(CONNECTIONS)]
        try:  # one connection per client, all opened at once, each kept alive for its two requests
            first = await asyncio.gather(*(c.get("/v1/models") for c in clients))
            again = await asyncio.gather(*(c.get("/v1/models") for c in clients))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
        for a, b in zip(first, again, strict=True):
            assert a.json()["pid"] == b.json()["pid"]  # the same connection, the same worker
            counts[a.json()["pid"]] = counts.get(a.json()["pid"], 0) + 1
    assert len(counts) == 2, counts
    assert min(counts.values()) >= 5 * CONNECTIONS // 4, counts  # far from all on one worker


def test_a_second_server_with_workers_on_the_same_port_is_refused(make_server: Any, world: World,
                                                                  tmp_path: Path) -> None:
    # workers join the port's SO_REUSEPORT group, which the kernel would let a second server of the
    # same user join too, silently taking a share of the connections
    server = start_two_workers(make_server, world, tmp_path)
    second = Server(tmp_path / "models", world.redis_url, tmp_path / "second.log", {"RANKSERVE_WORKERS": "2"},
                    http_port=server.http_port)
    second.start()
    try:
        assert second.proc is not None and second.proc.wait(120) == 1, second.logs()[-2000:]
    finally:
        second.stop()
    assert f"port {server.http_port} is served by another rankserve" in second.logs(), second.logs()[-2000:]
    assert len(models_by_worker(server, 10)) == 2  # the first server still serves on both workers
