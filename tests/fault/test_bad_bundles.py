"""Bad bundles dropped into the live model directory under load: each is refused with its reason,
the current model keeps serving, and no request fails.

The tampered-file case (a sha256 mismatch) is `tests/e2e/test_hot_swap.py`; here: a bundle
exported for another feature schema (its schema hash does not match the store's active
version), a bundle whose files match their hashes but whose scorer is not a valid ONNX model
(re-hashed after truncation, as a broken exporter would write it), and one whose manifest is
not JSON; and a bundle whose fusion names a task it does not predict, followed by a good one
(the poller survives the failure and serves the good one).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from export.exporter import write_bundle
from feature_store.schema import FeatureSchema, SchemaSpec, Vocabulary
from tests.e2e.conftest import BUNDLE_NAME, Server, World, export_bundle
from tests.fault.load import LoadGen, wait_until
from tests.helpers import tiny_model

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]


def other_schema() -> FeatureSchema:
    """Same shape as tests.helpers.tiny_schema, other vocabularies: another schema hash."""
    rng = np.random.default_rng(1)
    return FeatureSchema(
        SchemaSpec(name="tiny", short_sequence_length=5),
        Vocabulary.build(rng.choice(10_000, 40, replace=False)),
        Vocabulary.build(rng.choice(10_000, 300, replace=False)),
        Vocabulary.build(rng.choice(1_000, 12, replace=False)),
    )


def place(src: Path, model_dir: Path, version: int, edit: Any) -> Path:
    """Copy bundle `src`, apply `edit(staging_dir)`, rename it into place as `version`."""
    staging = model_dir / BUNDLE_NAME / f".staging-{version}"
    shutil.copytree(src, staging)
    for path in staging.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    edit(staging)
    final = model_dir / BUNDLE_NAME / str(version)
    staging.rename(final)
    return final


def truncate_scorer_and_rehash(bundle: Path) -> None:
    onnx = bundle / "scorer.onnx"
    onnx.write_bytes(onnx.read_bytes()[: 200])
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["scorer.onnx"] = hashlib.sha256(onnx.read_bytes()).hexdigest()
    manifest["version"] = int(bundle.name.split("-")[-1])
    (bundle / "manifest.json").write_text(json.dumps(manifest))


async def refused(client: httpx.AsyncClient, version: int) -> bool:
    """Whether the server lists `version` among its refused bundles."""
    state = (await client.get("/v1/models")).json()
    return any(r["path"].endswith(f"{BUNDLE_NAME}/{version}") for r in state["refused"])


def garble_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").write_text('{"format": "rankserve.bundle/1", "name": ')


async def test_schema_mismatch_and_corrupt_bundles_refused_under_load(
    make_server: Any, world: World, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    first = export_bundle(world, model_dir)
    # exported before the server starts (torch export takes a moment), moved in under load
    schema = other_schema()
    schema_dir = tmp_path / "other-schema"
    schema.save(schema_dir)
    mismatched = write_bundle(tiny_model(schema), schema_dir, {"variant": "twin"}, tmp_path / "staging", BUNDLE_NAME,
                              version=2)

    server: Server = make_server(model_dir, RANKSERVE_POLL_INTERVAL_S="0.3")
    await asyncio.to_thread(server.wait_ready)
    load = LoadGen(server, world, rest_clients=3, grpc_clients=1, pause_s=0.03).start()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:

        try:
            await asyncio.sleep(1.0)
            shutil.move(mismatched, model_dir / BUNDLE_NAME / "2")  # one rename: appears complete
            await wait_until(lambda: refused(client, 2), 30, "the schema-mismatched bundle was never refused")
            place(first, model_dir, 3, truncate_scorer_and_rehash)
            await wait_until(lambda: refused(client, 3), 30, "the bundle with a broken scorer was never refused")
            place(first, model_dir, 4, garble_manifest)
            await wait_until(lambda: refused(client, 4), 30, "the bundle with a broken manifest was never refused")
            await asyncio.sleep(1.0)
        finally:
            await load.finish()
        state = (await client.get("/v1/models")).json()
        metrics = (await client.get("/metrics")).text

    assert load.wrong() == [], load.wrong()[:5]
    assert len(load.outcomes) >= 100
    assert {o.model for o in load.outcomes} == {"tiny/1"}
    assert state["current"]["key"] == "tiny/1" and [m["key"] for m in state["loaded"]] == ["tiny/1"]
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in state["refused"]}
    assert "does not match the feature store's active schema" in reasons["2"], reasons["2"]
    assert "rankserve ingest --schema" in reasons["2"]  # the message says what to do
    assert "ONNX Runtime cannot load scorer.onnx" in reasons["3"], reasons["3"]
    assert "unreadable manifest.json" in reasons["4"], reasons["4"]
    assert "rankserve_bundles_refused_total 3.0" in metrics
    print(f"\nbad bundles: {len(load.outcomes)} requests during 3 refusals, 0 failed; reasons: "
          + "; ".join(f"v{v}: {r.split(': ', 1)[-1][:70]}" for v, r in sorted(reasons.items())))
    assert server.stop() == 0
    assert "unhandled error" not in server.logs()


def fuse_unknown_task(bundle: Path) -> None:
    """A manifest whose fusion weighs a task the model does not predict (the manifest is not hashed)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["fusion"]["weights"]["no_such_task"] = 1.0
    manifest["version"] = int(bundle.name.split("-")[-1])
    (bundle / "manifest.json").write_text(json.dumps(manifest))


async def test_bundle_with_unknown_fusion_task_is_refused_and_the_poller_serves_the_next(
    make_server: Any, world: World, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    first = export_bundle(world, model_dir)
    server: Server = make_server(model_dir, RANKSERVE_POLL_INTERVAL_S="0.3")
    await asyncio.to_thread(server.wait_ready)
    load = LoadGen(server, world, rest_clients=2, grpc_clients=1, pause_s=0.03).start()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:

        async def serving(key: str) -> bool:
            return bool((await client.get("/v1/models")).json()["current"]["key"] == key)

        try:
            await asyncio.sleep(1.0)
            place(first, model_dir, 2, fuse_unknown_task)
            await wait_until(lambda: refused(client, 2), 30, "the bundle with an unknown fusion task was never refused")
            export_bundle(world, model_dir, 3)  # a good one after it: the poller must still be running
            await wait_until(lambda: serving("tiny/3"), 30, "the poller stopped: tiny/3 was never served")
            await asyncio.sleep(1.0)
        finally:
            await load.finish()
        state = (await client.get("/v1/models")).json()

    assert load.wrong() == [], load.wrong()[:5]
    assert {o.model for o in load.outcomes} == {"tiny/1", "tiny/3"}
    (reason,) = [r["reason"] for r in state["refused"] if r["path"].endswith(f"{BUNDLE_NAME}/2")]
    assert "no_such_task" in reason and "does not predict" in reason, reason
    assert [m["key"] for m in state["loaded"]] == ["tiny/3"]  # tiny/1 unloaded: neither current nor pinned
    assert server.stop() == 0
    assert "unhandled error" not in server.logs() and "background task failed" not in server.logs()
