"""`rankserve consume` under faults: consumers SIGKILLed mid-batch, Redis restarted mid-stream, a
flood of malformed entries.

Every test runs real `python -m service.cli consume` processes against a real server and checks
the outcome against the producer's own record: each produced event in its user's sequence exactly
once, in the order produced, nothing left pending in the consumer group. Nothing here is timed
against a budget; the waits poll until done under generous deadlines (a loaded 2-core machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from feature_store import events as ev
from feature_store import keys
from feature_store.codecs import Sequence, decode_sequence
from feature_store.embedded import EmbeddedValkey, free_port
from feature_store.redis_store import create_store
from feature_store.schema import ACTIONS, FeatureSchema, SchemaSpec
from feature_store.store import EmbeddedConfig, FeatureStoreConfig
from ingest.bulk import ingest_log, schema_from_log
from tests.e2e.conftest import REPO
from tests.fault.proxy import LatencyProxy
from tests.integration.conftest import REDIS_SERVER, Backend, make_events
from tests.secure_redis import stop_process, valkey_binary, wait_for_ping

pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]

SHARDS = 8
VERSION = "v1"
CAP = 2_000  # the schema's sequence cap: above every user's ingested + streamed events, so nothing is trimmed
T0 = 1_800_000_000  # streamed events are newer than every ingested one (make_events starts at 1.7e9)
DEADLINE_S = 300.0  # for anything that polls until done


# ---------------------------------------------------------------------------------------------
# Servers, consumers, producers


@dataclass(frozen=True)
class Target:
    """A running server as the consumers and the test reach it: a URL or a Cluster's nodes."""

    name: str
    ports: list[int]
    url: str | None = None

    @property
    def cluster(self) -> bool:
        return self.url is None

    def cli_args(self) -> list[str]:
        if self.url is not None:
            return ["--redis-url", self.url]
        return ["--cluster-nodes", ",".join(f"127.0.0.1:{p}" for p in self.ports)]

    def store_config(self) -> FeatureStoreConfig:
        where: dict[str, Any] = (
            {"url": self.url} if self.url is not None else {"cluster_nodes": [f"127.0.0.1:{p}" for p in self.ports]}
        )
        return FeatureStoreConfig(**where, connect_timeout_s=5.0, read_timeout_s=10.0, request_timeout_s=30.0)

    def client(self, timeout: float = 10.0, retry: bool = True) -> Any:
        """A sync client; `retry=False`: no retries of redis-py's own (a failure is seen at once)."""
        if self.url is None:
            return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.ports],
                                socket_timeout=timeout, socket_connect_timeout=timeout)
        extra = {} if retry else {"retry": Retry(NoBackoff(), 0)}
        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout, **extra)


@pytest.fixture
def target(fault_backend: Backend) -> Target:
    """A private server of each kind (`fault_backend`; no persistence: nothing here restarts it)."""
    return Target(fault_backend.name, fault_backend.ports, fault_backend.config.url)


