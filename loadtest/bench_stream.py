"""`rankserve bench --sections stream`: the event log and `rankserve consume` on the standard workload.

Three measurements, each side by side in one run:

* throughput: one in-process `StreamConsumer` against the raw floor, in alternating rounds.
  Each round XADDs `events` new events (users drawn from `population` users, the workload's
  ingested users among them; items from the catalogue) to the shard streams, with
  `EventProducer` sends of `producer_batch` events (packed entries, one per shard a send); then the
  consumer drains them (decode, resolve items, the once-per-id capped append, acknowledge),
  and the floor reads the same entries in a group of its own (XREADGROUP, COUNT per shard as
  the entries of the consumer's batch) and appends one 12-byte record per event to its user's key
  with a pipelined APPEND (redis-py, hiredis; the packed JSON parsed by orjson for the users,
  nothing else decoded) before XACK. Reported: events/s of each and floor / consumer.
  With `cluster_ids`, the workload's histories are clustered first (`rankserve recluster`) and
  the consumer's rounds alternate between plain appends and appends with nearest-centroid
  `twin_v2` cluster ids (`--cluster-bundle`; before each such round, untimed, `recluster` covers
  what the plain rounds appended, else the ids would be refused); both rates are reported.
* event-to-servable latency: a `rankserve serve` and a `rankserve consume` process, a
  background producer (a process of its own) adding `rate` events/s for other users than the
  workload's, and probes: POST one event for a workload user to `/v1/events`, then rank that
  user (10 candidates, `debug`) until `history_newest_ts` is the probe's time. Latency = from
  before the POST to the rank that shows it.
* serving while consuming: REST p50 / p99 at concurrency 1 with the standard requests, rounds
  alternating between the producer off (idle) and on at `rate` events/s (consumer running in
  both); the ratio of p99s, and the cores each process used in each phase (the server with its
  workers, the consumer, Valkey from its INFO, the producer, the whole machine), which is what
  tells where a p99 rise comes from on a machine all of them share. With `control_cores`, a
  third phase runs beside a process that keeps that many cores busy in slices every 20 ms
  without events or Redis work (consumer idle): the control that separates what the event log
  costs serving from what any such load on the same cores does.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from loadtest.loadgen import HttpPool, closed_loop, latency_summary, rest_call
from loadtest.serving import REPO, ServerProcess

if TYPE_CHECKING:
    from loadtest.bench import Workload
    from loadtest.serving import PreparedWorkload

SHARDS = 8
TOKEN = "bench-events-token"
RAW_GROUP = b"rawfloor"
RECORD = bytes(12)


class EventSource:
    """Deterministic events over a user population and the catalogue, unique ids, rising times."""

    def __init__(self, users: Sequence[int], items: Sequence[int], population: int, t0: int, seed: int = 0) -> None:
        base = max(users) + 1
        extra = np.arange(base, base + max(0, population - len(users)), dtype=np.int64)
        self.users = np.r_[np.asarray(users, dtype=np.int64), extra]
        self.items = np.asarray(items, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.t = t0
        self.n = 0

    def batch(self, n: int, prefix: str = "b") -> list[Any]:
        """`n` click events at one time; event ids `prefix` + a running count."""
        from feature_store.events import StreamEvent

        users = self.rng.choice(self.users, n).tolist()
        items = self.rng.choice(self.items, n).tolist()
        out = [StreamEvent(f"{prefix}{self.n + k}", u, i, "click", self.t)
               for k, (u, i) in enumerate(zip(users, items, strict=True))]
        self.n += n
        self.t += 1
        return out


def _send(client: Any, events: list[Any], chunk: int = 2000) -> int:
    """Send `events` with `EventProducer` in chunks; returns how many entries hold them."""
    from feature_store.events import EventProducer, shard_of

    producer = EventProducer(client, shards=SHARDS)
    entries = 0
    for k in range(0, len(events), chunk):
        part = events[k : k + chunk]
        # an entry id is unique within its stream only
        entries += len({(shard_of(str(e.user_id), SHARDS), i) for e, i in zip(part, producer.send(part), strict=True)})
    return entries


async def _consumer_drain(consumer: Any, n: int) -> float:
    """Seconds until `n` entries are read and applied (a step applies the batch the one before it
    read, so the clock stops at the first step after the last read that reads nothing)."""
    t0 = time.perf_counter()
    read = 0
    while True:
        got = (await consumer.step()).read
        if read >= n and got == 0:
            return time.perf_counter() - t0
        read += got


async def _raw_floor(client: Any, n: int, count: int) -> float:
    from feature_store.events import stream_key

    keys = [stream_key(s) for s in range(SHARDS)]
    t0 = time.perf_counter()
    read = 0
    while read < n:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.xreadgroup(RAW_GROUP, b"raw", {key: b">"}, count=count)
        replies = await pipe.execute()
        pipe = client.pipeline(transaction=False)
        for reply in replies:
            for key, entries in reply or ():
                for _, fields in entries:
                    # the packed entry's users, with the C JSON parser and nothing else
                    for row in orjson.loads(fields[b"e"]):
                        pipe.append(b"rsbench:raw:{u%d}" % row[1], RECORD)
                        read += 1
                if entries:
                    pipe.xack(key, RAW_GROUP, *(eid for eid, _ in entries))
        await pipe.execute()
    return time.perf_counter() - t0


def section_throughput(redis_url: str, source: EventSource, rounds: int, events: int, batch: int,
                       clusterer: Any = None, producer_batch: int = 1000) -> dict[str, Any]:
    import redis
    import redis.asyncio as aredis

    from feature_store import events as ev
    from feature_store.redis_store import RedisOnlineStore, create_store
    from feature_store.store import FeatureStoreConfig
    from ingest.recluster import recluster
    from ingest.stream import ConsumerConfig, StreamConsumer, tune_gc

    sync = redis.Redis.from_url(redis_url, socket_timeout=30)
    for s in range(SHARDS):
        sync.xgroup_create(ev.stream_key(s), RAW_GROUP, id="$", mkstream=True)

    async def run() -> dict[str, Any]:
        store = create_store(FeatureStoreConfig(url=redis_url, read_timeout_s=30, request_timeout_s=60,
                                                item_cache_size=0))
        assert isinstance(store, RedisOnlineStore)
        raw = aredis.Redis.from_url(redis_url, socket_timeout=30)
        clustered_users = 0
        version = await store.active_version()
        assert version is not None
        if clusterer is not None:
            clustered_users = (await recluster(store, clusterer, version, all_users=True)).reclustered
        # block_ms=1: the step that applies a round's last batch reads an empty stream, and its
        # wait (100 ms by default) would count into the round's time
        consumer = StreamConsumer(store, ConsumerConfig(shards=SHARDS, batch=batch, block_ms=1, name="bench"))
        await consumer.rebalance(force=True)
        for _ in range(3):  # walk the (empty) pending lists of the fresh leases
            await consumer.step()
        tune_gc()  # as `rankserve consume` does (this process holds the bench's objects too: frozen alike)
        seconds: dict[str, list[float]] = {"consumer": [], "raw_floor": []}
        entries = 0
        if clusterer is not None:
            seconds["consumer_cluster_ids"] = []
        try:
            for r in range(rounds):
                entries = _send(sync, source.batch(events), chunk=producer_batch)
                # with cluster ids, the consumer's mode alternates every other round, so that each
                # mode goes first against the floor as often as the other
                mode = "consumer_cluster_ids" if clusterer is not None and r % 4 in (1, 2) else "consumer"
                order = [mode, "raw_floor"] if r % 2 == 0 else ["raw_floor", mode]
                for name in order:
                    if name == "raw_floor":
                        # the entries the consumer's reads of `batch` events take
                        count = max(1, round(batch * entries / events))
                        seconds[name].append(await _raw_floor(raw, events, count))
                        continue
                    consumer.clusterer = clusterer if name == "consumer_cluster_ids" else None
                    if consumer.clusterer is not None:  # untimed: cover what the plain rounds appended
                        await recluster(store, clusterer, version)
                    # the consumer sat idle through the other phases: renew its leases first
                    await consumer.rebalance(force=True)
                    seconds[name].append(await _consumer_drain(consumer, events))
        finally:
            await consumer.close()
            await raw.aclose()
            await store.aclose()
        rate = {k: events * len(v) / sum(v) for k, v in seconds.items() if v}
        out = {
            "events_per_round": events, "rounds": rounds, "batch_per_shard": batch, "shards": SHARDS,
            "producer_batch": producer_batch, "events_per_entry": round(events / max(1, entries), 1),
            "consumer_events_per_s": round(rate["consumer"]),
            "raw_floor_events_per_s": round(rate["raw_floor"]),
            "floor_over_consumer": round(rate["raw_floor"] / rate["consumer"], 3),
            "per_round_s": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        }
        if "consumer_cluster_ids" in rate:
            ids = consumer.metrics.cluster_ids.labels
            out |= {"consumer_cluster_ids_events_per_s": round(rate["consumer_cluster_ids"]),
                    "clustered_users": clustered_users,
                    "cluster_ids": {k: int(ids(k)._value.get()) for k in ("assigned", "no_clustering", "stale",
                                                                          "changed")}}
        return out

    return asyncio.run(run())


def _produce(redis_url: str, source: EventSource, rate: float, prebuild_s: float, stop: Any, ready: Any,
             sent: Any, seconds: Any) -> None:
    """The background producer's process: XADD `rate` events/s in batches every 20 ms until `stop`.

    The first `prebuild_s` seconds of batches are encoded (pipelined XADDs in RESP) before
    `ready`, so while the phase is measured this process mostly writes bytes and reads replies:
    a load generator's own CPU is not what the measurement is about, and on a machine the server
    shares it would otherwise count against serving. Later batches are encoded as they go.
    """
    import os

    import redis

    from feature_store.events import EventProducer

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    conn: Any = client.connection_pool.get_connection()  # redis-py's Connection is untyped
    tick = 0.02
    per_tick = max(1, round(rate * tick))
    prefix = f"b{os.getpid()}-{time.time_ns()}-"  # unique over producer starts: no id is a duplicate

    xadds = EventProducer(client, shards=SHARDS)

    def encoded() -> tuple[bytes, int]:
        commands, _ = xadds.xadd_commands(source.batch(per_tick, prefix))
        return b"".join(bytes(part) for part in conn.pack_commands(commands)), len(commands)

    ahead = [encoded() for _ in range(max(1, round(prebuild_s / tick)))]
    ready.set()
    t0 = time.perf_counter()
    next_at = t0
    k = 0
    try:
        while not stop.is_set():
            packed, replies = ahead[k] if k < len(ahead) else encoded()
            conn.send_packed_command([packed])
            for _ in range(replies):
                conn.read_response()
            k += 1
            sent.value += per_tick
            next_at += tick
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
    finally:
        seconds.value += time.perf_counter() - t0
        client.connection_pool.release(conn)


class CpuMeter:
    """CPU seconds of named processes (with their children) and of a Redis server (INFO cpu), read
    at the start and end of each phase and summed per phase; `cores()` is CPU seconds / wall."""

    def __init__(self, redis_url: str, pids: dict[str, int]) -> None:
        import psutil
        import redis

        self._psutil = psutil
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=10)
        self._pids = dict(pids)
        self._cpu: dict[str, dict[str, float]] = {}
        self._wall: dict[str, float] = {}
        self._commands: dict[str, dict[str, float]] = {}  # phase -> Valkey command -> CPU seconds
        self._calls: dict[str, dict[str, float]] = {}  # phase -> Valkey command -> calls

    def _process_cpu(self, pid: int) -> float:
        try:
            proc = self._psutil.Process(pid)
            total = sum(proc.cpu_times()[:2])
            for child in proc.children(recursive=True):
                with contextlib.suppress(self._psutil.Error):
                    total += sum(child.cpu_times()[:2])
            return float(total)
        except self._psutil.Error:
            return 0.0

    def nice(self, name: str) -> int:
        """The scheduling priority of process `name` as the kernel reports it (0: the default)."""
        return int(self._psutil.Process(self._pids[name]).nice())

    def _command_stats(self) -> dict[str, tuple[float, int]]:
        """Valkey command -> (CPU seconds, calls) so far (commands run by scripts included)."""
        stats = self._redis.info("commandstats")
        return {name.removeprefix("cmdstat_"): (float(v["usec"]) / 1e6, int(v["calls"])) for name, v in stats.items()}

    def _snapshot(self, extra: dict[str, int]) -> dict[str, float]:
        info = self._redis.info("cpu")
        out = {name: self._process_cpu(pid) for name, pid in (self._pids | extra).items()}
        out["valkey"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        machine = self._psutil.cpu_times()
        out["machine"] = float(sum(machine) - machine.idle - getattr(machine, "iowait", 0.0))
        return out

    @contextlib.contextmanager
    def phase(self, name: str, extra: dict[str, int] | None = None) -> Any:
        """Count the block's CPU seconds and wall time into phase `name`; `extra`: processes of this phase only."""
        extra = extra or {}
        commands_before = self._command_stats()
        before, t0 = self._snapshot(extra), time.perf_counter()
        try:
            yield
        finally:
            after, wall = self._snapshot(extra), time.perf_counter() - t0
            spent = self._commands.setdefault(name, {})
            calls = self._calls.setdefault(name, {})
            for command, (seconds, n) in self._command_stats().items():
                seconds_before, n_before = commands_before.get(command, (0.0, 0))
                spent[command] = spent.get(command, 0.0) + seconds - seconds_before
                calls[command] = calls.get(command, 0) + n - n_before
            acc = self._cpu.setdefault(name, {})
            for key, value in after.items():
                acc[key] = acc.get(key, 0.0) + max(value - before.get(key, value), 0.0)
            self._wall[name] = self._wall.get(name, 0.0) + wall

    def cores(self) -> dict[str, dict[str, float]]:
        return {phase: {k: round(v / self._wall[phase], 3) for k, v in acc.items()} for phase, acc in self._cpu.items()}

    def valkey_commands(self, top: int = 6) -> dict[str, dict[str, float]]:
        """Per phase, the Valkey commands that took the most of its time (cores: seconds / wall)."""
        return self._top_per_second(self._commands, top, 4)

    def valkey_calls(self, top: int = 8) -> dict[str, dict[str, float]]:
        """Per phase, the Valkey commands called most often (calls per second of the phase's wall)."""
        return self._top_per_second(self._calls, top, 1)

    def _top_per_second(self, totals: dict[str, dict[str, float]], top: int,
                        digits: int) -> dict[str, dict[str, float]]:
        out = {}
        for phase, by_command in totals.items():
            ranked = sorted(by_command.items(), key=lambda kv: -kv[1])[:top]
            out[phase] = {k: round(v / self._wall[phase], digits) for k, v in ranked if v > 0}
        return out


