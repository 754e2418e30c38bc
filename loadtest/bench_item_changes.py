"""Upsert-to-servable latency of an item: how long a running server serves a rewritten item's
old value from its item cache.

    python -m loadtest.bench_item_changes [--rounds 200] [--poll-s 0.25] [--redis-url URL]

One store plays a running server: its item cache warm with 500 items, and the follower the
server runs (`OnlineStore.follow_item_changes` every `--poll-s` seconds, as `item_changes_poll_s`
sets it) in the background. A second store plays the upsert command: each round it rewrites one
cached item with `write_items(..., announce=True)` at a random moment of the follower's interval
(rounds would otherwise fall into step with it), and the server side fetches the 500 items
every 2 ms until it gets the new value. The latency counts from the write's return to that fetch.
Against one Redis (the embedded Valkey unless --redis-url is given). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from typing import Any

import numpy as np

from feature_store.codecs import encode_items
from feature_store.embedded import EmbeddedValkey
from feature_store.redis_store import create_store
from feature_store.store import EmbeddedConfig, FeatureStoreConfig, OnlineStore
from loadtest.loadgen import latency_summary
from service.background import run_every

VERSION = "changes"
ITEMS = 500


async def measure(url: str, rounds: int, poll_s: float) -> dict[str, Any]:
    config = FeatureStoreConfig(mode="single", url=url)  # the follower below runs at `poll_s`
    server: OnlineStore = create_store(config)
    writer: OnlineStore = create_store(config)
    ids = list(range(1, ITEMS + 1))
    await writer.write_items(VERSION, ids, encode_items(np.arange(1, ITEMS + 1), np.ones(ITEMS, dtype=np.int64)))
    stop = asyncio.Event()
    follower = asyncio.create_task(run_every("item-change-follower", poll_s, server.follow_item_changes, stop))
    latencies: list[float] = []
    fetches: list[int] = []
    rng = random.Random(0)
    try:
        await server.fetch(0, ids, 0, version=VERSION)
        await server.follow_item_changes()  # the follower's start: where the log stands
        for r in range(rounds):
            await server.fetch(0, ids, 0, version=VERSION)  # warm: the cached value
            await asyncio.sleep(rng.uniform(0.0, poll_s))
            target = 1 + r % ITEMS
            new_index = 1_000_000 + r
            await writer.write_items(VERSION, [target], encode_items([new_index], [1]), announce=True)
            written, n = time.perf_counter(), 0
            while True:
                n += 1
                got = await server.fetch(0, [target], 0, version=VERSION)
                if int(got.item_index[0]) == new_index:
                    break
                await asyncio.sleep(0.002)
            latencies.append((time.perf_counter() - written) * 1e3)
            fetches.append(n)
    finally:
        stop.set()
        await follower
        counts = server.fetch_counts()
        await server.aclose()
        await writer.aclose()
    return {
        "rounds": rounds, "poll_s": poll_s, "upsert_to_servable_ms": latency_summary(latencies),
        "max_ms": round(max(latencies), 2), "stale_fetches_mean": round(float(np.mean(fetches)) - 1, 1),
        "item_cache_invalidations": counts.item_cache_invalidations, "item_cache_resets": counts.item_cache_resets,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_item_changes", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--poll-s", type=float, default=FeatureStoreConfig().item_changes_poll_s)
    p.add_argument("--redis-url", default=None, help="benchmark against this server (default: embedded Valkey)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.redis_url:
        report = asyncio.run(measure(args.redis_url, args.rounds, args.poll_s))
    else:
        with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
            report = asyncio.run(measure(valkey.url, args.rounds, args.poll_s))
    report["command"] = "python -m loadtest.bench_item_changes " + " ".join(argv if argv is not None else sys.argv[1:])
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