class AofServer:
    """valkey-server or redis-server with the append-only file fsynced on every write; `restart()`
    is graceful (SHUTDOWN: the AOF flushed and fsynced, then a new process on the same port and
    data directory, which loads it)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
                "--logfile", "server.log"]
        self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_ping(self.port, 60.0, proc=self.proc, log_path=self.workdir / "server.log")

    def shutdown(self) -> None:
        """SHUTDOWN (graceful: the AOF is flushed); returns once the process has exited."""
        assert self.proc is not None
        client = redis.Redis(port=self.port, socket_timeout=30, retry=Retry(NoBackoff(), 0))
        try:
            client.shutdown()  # redis-py swallows the connection closing under it
        finally:
            client.close()
        assert self.proc.wait(timeout=60) == 0, (self.workdir / "server.log").read_text()[-2000:]

    def restart(self) -> None:
        self.shutdown()
        self.start()

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@dataclass
class ConsumerProc:
    """One `rankserve consume` subprocess, logging to a file of its own."""

    name: str
    target: Target
    log_dir: Path
    batch: int = 1000
    lease_ms: int = 1000
    metrics_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"consume-{self.name}.log"

    def start(self) -> ConsumerProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "service.cli", "consume", *self.target.cli_args(), "--shards", str(SHARDS),
               "--batch", str(self.batch), "--lease-ms", str(self.lease_ms), "--name", self.name]
        if self.metrics_port is not None:
            cmd += ["--metrics-port", str(self.metrics_port)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), f"consumer {self.name} exited with {self.proc and self.proc.returncode}:\n" + \
            self.logs()[-4000:]

    def sigkill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop_holding(self, client: Any, timeout: float = 30.0) -> int:
        """SIGSTOP this consumer at a moment it holds entries delivered and not acknowledged, and
        return how many (0: it held none each time it was stopped within `timeout`; it runs on then).

        Stopped, it cannot acknowledge them, so a SIGKILL that follows lands mid-batch for certain:
        polling for a held batch and killing at once missed batches that last a few milliseconds.
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.send_signal(signal.SIGSTOP)
            _wait_stopped(self.proc.pid)
            time.sleep(0.01)  # what it sent before it stopped (an XACK on its way) reaches the server
            held = pending_of(client, self.name)
            if held:
                return held
            self.proc.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        return 0

    def sigterm(self, timeout: float = 60.0) -> int:
        """SIGTERM and the exit code (killed, and the test failed, if it does not exit in time).

        First until the consumer has started consuming: a consumer started late in a test (the
        replacement of a killed one) may still be importing when the others have done the work,
        and a SIGTERM before its handler is installed ends it with -15 instead of a clean stop."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while "consuming " not in self.logs() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"consumer {self.name} did not exit within {timeout}s of SIGTERM:\n{self.logs()[-4000:]}")

    def cleanup(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[Callable[..., ConsumerProc]]:
    """Factory: `consumers(name, target, **options)` starts one; all still running are killed at teardown."""
    started: list[ConsumerProc] = []

    def start(name: str, target: Target, **options: Any) -> ConsumerProc:
        c = ConsumerProc(name, target, tmp_path, **options).start()
        started.append(c)
        return c

    yield start
    for c in started:
        c.cleanup()


class Producer(threading.Thread):
    """Sends `events` with `EventProducer` in chunks, `pause_s` apart; a failed send (Redis away) is
    sent again until it goes through (safe: the consumer appends each event id once per user).
    `sent` counts the events sent so far, `failures` the sends that failed."""

    def __init__(self, target: Target, events: list[ev.StreamEvent], chunk: int, pause_s: float) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.events = events
        self.chunk = chunk
        self.pause_s = pause_s
        self.sent = 0
        self.failures = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        client = self.target.client(timeout=5.0, retry=False)
        producer = ev.EventProducer(client, shards=SHARDS)
        try:
            for lo in range(0, len(self.events), self.chunk):
                batch = self.events[lo : lo + self.chunk]
                deadline = time.monotonic() + DEADLINE_S
                while True:
                    try:
                        producer.send(batch)
                        break
                    except (redis.RedisError, OSError):
                        self.failures += 1
                        if time.monotonic() > deadline or self._halt.is_set():
                            raise
                        time.sleep(0.1)
                self.sent = lo + len(batch)
                if self._halt.wait(self.pause_s):
                    return
        except BaseException as exc:
            self.error = exc
        finally:
            client.close()

    def finish(self, timeout: float = DEADLINE_S) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the producer did not finish"
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self._halt.set()
        self.join(30)


# ---------------------------------------------------------------------------------------------
# Data and checks


def ingest(target: Target, n_users: int, seed: int = 0) -> tuple[list[int], list[int], FeatureSchema]:
    """A small data set into `target`, activated; its users (spread over every shard) and items."""
    events = make_events(n_users=n_users, min_events=1, max_events=40, seed=seed)
    schema = schema_from_log(events, SchemaSpec(max_sequence_length=CAP))

    async def run() -> None:
        async with create_store(target.store_config()) as store:
            await ingest_log(store, events, schema, VERSION, batch_users=8, activate=True)

    asyncio.run(run())
    users = [int(u) for u in np.unique(events.user_id)]
    assert {ev.shard_of(str(u), SHARDS) for u in users} == set(range(SHARDS)), "users must cover every shard"
    return users, [int(i) for i in np.unique(events.item_id)], schema


def plan(users: list[int], items: list[int], per_user: int, tag: str) -> list[ev.StreamEvent]:
    """per_user events of each user, users interleaved, unique ids, strictly increasing time per user."""
    out = []
    for k in range(per_user):
        for n, user in enumerate(users):
            out.append(ev.StreamEvent(f"{tag}-{user}-{k}", user, items[(7 * k + n) % len(items)],
                                      ACTIONS[(k + n) % len(ACTIONS)], T0 + k))
    return out


def sequences(client: Any, users: list[int]) -> dict[int, Sequence]:
    pipe = client.pipeline(transaction=False)
    for user in users:
        pipe.get(keys.sequence_key(VERSION, user))
    return {user: decode_sequence(raw) for user, raw in zip(users, pipe.execute(), strict=True)}


def applied_count(client: Any, before: dict[int, Sequence]) -> int:
    """Events appended since `before` over all its users."""
    now = sequences(client, list(before))
    return sum(len(now[u]) - len(before[u]) for u in before)


def pending(client: Any) -> dict[int, dict[str, int]]:
    """shard -> consumer name -> entries delivered to it and not acknowledged (no group yet: empty)."""
    out: dict[int, dict[str, int]] = {}
    for shard in range(SHARDS):
        try:
            summary = client.xpending(ev.stream_key(shard), ev.GROUP)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            summary = {"consumers": []}
        out[shard] = {_text(c["name"]): int(c["pending"]) for c in summary["consumers"] or []}
    return out


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until the kernel reports `pid` stopped (state T): SIGSTOP is delivered asynchronously."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout}s of SIGSTOP")


def pending_of(client: Any, name: str) -> int:
    return sum(per.get(name, 0) for per in pending(client).values())


def lease_owners(client: Any) -> dict[int, str | None]:
    pipe = client.pipeline(transaction=False)
    for shard in range(SHARDS):
        pipe.get(ev.lease_key(shard))
    return {s: (_text(v) if v is not None else None) for s, v in enumerate(pipe.execute())}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_for(check: Callable[[], Any], what: str, timeout: float = DEADLINE_S, interval: float = 0.2,
             alive: Callable[[], None] | None = None) -> Any:
    """Poll `check()` until truthy (its value returned); fail naming `what` after `timeout`.
    `alive()` runs on every round (say, asserting that the consumers still run)."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def mismatch(user: int, got: Sequence, old: Sequence, mine: list[ev.StreamEvent]) -> str | None:
    """Why `got` is not `old` followed by `mine` (exactly once each, in order); None when it is."""
    want = np.r_[old.timestamp, [e.timestamp for e in mine]]
    if len(got) == len(want) and np.array_equal(got.timestamp, want):
        return None
    counts = Counter(got.timestamp[len(old):].tolist())
    produced = [e.timestamp for e in mine]
    missing = sum(1 for t in produced if t not in counts)
    repeated = sum(n - 1 for n in counts.values() if n > 1)
    order = "" if list(dict.fromkeys(got.timestamp[len(old):].tolist())) == sorted(counts) else ", out of order"
    return (f"user {user}: {len(got)} events, want {len(want)} ({len(old)} ingested + {len(mine)} streamed): "
            f"{missing} missing, {repeated} repeated{order}")