class BackgroundProducer:
    """XADDs `rate` events/s in batches every 20 ms from a process of its own (a thread of the
    bench would hold the GIL the load generator's latency measurements need), until stopped."""

    def __init__(self, redis_url: str, source: EventSource, rate: float, prebuild_s: float = 20.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._sent = ctx.Value("q", 0)
        self._seconds = ctx.Value("d", 0.0)
        self._args = (redis_url, source, rate, prebuild_s, self._stop, self._ready, self._sent, self._seconds)
        self._ctx = ctx
        self._proc: Any = None

    def start(self) -> BackgroundProducer:
        """Start the process; return once its first batches are encoded and it is sending."""
        self._stop.clear()
        self._ready.clear()
        self._proc = self._ctx.Process(target=_produce, args=self._args, daemon=True)
        self._proc.start()
        while not self._ready.wait(0.5):
            if not self._proc.is_alive():
                raise RuntimeError(f"the background producer exited with code {self._proc.exitcode}")
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        """Stop the process; raise if it failed (a phase without its load measures nothing)."""
        self._stop.set()
        if self._proc is not None:
            self._proc.join(30)
            if self._proc.exitcode != 0:
                raise RuntimeError(f"the background producer exited with code {self._proc.exitcode}")

    @property
    def achieved_rate(self) -> float:
        return self._sent.value / self._seconds.value if self._seconds.value else 0.0


def _burn(cores: float, stop: Any) -> None:
    """The control phase's process: busy `cores` x 20 ms of every 20 ms (Python arithmetic, no I/O)."""
    busy, tick = cores * 0.02, 0.02
    next_at = time.perf_counter()
    while not stop.is_set():
        end = time.perf_counter() + busy
        while time.perf_counter() < end:  # the clock reads themselves are the work
            pass
        next_at += tick
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)


