"""The serving image, built and run for real: `make image` (podman on a base made from Debian's
packages), then the CPU image started as its non-root user with a bundle mounted read-only and
REDIS_URL pointing at a Redis this test starts on loopback, and ranked over REST and gRPC.

Run by `make test-image` (a step of `make test`), which installs podman, buildah and mmdebstrap
first. The container runs with `buildah run --isolation chroot` on the host's network: no
container runtime or daemon is needed. Prints the build time, image size, start-to-ready time
and first-rank latencies (docs/DEPLOY.md keeps a table of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from export.exporter import write_bundle
from feature_store.embedded import free_port
from feature_store.redis_store import create_store
from feature_store.store import FeatureStoreConfig
from ingest.bulk import ingest_log
from tests.e2e.conftest import BUNDLE_NAME, FEATURE_VERSION, World, export_bundle, tiny_event_log
from tests.helpers import tiny_model, tiny_schema
from tests.integration.conftest import RedisProcess

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("IMAGE", "localhost/rankserve:cpu")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "localhost/rankserve-base:bookworm")
STORAGE = ["--storage-driver", "vfs"]
UID = 10001
MAX_IMAGE_BYTES = 600 * 10**6
TOOLS = ("podman", "buildah", "mmdebstrap")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (`make test-image` installs podman, buildah and mmdebstrap)")
    return path


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("podman"), *STORAGE, "--cgroup-manager", "cgroupfs", *args],
                          capture_output=True, text=True, timeout=timeout)


def buildah(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("buildah"), *STORAGE, *args], capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class Built:
    seconds: float
    base_was_cached: bool
    size_bytes: int


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """`make image`, timed: the Debian base is made first where it is not cached yet."""
    for name in TOOLS:
        _tool(name)
    base_cached = podman("image", "exists", BASE_IMAGE).returncode == 0
    log = tmp_path_factory.mktemp("image") / "build.log"
    start = time.monotonic()
    with log.open("w") as out:
        build = subprocess.run(["make", "--no-print-directory", "image", f"IMAGE={IMAGE}", f"BASE_IMAGE={BASE_IMAGE}"],
                               cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=3000)
    seconds = time.monotonic() - start
    assert build.returncode == 0, f"make image failed:\n{log.read_text()[-6000:]}"
    inspect = podman("image", "inspect", "--format", "{{.Size}}", IMAGE)
    assert inspect.returncode == 0, inspect.stderr
    return Built(seconds, base_cached, int(inspect.stdout.strip()))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A tiny bundle (tests/helpers.py) and its features ingested into a Debian redis-server on
    127.0.0.1, which the container reaches over the host's network."""
    root = tmp_path_factory.mktemp("image-world")
    schema = tiny_schema()
    schema_dir = root / "schema"
    schema.save(schema_dir)
    src = write_bundle(tiny_model(schema), schema_dir, {"variant": "twin", "data": "tiny"}, root / "src", BUNDLE_NAME)
    redis = RedisProcess(root / "redis")
    redis.start()
    try:
        url = f"redis://127.0.0.1:{redis.port}/0"

        async def ingest() -> None:
            async with create_store(FeatureStoreConfig(url=url)) as store:
                await ingest_log(store, tiny_event_log(schema), schema, FEATURE_VERSION, activate=True)

        asyncio.run(ingest())
        yield World(schema=schema, schema_dir=schema_dir, bundle_src=src, redis_url=url,
                    long_user=int(schema.users.ids[-1]), known_items=[int(x) for x in schema.items.ids[:60]])
    finally:
        redis.stop()


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class Container:
    """The image run with `buildah run --isolation chroot` (host network), as uid 10001."""

    def __init__(self, model_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        self.name = f"rankserve-test-{uuid.uuid4().hex[:8]}"
        self.model_dir, self.log_path, self.env = model_dir, log_path, env
        self.http_port, self.grpc_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.created = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Container:
        made = buildah("from", "--pull-never", "--name", self.name, IMAGE)
        assert made.returncode == 0, made.stderr
        self.created = True
        env = {**self.env, "RANKSERVE_HOST": "127.0.0.1", "RANKSERVE_HTTP_PORT": str(self.http_port),
               "RANKSERVE_GRPC_PORT": str(self.grpc_port)}
        cmd = [_tool("buildah"), *STORAGE, "run", "--isolation", "chroot", "--network", "host",
               "--user", f"{UID}:{UID}", "--volume", f"{self.model_dir}:/models:ro",
               *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")),
               self.name, "--", "rankserve-entrypoint", "rankserve", "serve"]
        self._log = self.log_path.open("wb")
        # its own session: the server is signalled through its process group
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def server_pids(self) -> list[int]:
        """The `rankserve serve` processes under `buildah run`, topmost first (not buildah's own
        helpers, whose arguments name the command too)."""
        assert self.proc is not None
        found = []
        for pid in _children(self.proc.pid):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"serve" in argv and not Path(argv[0].decode()).name.startswith("buildah"):
                    found.append(pid)
        return found

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"container exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/readyz", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"/readyz not OK after {timeout}s:\n{self.logs()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the server (buildah itself would kill it rather than pass the signal on) and
        its exit code, which `buildah run` returns; SIGKILL to the whole group if it hangs. The
        container is removed."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                for pid in self.server_pids()[:1]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                try:
                    code = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(30)
            else:
                code = self.proc.returncode
            self._log.close()
        if self.created:
            removed = buildah("rm", self.name)
            assert removed.returncode == 0, removed.stderr
            self.created = False
        return code


@pytest.fixture
def container(tmp_path: Path, world: World, built_image: Built) -> Iterator[Container]:
    model_dir = tmp_path / "models"
    export_bundle(world, model_dir)
    for path in [model_dir, *model_dir.rglob("*")]:  # readable by uid 10001; the mount is read-only
        path.chmod(0o755 if path.is_dir() else 0o644)
    env = {"REDIS_URL": world.redis_url, "RANKSERVE_POLL_INTERVAL_S": "0"}
    box = Container(model_dir, tmp_path / "container.log", env)
    try:
        yield box
    finally:
        box.stop()


def test_image_is_built_lean(built_image: Built) -> None:
    assert built_image.size_bytes <= MAX_IMAGE_BYTES, f"{built_image.size_bytes / 1e6:.0f} MB"
    config = podman("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}", IMAGE)
    assert config.stdout.split(" ", 1) == [f"{UID}:{UID}", '["rankserve-entrypoint"]\n'], config.stdout


def test_image_serves_rest_and_grpc(container: Container, built_image: Built, world: World,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from service.transports.grpc.server import pb2, pb2_grpc

    started = time.monotonic()
    container.start()
    container.wait_ready()
    ready_s = time.monotonic() - started

    # the server runs as the image's non-root user
    pids = container.server_pids()
    assert pids, "no server process found under buildah run"
    uids = [line.split()[1:3] for pid in pids for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")]
    assert uids and all(pair == [str(UID), str(UID)] for pair in uids), uids

    body: dict[str, Any] = {"user_id": world.long_user, "candidates": world.known_items[:30], "top_n": 5}
    t0 = time.perf_counter()
    rest = httpx.post(container.base_url + "/v1/rank", json=body, timeout=30.0)
    rest_ms = (time.perf_counter() - t0) * 1e3
    assert rest.status_code == 200, rest.text
    doc = rest.json()
    assert doc["model"] == f"{BUNDLE_NAME}/1" and doc["degraded"] is False, doc
    assert len(doc["items"]) == 5 and {it["item_id"] for it in doc["items"]} <= set(body["candidates"])
    scores = [it["score"] for it in doc["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(set(it["scores"]) == {"click", "cart", "buy"} for it in doc["items"])

    with grpc.insecure_channel(f"127.0.0.1:{container.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        t0 = time.perf_counter()
        resp = pb2_grpc.RankerStub(channel).Rank(pb2.RankRequest(**body), timeout=30)
        grpc_ms = (time.perf_counter() - t0) * 1e3
    assert resp.model == f"{BUNDLE_NAME}/1" and not resp.degraded
    assert [it.item_id for it in resp.items] == [it["item_id"] for it in doc["items"]]
    assert [it.score for it in resp.items] == pytest.approx(scores)

    assert container.stop() == 0, container.logs()[-4000:]  # a graceful shutdown on SIGTERM
    logs = container.logs()
    assert "unhandled error" not in logs, logs[-4000:]
    with capsys.disabled():
        print(f"\nserving image {IMAGE}:\n"
              f"  build (make image, base {'cached' if built_image.base_was_cached else 'made from Debian packages'})"
              f": {built_image.seconds:.0f} s\n"
              f"  image size: {built_image.size_bytes / 1e6:.0f} MB\n"
              f"  start to ready (buildah run to /readyz 200): {ready_s:.1f} s\n"
              f"  first rank: REST {rest_ms:.0f} ms, gRPC {grpc_ms:.0f} ms")