def check_applied(client: Any, before: dict[int, Sequence], sent: list[ev.StreamEvent],
                  schema: FeatureSchema) -> None:
    """Every user's sequence is what it was, then each of its streamed events once, in the order sent."""
    after = sequences(client, list(before))
    by_user: dict[int, list[ev.StreamEvent]] = {u: [] for u in before}
    for e in sent:
        by_user[int(e.user_id)].append(e)
    problems = [p for u in before if (p := mismatch(u, after[u], before[u], by_user[u])) is not None]
    assert not problems, f"{len(problems)} users wrong: " + "; ".join(problems[:5])
    for user, mine in by_user.items():
        got, n = after[user], len(before[user])
        np.testing.assert_array_equal(got.timestamp[:n], before[user].timestamp)
        np.testing.assert_array_equal(got.item[n:], schema.items.lookup(np.array([e.item_id for e in mine])))
        np.testing.assert_array_equal(got.action[n:], [ACTIONS.index(e.action) for e in mine])


def all_applied(client: Any, before: dict[int, Sequence], sent: list[ev.StreamEvent]) -> bool:
    """True once every user has its streamed events; fails at once on more than that (a repeat)."""
    want = Counter(int(e.user_id) for e in sent)
    now = sequences(client, list(before))
    over = [u for u in before if len(now[u]) > len(before[u]) + want[u]]
    assert not over, "more events than produced: " + "; ".join(
        str(mismatch(u, now[u], before[u], [e for e in sent if e.user_id == u])) for u in over[:5])
    return all(len(now[u]) == len(before[u]) + want[u] for u in before)