class CpuBurner:
    """A process of its own that keeps `cores` of CPU busy in slices every 20 ms, as a consumer
    and its Redis work do at a steady event rate, but without touching Redis: the control that
    tells what any such load on the same cores does to serving."""

    def __init__(self, cores: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_burn, args=(cores, self._stop), daemon=True)

    def start(self) -> CpuBurner:
        self._proc.start()
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(30)
        if self._proc.exitcode != 0:
            raise RuntimeError(f"the control burner exited with code {self._proc.exitcode}")


async def _probe_latencies(server: ServerProcess, users: Sequence[int], items: Sequence[int], probes: int,
                           request_time: int) -> list[float]:
    pool = HttpPool("127.0.0.1", server.http_port)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    out: list[float] = []
    cands = [int(i) for i in items[:10]]
    for k in range(probes):
        user = int(users[k % len(users)])
        ts = request_time - 3000 + k  # newer than the workload's events, older than the rank's request time
        body = orjson.dumps({"events": [{"event_id": f"probe-{k}-{time.time_ns()}", "user_id": user,
                                         "item_id": cands[0], "action": "click", "timestamp": ts}]})
        rank = orjson.dumps({"user_id": user, "candidates": cands, "top_n": 1, "request_time": request_time,
                             "debug": True})
        t0 = time.perf_counter()
        status, payload = await pool.post("/v1/events", body, auth)
        if status != 202:
            raise RuntimeError(f"/v1/events answered {status}: {payload[:200]!r}")
        while True:
            status, payload = await pool.post("/v1/rank", rank)
            if status == 200 and orjson.loads(payload)["debug"]["history_newest_ts"] == ts:
                break
            if time.perf_counter() - t0 > 10:
                raise RuntimeError(f"probe {k} not servable after 10 s")
        out.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.02)
    await pool.close()
    return out


