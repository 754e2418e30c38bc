"""Helpers of the tests that run `rankserve serve --workers 2` and read its /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ADMIN_TOKEN, Server, World, export_bundle

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FRESH = {"Connection": "close"}  # a new connection per request: the kernel hands it to either worker


def samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics: {(sample name, sorted labels): value}."""
    resp = httpx.get(server.base_url + "/metrics", headers=FRESH, timeout=10.0)
    assert resp.status_code == 200, resp.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def total(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, **labels: str) -> float:
    """Sum of the samples of `metric` whose labels include `labels`."""
    return sum(v for (n, lbls), v in scrape.items() if n == metric and set(labels.items()) <= set(lbls))


def models_by_worker(server: Server, rounds: int = 30) -> dict[int, str | None]:
    """pid -> current model key, from /v1/models over fresh connections."""
    seen: dict[int, str | None] = {}
    for _ in range(rounds):
        body = httpx.get(server.base_url + "/v1/models", headers=FRESH, timeout=10.0).json()
        seen[body["pid"]] = body["current"]["key"] if body["current"] else None
    return seen


def poll(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # another process's state: nothing to wait on but the answer
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def start_two_workers(make_server: Any, world: World, tmp_path: Path, **env: str) -> Server:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir, version=1)
    server: Server = make_server(model_dir, RANKSERVE_WORKERS="2", RANKSERVE_POLL_INTERVAL_S="0",
                                 RANKSERVE_ADMIN_TOKEN=ADMIN_TOKEN, **env)
    server.wait_ready(timeout=180)
    # both workers ready: the first one ready answers /readyz before the other has its model
    def both_ready() -> bool:
        seen = models_by_worker(server, 10)
        return len(seen) == 2 and set(seen.values()) == {"tiny/1"}

    poll(both_ready, 180, "two workers serving tiny/1")
    return server