def nothing_pending(client: Any) -> bool:
    return all(not n for per in pending(client).values() for n in per.values())


def logged_event_ids(client: Any) -> list[str]:
    """The event ids in the shard streams, of packed and one-event entries alike."""
    ids: list[str] = []
    for shard in range(SHARDS):
        for _, fields in client.xrange(ev.stream_key(shard)):
            packed = fields.get(ev.FIELD_EVENTS)
            ids += [row[0] for row in orjson.loads(packed)] if packed is not None else [fields[ev.FIELD_ID].decode()]
    return ids


def clean_log(c: ConsumerProc) -> None:
    logs = c.logs()
    assert "Traceback" not in logs, logs[-4000:]
    assert "consumer stopped" in logs, logs[-4000:]


# ---------------------------------------------------------------------------------------------
# 1. consumers SIGKILLed mid-batch


KILLS = 3


def test_consumers_sigkilled_mid_batch_lose_and_repeat_nothing(
    target: Target, consumers: Callable[..., ConsumerProc]
) -> None:
    """Two consumers share the shards while 20,000 events stream in; three times one of them is
    SIGKILLed while it holds entries read and not acknowledged, and a new one starts. The
    survivors take the dead one's shards when its leases expire, claim its pending entries and
    apply them (again: the event ids make a repeat harmless). In the end every event is in its
    user's sequence once, in the order produced, and nothing is pending."""
    started = time.monotonic()
    users, items, schema = ingest(target, n_users=40)
    sent = plan(users, items, per_user=500, tag="k")  # 20,000 events, 500 a user (id window 1024, cap 2000)
    client = target.client()
    before = sequences(client, users)
    options = {"batch": 20, "lease_ms": 1000}
    live = [consumers("c0", target, **options), consumers("c1", target, **options)]

    def all_alive() -> None:
        for c in live:
            c.assert_alive()

    wait_for(lambda: set(lease_owners(client).values()) == {"c0", "c1"}, "both consumers to hold shards",
             alive=all_alive)

    producer = Producer(target, sent, chunk=500, pause_s=0.15)  # bursts: a backlog to be busy with
    producer.start()
    held_at_kill: list[int] = []
    try:
        for k in range(KILLS):
            wait_for(lambda k=k: producer.sent >= (k + 1) * len(sent) // (KILLS + 1) or not producer.is_alive(),
                     f"the producer to send {(k + 1) * 100 // (KILLS + 1)}% of the events", alive=all_alive)
            victim = live[k % 2]
            all_alive()
            # mid-batch: stopped while it holds entries delivered and not yet acknowledged
            held_at_kill.append(victim.stop_holding(client))
            victim.sigkill()
            live[k % 2] = consumers(f"c{k + 2}", target, **options)
        producer.finish()
    finally:
        producer.abort()

    wait_for(lambda: all_applied(client, before, sent), "every event to be applied", alive=all_alive, interval=0.5)
    wait_for(lambda: nothing_pending(client), "the group to have nothing pending", timeout=60, alive=all_alive)
    for c in live:
        assert c.sigterm() == 0, c.logs()[-4000:]
        clean_log(c)

    check_applied(client, before, sent, schema)
    assert nothing_pending(client), pending(client)
    logged = logged_event_ids(client)  # the log holds each event once: the repeats were the consumers'
    assert len(logged) == len(sent) and set(logged) == {e.event_id for e in sent}
    assert client.exists(ev.DEAD_LETTER_KEY) == 0
    # the kills hit consumers holding batches: what they held was claimed and applied by the others
    assert sum(held_at_kill) > 0, held_at_kill
    client.close()
    print(f"\n{target.name}: {len(sent)} events, {KILLS} consumers SIGKILLed holding {held_at_kill} "
          f"unacknowledged entries; all applied once in order in {time.monotonic() - started:.1f}s")