def section_stream(root: Path, w: Workload, first: PreparedWorkload, redis_url: str, bodies: Sequence[bytes],
                   server_env: dict[str, str], *, rounds: int = 6, events: int = 100_000, batch: int = 1000,
                   population: int = 100_000, rate: float = 5000.0, probes: int = 200,
                   serve_requests: int = 150, cluster_ids: bool = False, throughput_only: bool = False,
                   consumer_nice: int = 0, control_cores: float = 0.0, producer_batch: int = 1000,
                   ) -> dict[str, Any]:
    """The three measurements of the module doc, against the workload's store at `redis_url`."""
    if control_cores and not 0 < control_cores < 1:  # checked before the long set-up, not at the first control phase
        raise ValueError(f"control cores must be in (0, 1), got {control_cores}")
    items = list(first.items) if isinstance(first.items, range) and len(first.items) < 2_000_000 else first.items
    source = EventSource(first.users, items, population, t0=w.request_time - 7200)
    clusterer = None
    if cluster_ids:
        from ingest.bulk import clusterer_from_bundle

        clusterer = clusterer_from_bundle(first.bundle_path)
    report: dict[str, Any] = {"throughput": section_throughput(redis_url, source, rounds, events, batch, clusterer,
                                                               producer_batch)}
    report["throughput"]["population"] = population
    if throughput_only:
        return report
    # The background load goes to users other than the workload's: a probe checks that its event
    # is the newest behaviour of its user, which a background event appended just after it would
    # hide; and the served histories stay the same whether the producer runs or not.
    background = EventSource([max(first.users) + 1], items, population, t0=w.request_time - 7200, seed=1)

    env = dict(server_env) | {"RANKSERVE_EVENTS_TOKEN": TOKEN, "RANKSERVE_EVENT_SHARDS": str(SHARDS)}
    consume_log = (root / "consume.log").open("wb")
    consumer = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "consume", "--redis-url", redis_url, "--shards", str(SHARDS),
         "--lease-ms", "3000", "--nice", str(consumer_nice)], cwd=REPO, stdout=consume_log, stderr=subprocess.STDOUT)
    try:
        with ServerProcess(first.model_dir, redis_url, env=env, log_path=root / "stream-server.log") as server:
            producer = BackgroundProducer(redis_url, background, rate)
            producer.start()
            try:
                lat = asyncio.run(_probe_latencies(server, first.users, list(first.items[:10]), probes,
                                                   w.request_time))
            finally:
                producer.stop()
            report["event_to_servable_ms"] = latency_summary(lat) | {
                "background_events_per_s": round(producer.achieved_rate)}
            assert server.proc is not None
            meter = CpuMeter(redis_url, {"server": server.proc.pid, "consumer": consumer.pid})
            serving = _serving_rounds(server, bodies, redis_url, background, rate, rounds, serve_requests, meter,
                                      control_cores)
            # the priority the consumer runs at, as the kernel reports it (not merely as requested)
            report["serving_while_consuming"] = serving | {"consumer_nice": meter.nice("consumer")}
    finally:
        consumer.terminate()
        report["consumer_exit_code"] = consumer.wait(60)
        consume_log.close()
    return report


