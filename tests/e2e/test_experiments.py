"""Experiments across real server processes: sticky arms agree between two servers, per-arm
metrics, the admin endpoints and the arm override (REST and gRPC), and an invalid config refused
on reload while the previous one keeps serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from export.exporter import write_bundle
from service.experiments.manager import bucket_of
from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import ADMIN_TOKEN, BUNDLE_NAME, Server, World, export_bundle
from tests.experiments_helpers import metric_value, retrained_tiny_model, write_config

pytestmark = pytest.mark.timeout(240)

SALT = "e2e-2024"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def config(salt: str = SALT, control: float = 50, treatment: float = 50, **treatment_extra: Any) -> dict[str, Any]:
    return {"salt": salt, "arms": [
        {"name": "control", "share": control, "bundle": "tiny/1"},
        {"name": "treatment", "share": treatment, "bundle": "tiny/2",
         "fusion": {"weights": {"click": 1, "cart": 1, "buy": 1}}, "retrieval": {"k": 4}, **treatment_extra},
        {"name": "qa", "share": 0, "bundle": "tiny/1"},
    ]}


def expected_arm(user: int, salt: str = SALT, control: float = 50) -> str:
    return "control" if bucket_of(salt, user) < control * 100 else "treatment"


def make_model_dir(world: World, root: Path) -> Path:
    """tiny/1 (the e2e bundle) and tiny/2 (the same model retrained: other weights, same schema)."""
    model_dir = root / "models"
    export_bundle(world, model_dir, version=1)
    write_bundle(retrained_tiny_model(world.schema, seed=1), world.schema_dir, {"variant": "twin", "data": "tiny"},
                 model_dir, BUNDLE_NAME, version=2)
    return model_dir


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[tuple[Server, Server, Path]]:
    """Two servers with the same experiments (each its own copy of the file); returns A's file too."""
    root = tmp_path_factory.mktemp("experiments")
    model_dir = make_model_dir(world, root)
    started: list[Server] = []
    files = []
    try:
        for name in ("a", "b"):
            path = root / f"experiments-{name}.yaml"
            write_config(path, config())
            files.append(path)
            env = {"RANKSERVE_EXPERIMENTS_FILE": str(path), "RANKSERVE_EXPERIMENTS_POLL_INTERVAL_S": "0.3",
                   "RANKSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "RANKSERVE_SHADOW_SINK_DIR": str(root / f"sink-{name}")}
            started.append(Server(model_dir, world.redis_url, root / f"server-{name}.log", env).start())
        for server in started:
            server.wait_ready()
        yield started[0], started[1], files[0]
    finally:
        for server in started:
            code = server.stop()
            assert code == 0, server.logs()[-4000:]
            assert "unhandled error" not in server.logs(), server.logs()[-4000:]


def users(world: World) -> list[int]:
    return [int(u) for u in world.schema.users.ids] + [world.unknown_user + i for i in range(40)]


def rank_rest(server: Server, user: int, world: World, **kwargs: Any) -> httpx.Response:
    body = {"user_id": user, "candidates": world.known_items[:30], "top_n": 5, "debug": True}
    return httpx.post(server.base_url + "/v1/rank", json=body, timeout=10.0, **kwargs)


def rank_grpc(server: Server, user: int, world: World, metadata: Any = None) -> Any:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb2_grpc.RankerStub(channel)
        return stub.Rank(pb2.RankRequest(user_id=user, candidates=world.known_items[:30], top_n=5), timeout=10,
                         metadata=metadata)


def test_a_user_lands_in_the_same_arm_on_both_servers(servers: tuple[Server, Server, Path], world: World) -> None:
    a, b, _ = servers
    seen = set()
    for user in users(world):
        resp = rank_rest(a, user, world)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        other = rank_grpc(b, user, world)
        assert body["arm"] == other.arm == expected_arm(user), user
        assert body["model"] == other.model == {"control": "tiny/1", "treatment": "tiny/2"}[body["arm"]]
        experiment = body["debug"]["experiment"]
        assert experiment["bucket"] == bucket_of(SALT, user)
        assert experiment["retrieval_k"] == (4 if body["arm"] == "treatment" else 8)
        if body["arm"] == "treatment":  # the arm's fusion: equal weights
            for it in body["items"]:
                assert it["score"] == pytest.approx(sum(it["scores"].values()), rel=1e-5)
        seen.add(body["arm"])
    assert seen == {"control", "treatment"}


def test_per_arm_metrics(servers: tuple[Server, Server, Path], world: World) -> None:
    a, _, _ = servers
    for user in users(world)[:20]:
        assert rank_rest(a, user, world).status_code == 200
    text = httpx.get(a.base_url + "/metrics").text
    for arm in ("control", "treatment"):
        assert metric_value(text, "rankserve_arm_requests_total", arm=arm, outcome="ok") > 0
        assert metric_value(text, "rankserve_request_seconds_count", arm=arm) > 0
        assert metric_value(text, "rankserve_fused_score_count", arm=arm) > 0
    assert metric_value(text, "rankserve_arm_share_percent", arm="control", bundle="tiny/1") == 50
    assert metric_value(text, "rankserve_arm_share_percent", arm="qa", bundle="tiny/1") == 0


def test_admin_lists_arms(servers: tuple[Server, Server, Path]) -> None:
    a, _, _ = servers
    url = a.base_url + "/v1/admin/experiments"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
    body = httpx.get(url, headers=AUTH).json()
    assert body["salt"] == SALT and body["buckets"] == 10_000 and body["last_error"] is None
    arms = {arm["name"]: arm for arm in body["arms"]}
    assert arms["control"]["share"] == 50 and arms["control"]["buckets"] == [0, 4999]
    assert arms["treatment"]["bundle"] == "tiny/2" and arms["treatment"]["retrieval"]["k"] == 4
    assert arms["qa"]["share"] == 0 and arms["qa"]["buckets"] == []


def test_arm_override_is_admin_only(servers: tuple[Server, Server, Path], world: World) -> None:
    a, _, _ = servers
    user = next(u for u in users(world) if expected_arm(u) == "control")
    forced = rank_rest(a, user, world, headers={"X-Rankserve-Arm": "treatment", **AUTH})
    assert forced.status_code == 200 and forced.json()["arm"] == "treatment"
    assert forced.json()["debug"]["experiment"]["bucket"] is None
    assert rank_rest(a, user, world, headers={"X-Rankserve-Arm": "qa", **AUTH}).json()["arm"] == "qa"
    for headers in ({"X-Rankserve-Arm": "treatment"}, {"X-Rankserve-Arm": "treatment", "Authorization": "Bearer x"}):
        denied = rank_rest(a, user, world, headers=headers)
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"]["code"] == "forbidden"
        assert "Authorization: Bearer" in denied.json()["error"]["message"]
    unknown = rank_rest(a, user, world, headers={"X-Rankserve-Arm": "nope", **AUTH})
    assert unknown.status_code == 422 and "arms: control, treatment, qa" in unknown.json()["error"]["message"]

    resp = rank_grpc(a, user, world, metadata=[("x-rankserve-arm", "treatment"),
                                               ("authorization", f"Bearer {ADMIN_TOKEN}")])
    assert resp.arm == "treatment" and resp.model == "tiny/2"
    with pytest.raises(grpc.RpcError) as err:
        rank_grpc(a, user, world, metadata=[("x-rankserve-arm", "treatment")])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rank_grpc(a, user, world).arm == "control"


def reload(server: Server) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/admin/experiments/reload", headers=AUTH, timeout=30.0)


def arms_of(server: Server, world: World, sample: list[int]) -> list[str]:
    return [rank_rest(server, u, world).json()["arm"] for u in sample]


def test_invalid_config_is_refused_and_the_previous_keeps_serving(
    servers: tuple[Server, Server, Path], world: World
) -> None:
    a, _, path = servers
    sample = users(world)[:30]
    before = arms_of(a, world, sample)
    digest = httpx.get(a.base_url + "/v1/admin/experiments", headers=AUTH).json()["digest"]
    assert reload(a).json()["status"] == "unchanged"

    bad_shares = config(control=60, treatment=30)
    unknown_bundle = config()
    unknown_bundle["arms"][1]["bundle"] = "tiny/9"
    unknown_task = config()
    unknown_task["arms"][0]["fusion"] = {"weights": {"clik": 1.0}}
    for doc, fragment in ((bad_shares, "sum to 90%"), (unknown_bundle, "no bundle tiny/9"),
                          (unknown_task, "['clik']")):
        write_config(path, doc)
        resp = reload(a)
        assert resp.status_code == 409, resp.text
        error = resp.json()["error"]
        assert error["code"] == "experiments_rejected" and fragment in error["message"], error
        assert arms_of(a, world, sample) == before  # the previous config keeps serving
        state = httpx.get(a.base_url + "/v1/admin/experiments", headers=AUTH).json()
        assert state["digest"] == digest and fragment in state["last_error"]
        assert httpx.get(a.base_url + "/readyz").status_code == 200

    # a valid change is picked up by polling the file, without an admin call
    write_config(path, config(salt="e2e-new", control=70, treatment=30))
    deadline = time.monotonic() + 30
    while httpx.get(a.base_url + "/v1/admin/experiments", headers=AUTH).json()["salt"] != "e2e-new":
        assert time.monotonic() < deadline, a.logs()[-3000:]
        time.sleep(0.2)
    assert arms_of(a, world, sample) == [expected_arm(u, "e2e-new", 70) for u in sample]
    assert "experiments refused" in a.logs()


def test_the_other_server_keeps_its_own_config(servers: tuple[Server, Server, Path]) -> None:
    _, b, _ = servers
    assert httpx.get(b.base_url + "/v1/admin/experiments", headers=AUTH).json()["salt"] == SALT