# ---------------------------------------------------------------------------------------------
# 2. Redis restarted under a running consumer


@pytest.fixture(params=["valkey", "redis"])
def aof_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AofServer]:
    if request.param == "valkey":
        binary = valkey_binary()
    elif REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server, or `make redis-server`)")
    else:
        binary = REDIS_SERVER
    server = AofServer(binary, tmp_path / request.param)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_restarted_under_a_running_consumer(
    aof_server: AofServer, consumers: Callable[..., ConsumerProc]
) -> None:
    """Events produced before, during and after a graceful restart of a persistent Redis (AOF,
    fsync always) while `rankserve consume` runs: the consumer keeps going (no exit), the producer
    resends what failed while Redis was away, and every event is applied once, in order."""
    started = time.monotonic()
    target = Target(Path(aof_server.binary).name, [aof_server.port], aof_server.url)
    users, items, schema = ingest(target, n_users=40)
    sent = plan(users, items, per_user=120, tag="r")  # 4,800 events
    client = target.client()
    before = sequences(client, users)
    consumer = consumers("solo", target, batch=50, lease_ms=2000)
    wait_for(lambda: set(lease_owners(client).values()) == {"solo"}, "the consumer to hold every shard",
             alive=consumer.assert_alive)

    producer = Producer(target, sent, chunk=40, pause_s=0.02)
    producer.start()
    try:
        wait_for(lambda: producer.sent >= len(sent) // 3 and applied_count(client, before) > 0,
                 "a third of the events sent and some applied", alive=consumer.assert_alive, interval=0.05)
        applied_before = applied_count(client, before)
        sent_before = producer.sent
        failures_before = producer.failures
        aof_server.shutdown()
        time.sleep(3.0)  # down past the lease (2 s): sends and the consumer's steps fail meanwhile
        consumer.assert_alive()
        aof_server.start()
        client.close()  # its connection died with the server; the next command opens a new one
        sent_at_restart = producer.sent
        failures_during = producer.failures - failures_before
        producer.finish()
    finally:
        producer.abort()

    wait_for(lambda: all_applied(client, before, sent), "every event to be applied", alive=consumer.assert_alive,
             interval=0.5)
    wait_for(lambda: nothing_pending(client), "the group to have nothing pending", timeout=60,
             alive=consumer.assert_alive)
    consumer.assert_alive()
    assert consumer.sigterm() == 0, consumer.logs()[-4000:]
    clean_log(consumer)

    check_applied(client, before, sent, schema)
    assert nothing_pending(client), pending(client)
    assert sent_before < len(sent) and sent_at_restart < len(sent), "events must also be produced after the restart"
    assert failures_during > 0, "no send failed while Redis was down"
    assert "event log unreachable; retrying" in consumer.logs() or "batch failed" in consumer.logs()
    client.close()
    print(f"\n{target.name} restarted (AOF): {len(sent)} events, {applied_before} applied before the shutdown, "
          f"{sent_before} sent before, {failures_during} sends failed while down; all applied once in order in "
          f"{time.monotonic() - started:.1f}s")


