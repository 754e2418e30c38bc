"""How long the streamed-event append holds Redis: per script call, for users at their cap and below it.

    python -m loadtest.bench_append [--users 100] [--rounds 50] [--cap 10000]

Stores `--users` sequences on an embedded Valkey, either full (`--cap` events: the lifelong users
of a running service) or a tenth short of it, then appends one event to each of them with
`append_events_once` (what `rankserve consume` sends for a burst of one-event users), `--rounds`
times. Reported per case: Valkey's time per script call and per event (INFO commandstats of
EVALSHA: the time every other client waits while a call runs), the calls per append of all
users, and the caller's wall time per append. Prints a markdown table; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.loadgen import print_report


async def _case(url: str, users: int, rounds: int, cap: int, stored: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from feature_store import keys
    from feature_store.codecs import encode_sequence
    from feature_store.redis_store import create_store
    from feature_store.store import FeatureStoreConfig, UserAppend

    version = f"b{stored}"
    store = create_store(FeatureStoreConfig(url=url))
    raw = aioredis.from_url(url)
    try:
        n = np.arange(stored)
        history = encode_sequence(n % 1000 + 1, n % 50 + 1, n % 4, 1_700_000_000 + n)
        for user in range(users):
            await raw.set(keys.sequence_key(version, user), history)
        await raw.config_resetstat()
        wall = 0.0
        for r in range(rounds):
            appends = [UserAppend(u, encode_sequence([5], [1], [0], [1_800_000_000 + r]), [f"{u}-{r}".encode()])
                       for u in range(users)]
            t0 = time.perf_counter()
            await store.append_events_once(appends, version=version, cap=cap)
            wall += time.perf_counter() - t0
        stats = (await raw.info("commandstats"))["cmdstat_evalsha"]
        calls = int(stats["calls"]) - int(stats.get("failed_calls", 0))  # the first call loads the script
        return {
            "stored_events": stored,
            "valkey_us_per_call": round(float(stats["usec"]) / max(calls, 1), 1),
            "valkey_us_per_event": round(float(stats["usec"]) / (users * rounds), 2),
            "calls_per_append": round(calls / rounds, 2),
            "wall_ms_per_append": round(wall * 1000 / rounds, 3),
        }
    finally:
        await store.aclose()
        await raw.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_append", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100, help="users per append (one event each)")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--cap", type=int, default=10_000, help="the sequences' cap, in events")
    p.add_argument("--out", type=Path, help="write the result as JSON")
    args = p.parse_args(argv)

    from feature_store.embedded import EmbeddedValkey
    from feature_store.store import EmbeddedConfig

    cases = []
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
        for stored in (args.cap, args.cap - args.cap // 10):
            cases.append(asyncio.run(_case(valkey.url, args.users, args.rounds, args.cap, stored)))
    report = {"users": args.users, "rounds": args.rounds, "cap": args.cap, "cases": cases}
    lines = ["| stored events | Valkey µs per call | Valkey µs per event | calls per append | wall ms per append |",
             "|---|---|---|---|---|"]
    lines += [f"| {c['stored_events']:,} | {c['valkey_us_per_call']} | {c['valkey_us_per_event']} | "
              f"{c['calls_per_append']} | {c['wall_ms_per_append']} |" for c in cases]
    print_report(lines, report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