def _serving_rounds(server: ServerProcess, bodies: Sequence[bytes], redis_url: str, source: EventSource,
                    rate: float, rounds: int, requests: int, meter: CpuMeter,
                    control_cores: float = 0.0) -> dict[str, Any]:
    """Rounds of `requests` REST requests at concurrency 1 in each phase, the phases' order
    rotating every round: idle, consuming (the producer at `rate`), and with `control_cores` > 0
    a control phase beside a `CpuBurner` of that many cores (consumer idle, no producer)."""
    async def measure() -> list[float]:
        pool = HttpPool("127.0.0.1", server.http_port)
        try:
            result = await closed_loop(rest_call(pool, bodies), 1, requests, warmup=10)
        finally:
            await pool.close()
        return result.latencies_ms

    achieved: list[float] = []

    @contextlib.contextmanager
    def beside(phase: str) -> Any:
        """The phase's background process while the block runs, and its pid for the meter."""
        if phase == "idle":
            yield {}
        elif phase == "control":
            burner = CpuBurner(control_cores).start()
            try:
                yield {"burner": burner.pid or 0}
            finally:
                burner.stop()
        else:
            producer = BackgroundProducer(redis_url, source, rate, prebuild_s=10.0).start()
            time.sleep(1.0)  # the consumer at its steady pace before measuring
            try:
                yield {"producer": producer.pid or 0}
            finally:
                producer.stop()
            achieved.append(producer.achieved_rate)

    phases = ["idle", "consuming"] + (["control"] if control_cores else [])
    lat: dict[str, list[float]] = {phase: [] for phase in phases}
    idle_by_parity: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        # the order rotates, so that each phase comes first as often as the others
        for phase in phases[r % len(phases):] + phases[: r % len(phases)]:
            with beside(phase) as extra, meter.phase(phase, extra):
                got = asyncio.run(measure())
            lat[phase] += got
            if phase == "idle":
                idle_by_parity[r % 2].extend(got)
    summary = {k: latency_summary(v) for k, v in lat.items()}
    # The same ratio between two halves of the idle phase (odd rounds over even rounds): what
    # this measurement gives when nothing differs, at half the requests of each side.
    idle_aa = (round(float(np.percentile(idle_by_parity[1], 99)) / float(np.percentile(idle_by_parity[0], 99)), 3)
               if idle_by_parity[0] and idle_by_parity[1] else None)

    def ratio(phase: str, q: str) -> float:
        return round(float(summary[phase][q]) / float(summary["idle"][q]), 3)

    control = {}
    if control_cores:
        control = {"control_cores": control_cores, "control_p99_ratio": ratio("control", "p99"),
                   "control_p50_ratio": ratio("control", "p50")}
    return summary | control | {
        "p99_ratio": ratio("consuming", "p99"), "p50_ratio": ratio("consuming", "p50"),
        "idle_halves_p99_ratio": idle_aa,
        "background_events_per_s": round(float(np.mean(achieved))) if achieved else 0,
        "rounds": rounds, "requests_per_round": requests, "cores": meter.cores(),
        "valkey_command_cores": meter.valkey_commands(), "valkey_calls_per_s": meter.valkey_calls(),
    }