# ---------------------------------------------------------------------------------------------
# 3. malformed entries


BAD_KINDS: list[tuple[str, Callable[[str, str], dict[bytes, bytes]], str]] = [
    # (kind, fields from (event id, user id text), what the dead-letter reason must say)
    ("no id", lambda i, u: {b"u": u.encode(), b"i": b"5", b"a": b"buy", b"t": b"1"}, "field 'id' is missing"),
    ("no user", lambda i, u: {b"id": i.encode(), b"i": b"5", b"a": b"buy", b"t": b"1"}, "field 'u' is missing"),
    ("no item", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"a": b"buy", b"t": b"1"}, "field 'i' is missing"),
    ("no action", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"i": b"5", b"t": b"1"}, "field 'a' is missing"),
    ("no time", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"i": b"5", b"a": b"buy"}, "field 't' is missing"),
    ("unknown action", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"i": b"5", b"a": b"teleport", b"t": b"1"},
     "action 'teleport' is not one of"),
    ("text time", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"i": b"5", b"a": b"buy", b"t": b"soon"},
     "t must be integer unix seconds"),
    ("fractional time", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"i": b"5", b"a": b"buy", b"t": b"1.5"},
     "t must be integer unix seconds"),
    ("negative time", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"i": b"5", b"a": b"buy", b"t": b"-5"},
     "t must be in 0.."),
    ("time past u32", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"i": b"5", b"a": b"buy",
                                    b"t": str(1 << 40).encode()}, "t must be in 0.."),
    ("text user", lambda i, u: {b"id": i.encode(), b"u": b"alice", b"i": b"5", b"a": b"buy", b"t": b"1"},
     "u 'alice' is not an integer"),
    ("text item", lambda i, u: {b"id": i.encode(), b"u": u.encode(), b"i": b"bob", b"a": b"buy", b"t": b"1"},
     "i 'bob' is not an integer"),
    ("negative user", lambda i, u: {b"id": i.encode(), b"u": b"-3", b"i": b"5", b"a": b"buy", b"t": b"1"},
     "u -3 is outside 0..2^63-1"),
    ("user past int64", lambda i, u: {b"id": i.encode(), b"u": b"9223372036854775808", b"i": b"5", b"a": b"buy",
                                      b"t": b"1"}, "is outside 0..2^63-1"),
    ("user not UTF-8", lambda i, u: {b"id": i.encode(), b"u": b"\xff\xfe", b"i": b"5", b"a": b"buy", b"t": b"1"},
     "u is not UTF-8 text"),
    ("over-long user", lambda i, u: {b"id": i.encode(), b"u": b"7" * 300, b"i": b"5", b"a": b"buy", b"t": b"1"},
     "u must have 1-256 characters, got 300"),
    ("over-long id", lambda i, u: {b"id": (i + "x" * 200).encode()[:129], b"u": u.encode(), b"i": b"5", b"a": b"buy",
                                   b"t": b"1"}, "id must have 1-128 bytes, got 129"),
    ("empty id", lambda i, u: {b"id": b"", b"u": u.encode(), b"i": b"5", b"a": b"buy", b"t": b"1"},
     "id must have 1-128 bytes, got 0"),
]
N_BAD = 1000


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def test_malformed_events_go_to_dead_letters_and_the_consumer_carries_on(
    consumers: Callable[..., ConsumerProc]
) -> None:
    """1,000 malformed entries of every kind, interleaved with good events, while the consumer
    runs: each lands in `rs:ev:dead` with a reason naming the problem, every good event is applied
    in order, the consumer never exits, and its metrics count the 1,000 dead letters."""
    started = time.monotonic()
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
        target = Target("valkey", [valkey.port], valkey.url)
        users, items, schema = ingest(target, n_users=40)
        good = plan(users, items, per_user=75, tag="g")  # 3,000 events
        client = target.client()
        before = sequences(client, users)
        port = free_port()
        consumer = consumers("solo", target, batch=100, lease_ms=1000, metrics_port=port)
        wait_for(lambda: set(lease_owners(client).values()) == {"solo"}, "the consumer to hold every shard",
                 alive=consumer.assert_alive)

        # a bad entry after every third good one, on the shard of the good one's user: in stream order
        expected: dict[tuple[int, bytes], tuple[str, str]] = {}  # (shard, entry id) -> (kind, reason needle)
        stream: list[tuple[int, dict[bytes, bytes], tuple[str, str] | None]] = []
        bad = 0
        for n, event in enumerate(good):
            shard = ev.shard_of(str(event.user_id), SHARDS)
            stream.append((shard, event.fields(), None))
            if n % 3 == 2 and bad < N_BAD:
                kind, make, needle = BAD_KINDS[bad % len(BAD_KINDS)]
                stream.append((shard, make(f"bad-{bad}", str(event.user_id)), (kind, needle)))
                bad += 1
        assert bad == N_BAD
        for lo in range(0, len(stream), 200):
            pipe = client.pipeline(transaction=False)
            part = stream[lo : lo + 200]
            for shard, fields, _ in part:
                pipe.xadd(ev.stream_key(shard), fields)
            for (shard, _, why), entry in zip(part, pipe.execute(), strict=True):
                if why is not None:
                    expected[(shard, entry)] = why
            consumer.assert_alive()
            time.sleep(0.02)

        wait_for(lambda: client.xlen(ev.DEAD_LETTER_KEY) >= N_BAD and all_applied(client, before, good),
                 "every good event applied and every bad one dead-lettered", alive=consumer.assert_alive,
                 interval=0.5)
        wait_for(lambda: nothing_pending(client), "the group to have nothing pending", timeout=60,
                 alive=consumer.assert_alive)
        metrics = wait_for(lambda: _metrics_once_counted(port, N_BAD), "the metrics to count every dead letter",
                           timeout=60, alive=consumer.assert_alive)
        consumer.assert_alive()
        assert consumer.sigterm() == 0, consumer.logs()[-4000:]
        clean_log(consumer)

        letters = client.xrange(ev.DEAD_LETTER_KEY)
        assert len(letters) == N_BAD, len(letters)
        got: dict[tuple[int, bytes], str] = {}
        for _, fields in letters:
            got[(int(fields[b"shard"]), fields[b"entry"])] = fields[b"reason"].decode()
        assert set(got) == set(expected), "dead letters are not exactly the malformed entries"
        wrong = [(kind, needle, got[k]) for k, (kind, needle) in expected.items() if needle not in got[k]]
        assert not wrong, wrong[:5]
        by_kind = Counter(kind for kind, _ in expected.values())
        assert len(by_kind) == len(BAD_KINDS)
        # each letter keeps the entry's fields, so it can be fixed and sent again
        sample = next(fields for _, fields in letters if fields[b"reason"].startswith(b"action"))
        assert sample[b"f.a"] == b"teleport" and sample[b"f.id"].startswith(b"bad-")

        check_applied(client, before, good, schema)
        assert nothing_pending(client), pending(client)
        assert metric(metrics, 'rankserve_consumer_events_total{outcome="dead_letter"}') == N_BAD
        assert metric(metrics, 'rankserve_consumer_events_total{outcome="appended"}') == len(good)
        assert metric(metrics, "rankserve_consumer_failed_batches_total") == 0
        client.close()
    print(f"\nmalformed: {N_BAD} dead letters ({len(by_kind)} kinds) among {len(good)} good events, consumer "
          f"never exited, {time.monotonic() - started:.1f}s")


