"""The scorer runtime is chosen per bundle: a running server scores a bundle exported for
TorchScript with TorchScript and, after a hot swap, the next (ONNX) bundle with ONNX Runtime;
the same weights give the same served probabilities in both, and the setting overrides the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from export.exporter import write_bundle
from tests.e2e.conftest import ADMIN_TOKEN, BUNDLE_NAME, Server, World
from tests.helpers import tiny_model

pytestmark = pytest.mark.timeout(300)


def rank(server: Server, world: World) -> dict[str, Any]:
    body = {"user_id": world.long_user, "candidates": world.known_items[:30], "top_n": 30}
    r = httpx.post(server.base_url + "/v1/rank", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def served_model(server: Server) -> dict[str, Any]:
    r = httpx.get(server.base_url + "/v1/models", timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json()["current"])


def scores(resp: dict[str, Any]) -> dict[int, dict[str, float]]:
    return {item["item_id"]: item["scores"] for item in resp["items"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, world: World) -> Path:
    """tiny/1 exported for TorchScript; tiny/2, the same weights, for ONNX Runtime (written later)."""
    root = tmp_path_factory.mktemp("runtime") / "models"
    write_bundle(tiny_model(world.schema), world.schema_dir, {"variant": "twin", "data": "tiny"}, root, BUNDLE_NAME,
                 version=1, scorer_runtime="torchscript")
    return root


def test_each_bundle_is_scored_with_its_own_runtime(
    model_dir: Path, world: World, make_server: Any
) -> None:
    server: Server = make_server(model_dir, RANKSERVE_ADMIN_TOKEN=ADMIN_TOKEN)
    server.wait_ready()
    first = served_model(server)
    assert (first["key"], first["runtime"]) == (f"{BUNDLE_NAME}/1", "torchscript")
    by_torchscript = scores(rank(server, world))

    write_bundle(tiny_model(world.schema), world.schema_dir, {"variant": "twin", "data": "tiny"}, model_dir,
                 BUNDLE_NAME, version=2)  # default: onnx
    r = httpx.post(server.base_url + "/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                   json={}, timeout=120)
    assert r.status_code == 200, r.text
    second = served_model(server)
    assert (second["key"], second["runtime"]) == (f"{BUNDLE_NAME}/2", "onnx")
    by_onnx = scores(rank(server, world))

    assert by_onnx.keys() == by_torchscript.keys()
    for item, probs in by_onnx.items():
        for task, p in probs.items():
            assert abs(p - by_torchscript[item][task]) <= 1e-5, (item, task)


def test_setting_overrides_the_bundles_runtime(tmp_path: Path, world: World, make_server: Any) -> None:
    models = tmp_path / "models"
    write_bundle(tiny_model(world.schema), world.schema_dir, {"variant": "twin", "data": "tiny"}, models,
                 BUNDLE_NAME, scorer_runtime="torchscript")
    server: Server = make_server(models, RANKSERVE_SCORER_RUNTIME="onnx")
    server.wait_ready()
    assert served_model(server)["runtime"] == "onnx"
    assert rank(server, world)["items"]
