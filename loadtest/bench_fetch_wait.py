"""How long a serving read waits behind the consumer's append script calls, by calls in flight.

    python -m loadtest.bench_fetch_wait [--rounds 6] [--reads 1500] [--users 100]

On an embedded Valkey holding `--population` users (a sequence and a window of applied ids
each) and one sequence of 10,000 events (120 KB), a reader process GETs that sequence at
concurrency 1 (what a rank request's fetch reads for its user) while a writer process appends
one event to each of `--users` random users every 20 ms (5,000 events/s with the default, as
`rankserve consume` applies a burst: `encode_appends` then `apply_appends`) with one call in
flight at a time, or four; and with no writer. The phases alternate, their order reversed
every round. Reported per phase: the read's latency (p50, p99, p99.9, max, mean) and Valkey's
time per script call and the events the writer appended (and duplicates it skipped, none
expected). Prints a markdown table; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.loadgen import print_report

VERSION = "waitbench"
TICK_S = 0.02
READ_GAP_S = 0.002
SEQUENCE_BYTES = 120_000  # 10,000 events of 12 bytes


def _writer(url: str, users: int, population: int, in_flight: int, phase_round: int, stop: Any, ready: Any,
            done: Any) -> None:
    """Append one event to each of `users` random users every TICK_S until `stop`; event ids
    unique over phases and rounds (a repeated id would be skipped: a call doing less work).
    `done`: events appended and duplicates skipped, added up."""
    from feature_store.codecs import encode_sequence
    from feature_store.redis_store import RedisOnlineStore, create_store
    from feature_store.store import FeatureStoreConfig, UserAppend

    async def run() -> None:
        store = create_store(FeatureStoreConfig(url=url))
        assert isinstance(store, RedisOnlineStore)
        rng = np.random.default_rng([in_flight, phase_round])
        ready.set()
        next_at = time.perf_counter()
        tick = 0
        try:
            while not stop.is_set():
                picked = dict.fromkeys(rng.integers(0, population, users).tolist())
                record = encode_sequence([5], [1], [0], [1_800_000_000 + tick])
                appends = [UserAppend(u, record, [b"%d-%d-%d-%d" % (in_flight, phase_round, tick, u)])
                           for u in picked]
                counts = await store.apply_appends(store.encode_appends(appends, VERSION, cap=10_000),
                                                   in_flight=in_flight)
                done[0] += sum(c.appended for c in counts)
                done[1] += sum(c.duplicates for c in counts)
                tick += 1
                next_at += TICK_S
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        finally:
            await store.aclose()

    asyncio.run(run())


def _reads(url: str, key: bytes, n: int) -> list[float]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get(key)
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(READ_GAP_S)
    client.close()
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"n": len(a), "p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "p99_9": round(float(np.percentile(a, 99.9)), 3), "max": round(float(a.max()), 3),
            "mean": round(float(a.mean()), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_fetch_wait", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reads", type=int, default=1500, help="reads per phase and round")
    p.add_argument("--users", type=int, default=100, help="users the writer appends to every 20 ms")
    p.add_argument("--population", type=int, default=100_000, help="users stored (the writer picks from them)")
    p.add_argument("--out", type=Path, help="write the result as JSON")
    args = p.parse_args(argv)

    import redis

    from feature_store import keys
    from feature_store.embedded import EmbeddedValkey
    from feature_store.store import EmbeddedConfig

    phases = ["no writer", "1 in flight", "4 in flight"]
    latencies: dict[str, list[float]] = {name: [] for name in phases}
    script_us: dict[str, list[float]] = {name: [] for name in phases[1:]}
    applied = {name: [0, 0] for name in phases[1:]}  # events appended, duplicates skipped
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
        client = redis.Redis.from_url(valkey.url, socket_timeout=30)
        read_key = keys.sequence_key(VERSION, args.population)  # nobody appends to it
        client.set(read_key, bytes(SEQUENCE_BYTES))
        pipe = client.pipeline(transaction=False)
        for user in range(args.population):
            seq, _, evid = keys.append_keys(VERSION, user)
            pipe.set(seq, bytes(1200))
            pipe.set(evid, bytes(256))
            if user % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        for r in range(args.rounds):
            for name in phases if r % 2 == 0 else phases[::-1]:
                stop, ready = multiprocessing.Event(), multiprocessing.Event()
                done = multiprocessing.Array("q", 2)
                writer = None
                client.config_resetstat()
                if name != "no writer":
                    writer = multiprocessing.Process(target=_writer, args=(
                        valkey.url, args.users, args.population, int(name.split()[0]), r, stop, ready, done))
                    writer.start()
                    if not ready.wait(60):
                        raise RuntimeError("the writer did not start")
                    time.sleep(0.3)  # its connections are open and its ticks under way
                latencies[name] += _reads(valkey.url, read_key, args.reads)
                stop.set()
                if writer is not None:
                    writer.join(60)
                    applied[name][0] += done[0]
                    applied[name][1] += done[1]
                    stats = client.info("commandstats").get("cmdstat_evalsha")
                    if stats:
                        script_us[name].append(float(stats["usec_per_call"]))
        client.close()
    report: dict[str, Any] = {
        "rounds": args.rounds, "reads_per_phase_round": args.reads, "users_per_tick": args.users,
        "tick_s": TICK_S, "population": args.population,
        "phases": {name: _summary(latencies[name]) | (
            {"valkey_us_per_script_call": round(float(np.mean(script_us[name])), 1),
             "events_appended": applied[name][0], "duplicates": applied[name][1]} if script_us.get(name) else {})
            for name in phases},
    }
    lines = ["| writer | read p50 ms | p99 | p99.9 | max | mean | Valkey µs per script call | appended / duplicates |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in report["phases"].items():
        lines.append(f"| {name} | {s['p50']} | {s['p99']} | {s['p99_9']} | {s['max']} | {s['mean']} | "
                     f"{s.get('valkey_us_per_script_call', '')} | {s.get('events_appended', '')} / "
                     f"{s.get('duplicates', '')} |")
    print_report(lines, report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
