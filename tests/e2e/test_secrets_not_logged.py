"""No secret reaches the logs or a response: the Redis password (in REDIS_URL) and the admin
token, through a server's whole life (start, ranking, admin calls with right and wrong tokens,
the store failing, shutdown), with a wrong password, and with an invalid URL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import REPO, Server, World, export_bundle
from tests.fault.conftest import ingest_world
from tests.secure_redis import SecureRedis, valkey_binary

pytestmark = pytest.mark.timeout(180)

PASSWORD = "Redis-Pa55-9f8e7d6c"
WRONG_PASSWORD = "Wrong-Pa55-1a2b3c4d"
TOKEN = "Admin-Tok-5e6f7a8b9c"
SECRETS = (PASSWORD, WRONG_PASSWORD, TOKEN)


def assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} contains a secret ({secret[:6]}...)"


def test_secrets_stay_out_of_logs_and_responses(make_server: Any, world: World, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    seen: list[str] = []  # every response body and header we get back
    with SecureRedis(valkey_binary(), tmp_path / "redis", PASSWORD) as redis_server:
        ingest_world(redis_server.url(), world)
        server: Server = make_server(model_dir, redis_url=redis_server.url(), RANKSERVE_ADMIN_TOKEN=TOKEN)
        server.wait_ready()
        base = server.base_url
        body = {"user_id": world.long_user, "candidates": world.known_items[:10]}
        with httpx.Client(base_url=base, timeout=30) as client:
            calls = [
                client.post("/v1/rank", json={**body, "debug": True}),
                client.get("/readyz"), client.get("/v1/models"), client.get("/metrics"), client.get("/openapi.json"),
                client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}),
                client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}x"}),
                client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {WRONG_PASSWORD}"}),
                client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, json={"version": 9}),
                client.post("/v1/rank", json={**body, "top_n": 0}),
            ]
            assert calls[0].status_code == 200 and calls[0].json()["degraded"] is False
            assert calls[5].status_code == 200 and calls[6].status_code == 401 and calls[8].status_code == 409
            with grpc.insecure_channel(server.grpc_target) as channel:
                reply = pb2_grpc.RankerStub(channel).Rank(pb2.RankRequest(**body, debug=True), timeout=10)
                seen.append(str(reply))
            redis_server.stop()  # the store goes away: degraded answers, readiness false, errors logged
            degraded = client.post("/v1/rank", json=body)
            assert degraded.status_code == 200 and degraded.json()["degraded"] is True
            calls += [degraded, client.get("/readyz")]
            seen += [r.text + str(dict(r.headers)) for r in calls]
        assert server.stop() == 0
    logs = server.logs()
    assert "feature store unavailable" in logs and "admin reload" in logs  # the interesting paths did log
    assert_clean(logs, "the server log")
    for text in seen:
        assert_clean(text, "a response")

    # the wrong password: refused by Redis, logged as the store being unavailable, never echoed
    with SecureRedis(valkey_binary(), tmp_path / "redis2", PASSWORD) as redis_server:
        other = make_server(model_dir, redis_url=redis_server.url(WRONG_PASSWORD), RANKSERVE_ADMIN_TOKEN=TOKEN)
        other.wait_http()
        ready = httpx.get(other.base_url + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert other.stop() == 0
    assert_clean(other.logs() + ready.text, "the wrong-password server's log or /readyz")


@pytest.mark.parametrize("url", [f"http://:{PASSWORD}@127.0.0.1:6379/0", f"redis://:{PASSWORD}@127.0.0.1:port/0"])
def test_invalid_redis_url_is_reported_without_its_password(url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))}
    env.update({"REDIS_URL": url, "RANKSERVE_ADMIN_TOKEN": TOKEN})
    cmd = [sys.executable, "-m", "service.cli", "serve", "--http-port", "0", "--grpc-port", "0",
           "--model-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "cannot start" in text or "invalid settings" in text, text[-2000:]
    assert "Traceback" not in text
    assert_clean(text, "the output of a server refusing its REDIS_URL")
