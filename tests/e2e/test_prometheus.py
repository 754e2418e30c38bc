"""A real Prometheus (Debian's binary) scrapes a real two-worker server: the request counter it
stores is the number of rank requests sent, whichever worker answered each scrape, and every
expression of the Grafana dashboard and of the alert rules evaluates without error against it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from feature_store.embedded import free_port
from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import REPO, World
from tests.e2e.workers import FRESH, poll, start_two_workers

pytestmark = pytest.mark.timeout(300)

MONITORING = REPO / "k8s" / "components" / "monitoring"
REST_OK, REST_INVALID, GRPC_OK = 30, 4, 6
SENT = REST_OK + REST_INVALID + GRPC_OK


class Prometheus:
    """One `prometheus` process on a free loopback port, scraping `target` every second."""

    def __init__(self, root: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: run `make prometheus` (Debian's prometheus package; "
                        "make test does it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = root / "rules.yaml"
        shutil.copy(MONITORING / "rules.yaml", rules)
        config = root / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "rankserve", "static_configs": [{"targets": [target]}]}],
        }))
        self.log_path = root / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return httpx.get(self.url + "/-/ready", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        poll(ready, timeout, f"prometheus not ready:\n{self.logs()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; fails the test on any error the API reports."""
        resp = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10.0)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {resp.text}"
        assert "warnings" not in body, f"{expr}: {body['warnings']}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        root = tmp_path / "prometheus"
        root.mkdir()
        prom = Prometheus(root, target)
        started.append(prom)
        prom.wait_ready()
        return prom

    yield start
    for prom in started:
        prom.stop()


def dashboard_queries() -> dict[str, list[str]]:
    """Every panel's expressions, with Grafana's variables as Grafana would fill them in."""
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return {
        panel["title"]: [t["expr"].replace("$__rate_interval", "1m").replace("$namespace", ".*")
                         for t in panel["targets"]]
        for panel in doc["panels"]
    }


def test_prometheus_scrapes_two_workers_and_evaluates_the_dashboard(
    make_server: Any, prometheus_for: Any, world: World, tmp_path: Path
) -> None:
    server = start_two_workers(make_server, world, tmp_path)
    prom: Prometheus = prometheus_for(f"127.0.0.1:{server.http_port}")
    poll(lambda: prom.value('up{job="rankserve"}') == 1, 60, f"the server is never up in prometheus:\n{prom.logs()}")

    body = {"user_id": world.long_user, "candidates": world.known_items[:20], "top_n": 5}
    for _ in range(REST_OK):
        resp = httpx.post(server.base_url + "/v1/rank", json=body, headers=FRESH, timeout=10.0)
        assert resp.status_code == 200, resp.text
    for _ in range(REST_INVALID):
        resp = httpx.post(server.base_url + "/v1/rank", json={**body, "top_n": 0}, headers=FRESH, timeout=10.0)
        assert resp.status_code == 422, resp.text
    for _ in range(GRPC_OK):  # a channel each: gRPC connections are spread over the workers too
        with grpc.insecure_channel(server.grpc_target) as channel:
            reply = pb2_grpc.RankerStub(channel).Rank(pb2.RankRequest(**body), timeout=10)
        assert len(reply.items) == 5

    # every scrape after the last request sees the final count: wait for one, then compare exactly
    scraped: list[float | None] = []

    def counted() -> bool:
        scraped.append(prom.value("sum(rankserve_requests_total)"))
        return scraped[-1] == SENT

    try:
        poll(counted, 60, "the scraped counter never reached the requests sent")
    except TimeoutError:
        pytest.fail(f"sent {SENT} requests; prometheus scraped {scraped[-1]} (history {scraped[-10:]})")
    by_code = {(r["metric"]["transport"], r["metric"]["code"]): float(r["value"][1])
               for r in prom.query("sum by (transport, code) (rankserve_requests_total)")}
    assert by_code == {("rest", "ok"): REST_OK, ("rest", "invalid_request"): REST_INVALID, ("grpc", "ok"): GRPC_OK}
    time.sleep(3)  # a few more scrapes (1 s apart): the count must hold still, whichever worker answers
    for _ in range(5):
        assert prom.value("sum(rankserve_requests_total)") == SENT
        assert prom.value("min_over_time(sum(rankserve_requests_total)[3s:1s])") == SENT
        time.sleep(0.5)
    print(f"\nrequests sent: {SENT}; sum(rankserve_requests_total) in prometheus: {scraped[-1]}")

    # the dashboard: every expression evaluates; the request rate has data
    queries = dashboard_queries()
    for exprs in queries.values():
        for expr in exprs:
            prom.query(expr)
    (request_rate,) = queries["Request rate"]
    assert prom.query(request_rate), "the request-rate panel has no data"
    # the alert rules: each expression evaluates, Prometheus loaded them all healthy, none fires
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    n_rules = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            prom.query(rule["expr"])
            n_rules += 1

    def rules_evaluated() -> bool:
        groups = httpx.get(prom.url + "/api/v1/rules", timeout=10.0).json()["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        return len(loaded) == n_rules and all(r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2")
                                        for r in loaded)

    poll(rules_evaluated, 30, "the alert rules were never all evaluated healthy")
    firing = httpx.get(prom.url + "/api/v1/alerts", timeout=10.0).json()["data"]["alerts"]
    assert firing == [], firing
    assert server.stop() == 0
