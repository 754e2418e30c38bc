"""End-to-end fixtures: real `rankserve serve` processes on loopback ports.

Each server is `python -m service.cli serve ...` in a subprocess, reading a tiny bundle exported
from `tests/helpers.py` and a feature store (an embedded Valkey owned by the test session) into
which a tiny EventLog was ingested with the bundle's schema. Every server is stopped with
SIGTERM (and killed if it does not exit) when its fixture ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from export.exporter import write_bundle
from feature_store.embedded import EmbeddedValkey, free_port
from feature_store.redis_store import create_store
from feature_store.schema import FeatureSchema
from feature_store.store import EmbeddedConfig, FeatureStoreConfig
from ingest.bulk import ingest_log
from models.data.events import EventLog
from tests.helpers import tiny_model, tiny_schema

REPO = Path(__file__).resolve().parents[2]
BUNDLE_NAME = "tiny"
ADMIN_TOKEN = "e2e-admin-token"
EVENTS_TOKEN = "e2e-events-token"
FEATURE_VERSION = "v1"
NOW = 1_700_000_000


@dataclass(frozen=True)
class World:
    """The shared test data: schema, where bundles come from, the store, and well-known ids."""

    schema: FeatureSchema
    schema_dir: Path
    bundle_src: Path  # an exported bundle to copy into model dirs
    redis_url: str
    long_user: int  # a user with a long history
    known_items: list[int]
    unknown_user: int = 9_999_999_999
    unknown_item: int = 8_888_888_888


def tiny_event_log(schema: FeatureSchema, seed: int = 0) -> EventLog:
    """Histories for every user of the schema (the last one long), over the schema's items."""
    rng = np.random.default_rng(seed)
    users, items, cats = schema.users.ids, schema.items.ids, schema.categories.ids
    item_category = cats[np.arange(items.shape[0]) % cats.shape[0]]
    cols: dict[str, list[np.ndarray]] = {"u": [], "i": [], "c": [], "a": [], "t": []}
    for k, user in enumerate(users.tolist()):
        n = 300 if k == len(users) - 1 else 3 + (k % 15)
        pick = rng.integers(0, items.shape[0], n)
        cols["u"].append(np.full(n, user))
        cols["i"].append(items[pick])
        cols["c"].append(item_category[pick])
        cols["a"].append(rng.choice(4, n, p=[0.85, 0.05, 0.04, 0.06]))
        cols["t"].append(NOW - rng.integers(60, 60 * 86_400, n))
    u, i, c, a, t = (np.concatenate(cols[key]) for key in "uicat")
    return EventLog.from_unsorted(u, i, c, a, t)


def export_bundle(world: World, model_dir: Path, version: int | None = None) -> Path:
    """Copy the pre-exported bundle into `model_dir/tiny/<version>` atomically (rename)."""
    from export.bundle import list_versions

    existing = list_versions(model_dir, BUNDLE_NAME)
    version = version or ((existing[-1] + 1) if existing else 1)
    final = model_dir / BUNDLE_NAME / str(version)
    staging = model_dir / BUNDLE_NAME / f".staging-{version}"
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(world.bundle_src, staging)
    manifest = staging / "manifest.json"
    os.chmod(manifest, 0o644)
    doc = json.loads(manifest.read_text())
    doc["version"] = version  # the manifest's version is what the registry reports
    manifest.write_text(json.dumps(doc, indent=2, sort_keys=True))
    staging.rename(final)
    return final


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import service.transports.grpc.server  # noqa: F401  (generates the gRPC stubs once, before servers start)

    root = tmp_path_factory.mktemp("e2e")
    schema = tiny_schema()
    schema_dir = root / "schema"
    schema.save(schema_dir)
    src = write_bundle(tiny_model(schema), schema_dir, {"variant": "twin", "data": "tiny"}, root / "src", BUNDLE_NAME)

    events = tiny_event_log(schema)
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:

        async def ingest() -> None:
            store = create_store(FeatureStoreConfig(url=valkey.url))
            async with store:
                await ingest_log(store, events, schema, FEATURE_VERSION, activate=True)

        asyncio.run(ingest())
        long_user = int(schema.users.ids[-1])
        yield World(
            schema=schema,
            schema_dir=schema_dir,
            bundle_src=src,
            redis_url=valkey.url,
            long_user=long_user,
            known_items=[int(x) for x in schema.items.ids[:60]],
        )


@dataclass
class Server:
    """One `rankserve serve` subprocess."""

    model_dir: Path
    redis_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))}
        env.update({"RANKSERVE_SCORER_THREADS": "1", "RANKSERVE_POLL_INTERVAL_S": "0.3", "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        cmd = [
            sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--model-dir", str(self.model_dir), "--redis-url", self.redis_url,
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, timeout: float = 60.0) -> None:
        """Until /livez answers."""
        self._wait(lambda r: r.status_code == 200, "/livez", timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        # generous: in a fresh checkout each server JIT-compiles the retrieval kernels before it
        # turns ready (20-30 s on a loaded 2-core machine); a ready server returns at once
        self._wait(lambda r: r.status_code == 200, "/readyz", timeout)

    def _wait(self, ok: Any, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                if ok(httpx.get(self.base_url + path, timeout=2.0)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not OK after {timeout}s:\n{self.logs()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a graceful exit; kill if it hangs. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def make_server(tmp_path: Path, world: World) -> Iterator[Any]:
    """Factory: `make_server(model_dir, **env)` starts a server; all are stopped at teardown."""
    started: list[Server] = []

    def make(model_dir: Path, redis_url: str | None = None, **env: str) -> Server:
        server = Server(model_dir, redis_url or world.redis_url, tmp_path / f"server-{len(started)}.log", env)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    """One ready server shared by the REST, gRPC and docs tests (they do not change its state)."""
    root = tmp_path_factory.mktemp("live")
    model_dir = root / "models"
    export_bundle(world, model_dir)
    env = {"RANKSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "RANKSERVE_EVENTS_TOKEN": EVENTS_TOKEN,
           "RANKSERVE_MAX_CANDIDATES": "200", "RANKSERVE_MAX_TOP_N": "100",
           "RANKSERVE_MAX_BODY_BYTES": "65536"}
    server = Server(model_dir, world.redis_url, root / "server.log", env).start()
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"server exited with {code}:\n{server.logs()[-4000:]}"
        assert "unhandled error" not in server.logs(), server.logs()[-4000:]