def markdown_rows(doc: dict[str, Any]) -> list[str]:
    """Lines of the report's markdown for this section."""
    t = doc["throughput"]
    rows = [
        "| stream measurement | value |",
        "|---|---|",
        f"| one consumer, events/s appended ({t['events_per_entry']} events per entry) | "
        f"{t['consumer_events_per_s']:,} |",
        f"| raw floor (XREADGROUP + pipelined APPEND), events/s | {t['raw_floor_events_per_s']:,} |",
        f"| floor / consumer | {t['floor_over_consumer']} |",
    ]
    if "consumer_cluster_ids_events_per_s" in t:
        rows.append(f"| one consumer with nearest-centroid cluster ids, events/s ({t['cluster_ids']['assigned']:,} "
                    f"ids assigned, {t['clustered_users']} clustered users) | "
                    f"{t['consumer_cluster_ids_events_per_s']:,} |")
    if "event_to_servable_ms" in doc:
        e = doc["event_to_servable_ms"]
        rows.append(f"| event-to-servable ms p50 / p99 (background {e['background_events_per_s']:,} events/s) | "
                    f"{e['p50']} / {e['p99']} |")
    if "serving_while_consuming" in doc:
        s = doc["serving_while_consuming"]
        nice = f", consumer at nice {s['consumer_nice']}" if s.get("consumer_nice") else ""
        rows.append(f"| REST c=1 p99 idle / consuming ({s['background_events_per_s']:,} events/s{nice}) | "
                    f"{s['idle']['p99']} / {s['consuming']['p99']} ms (ratio {s['p99_ratio']}) |")
        if s.get("idle_halves_p99_ratio") is not None:
            rows.append(f"| REST c=1 p99 of the idle phase, odd rounds / even rounds (what the ratio is when nothing "
                        f"differs) | {s['idle_halves_p99_ratio']} |")
        if "control" in s:
            rows.append(f"| REST c=1 p99 idle / beside {s['control_cores']} cores of plain CPU work (control, no "
                        f"events) | {s['idle']['p99']} / {s['control']['p99']} ms (ratio {s['control_p99_ratio']}) |")
        for phase, cores in s.get("cores", {}).items():
            used = ", ".join(f"{k} {v}" for k, v in cores.items())
            rows.append(f"| cores used, {phase} | {used} |")
    return rows