def _metrics_once_counted(port: int, dead_letters: int) -> str | None:
    """The metrics page once it counts `dead_letters` dead letters (a step's counts land after its acks)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    match = re.search(r'^rankserve_consumer_events_total\{outcome="dead_letter"\} (\S+)$', text, re.MULTILINE)
    return text if match and float(match.group(1)) >= dead_letters else None



# ---------------------------------------------------------------------------------------------
# 4. a read whose reply is lost


class ReplyDropProxy(LatencyProxy):
    """A loopback relay to Redis that, while `armed` > 0, lets the next request holding an
    XREADGROUP reach the server and then closes the connection instead of relaying its reply: the
    entries are delivered to the consumer group, the consumer never sees them (a connection lost
    on the way back). `dropped` counts such replies, `dropped_entries` those that carried entries."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.armed = 0
        self.dropped = 0
        self.dropped_entries = 0

    def _relays(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> list[Coroutine[Any, Any, None]]:
        doomed = asyncio.Event()

        async def requests() -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await client_reader.read(65536):
                    if self.armed > 0 and b"XREADGROUP" in chunk:
                        self.armed -= 1
                        doomed.set()
                    up_writer.write(chunk)
                    await up_writer.drain()

        async def replies() -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await up_reader.read(65536):
                    if doomed.is_set():  # the doomed request's reply (the client sends one request at a time)
                        self.dropped += 1
                        self.dropped_entries += b"$" in chunk  # bulk strings: entries, not nil arrays
                        return
                    client_writer.write(chunk)
                    await client_writer.drain()

        return [requests(), replies()]


DROPS = 5


def test_a_read_whose_reply_is_lost_is_claimed_not_skipped(consumers: Callable[..., ConsumerProc]) -> None:
    """The connection drops after an XREADGROUP reached Redis and before its reply came back, five
    times while events stream in. Those entries are delivered to the consumer group (pending on the
    consumer) though the consumer never saw them: it must claim and apply them before anything
    newer, not read past them (a repeated XREADGROUP ">" returns the entries after them)."""
    started = time.monotonic()
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey, \
            ReplyDropProxy(valkey.port) as proxy:
        target = Target("valkey", [valkey.port], valkey.url)
        users, items, schema = ingest(target, n_users=40)
        sent = plan(users, items, per_user=100, tag="d")  # 4,000 events
        client = target.client()
        before = sequences(client, users)
        consumer = consumers("solo", Target("proxied", [proxy.port], proxy.url()), batch=20, lease_ms=2000)
        wait_for(lambda: set(lease_owners(client).values()) == {"solo"}, "the consumer to hold every shard",
                 alive=consumer.assert_alive)
        producer = Producer(target, sent, chunk=400, pause_s=0.3)
        producer.start()
        try:
            while proxy.dropped_entries < DROPS and producer.is_alive():
                if proxy.armed == 0:
                    proxy.armed = 1
                consumer.assert_alive()
                time.sleep(0.05)
            proxy.armed = 0
            producer.finish()
        finally:
            producer.abort()
        assert proxy.dropped_entries >= 1, "no reply carrying entries was dropped"

        wait_for(lambda: all_applied(client, before, sent), "every event to be applied (the lost reads included)",
                 timeout=120, alive=consumer.assert_alive, interval=0.5)
        wait_for(lambda: nothing_pending(client), "the group to have nothing pending", timeout=60,
                 alive=consumer.assert_alive)
        assert consumer.sigterm() == 0, consumer.logs()[-4000:]
        clean_log(consumer)
        check_applied(client, before, sent, schema)
        client.close()
    print(f"\nlost replies: {proxy.dropped} XREADGROUP replies dropped ({proxy.dropped_entries} with entries) among "
          f"{len(sent)} events; all applied once in order in {time.monotonic() - started:.1f}s")
