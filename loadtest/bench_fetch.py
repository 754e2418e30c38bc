"""Fetch benchmark: rankserve's store vs the raw redis-py floor vs Feast, side by side in one run.

    python -m loadtest.bench_fetch [--redis-url URL] [--iterations 400] [--feast auto|skip]

One request = a user's profile, the newest 10,000 events of the user's sequence and the features
of 500 candidate items, against one Redis (the embedded Valkey unless --redis-url is given).
Variants, interleaved iteration by iteration so machine noise hits them alike:

- `rankserve`        `OnlineStore.fetch` with the item cache off (every item read from Redis)
- `rankserve_cached` `OnlineStore.fetch` with a warm item cache (the serving configuration)
- `floor`            raw redis-py: the same GET / GETRANGE / MGET of the same bytes in one
                     pipeline, keys prebuilt, nothing decoded: what any client must pay
- `floor_hiredis_pack` the floor with hiredis' command packer (as the store's connections use)
- per part (`*_profile`, `*_sequence`, `*_items`): each of the three reads alone, ours vs floor

Feast (`get_online_features` on its Redis online store, holding the same values: profile and
item indices as Int64, the sequence as one Bytes value) runs in a subprocess with the
interpreter of a separate venv (`.venv-feast`, or `--feast-python`), because Feast is not part of
the serving install. Prints one JSON document on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

log = logging.getLogger("loadtest.bench_fetch")

USER_ID = 4242
VERSION = "bench"
FEAST_PROJECT = "rankbench"


def summarize(samples_s: list[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds."""
    ms = sorted(s * 1e3 for s in samples_s)
    return {
        "p50_ms": round(statistics.median(ms), 4),
        "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "n": len(ms),
    }


def make_data(n_events: int, n_catalogue: int, seed: int) -> dict[str, Any]:
    import numpy as np

    from feature_store.codecs import encode_items, encode_profile, encode_sequence

    rng = np.random.default_rng(seed)
    item_ids = rng.choice(10**9, n_catalogue, replace=False).astype(np.int64)
    item_index = np.arange(1, n_catalogue + 1)
    category_index = rng.integers(1, 5000, n_catalogue)
    seq = encode_sequence(
        rng.integers(1, n_catalogue, n_events),
        rng.integers(1, 5000, n_events),
        rng.integers(0, 4, n_events),
        np.sort(rng.integers(1_600_000_000, 1_700_000_000, n_events)),
    )
    return {
        "item_ids": item_ids,
        "item_values": encode_items(item_index, category_index),
        "item_index": item_index,
        "category_index": category_index,
        "profile": encode_profile(17),
        "sequence": seq,
    }


async def run_ours(
    args: argparse.Namespace, url: str, data: dict[str, Any], candidate_sets: list[list[int]]
) -> dict[str, dict[str, float]]:
    from redis.asyncio import ConnectionPool, Redis

    from feature_store import keys
    from feature_store.codecs import SEQ_RECORD_SIZE
    from feature_store.redis_store import create_store
    from feature_store.store import STATUS_COMPLETE, FeatureStoreConfig, VersionMeta

    base = FeatureStoreConfig(url=url, request_timeout_s=5.0, read_timeout_s=5.0)
    ours = create_store(base.model_copy(update={"item_cache_size": 0}))
    cached = create_store(base)
    floor = Redis.from_url(url)  # redis-py defaults (hiredis parser, same as the store)
    # The same, packing commands with hiredis like the store does: the floor of the transport.
    from feature_store.connections import FastConnection

    floor_packed = Redis(connection_pool=ConnectionPool.from_url(url, connection_class=FastConnection))
    try:
        meta = VersionMeta(version=VERSION, schema_hash="bench", status=STATUS_COMPLETE)
        await ours.put_meta(meta)
        ids = data["item_ids"].tolist()
        for k in range(0, len(ids), 20_000):
            await ours.write_items(VERSION, ids[k : k + 20_000], data["item_values"][k : k + 20_000])
        await ours.write_users(VERSION, [USER_ID], [data["profile"]], [data["sequence"]])
        await ours.activate(VERSION)

        n_seq = args.events
        prof_key, seq_key = keys.profile_key(VERSION, USER_ID), keys.sequence_key(VERSION, USER_ID)
        item_key_sets = [keys.item_keys(VERSION, c) for c in candidate_sets]

        async def floor_all(k: int) -> None:
            pipe = floor.pipeline(transaction=False)
            pipe.get(prof_key)
            pipe.getrange(seq_key, -n_seq * SEQ_RECORD_SIZE, -1)
            pipe.mget(item_key_sets[k])
            await pipe.execute()

        async def floor_packed_all(k: int) -> None:
            pipe = floor_packed.pipeline(transaction=False)
            pipe.get(prof_key)
            pipe.getrange(seq_key, -n_seq * SEQ_RECORD_SIZE, -1)
            pipe.mget(item_key_sets[k])
            await pipe.execute()

        async def floor_profile(k: int) -> None:
            pipe = floor.pipeline(transaction=False)
            pipe.get(prof_key)
            await pipe.execute()

        async def floor_sequence(k: int) -> None:
            pipe = floor.pipeline(transaction=False)
            pipe.getrange(seq_key, -n_seq * SEQ_RECORD_SIZE, -1)
            await pipe.execute()

        async def floor_items(k: int) -> None:
            pipe = floor.pipeline(transaction=False)
            pipe.mget(item_key_sets[k])
            await pipe.execute()

        async def ours_all(k: int) -> None:
            r = await ours.fetch(USER_ID, candidate_sets[k], n_seq)
            if len(r.sequence) != n_seq or not r.found.all():
                raise RuntimeError("benchmark data not found")

        async def cached_all(k: int) -> None:
            await cached.fetch(USER_ID, candidate_sets[k], n_seq)

        async def ours_profile(k: int) -> None:
            await ours.fetch(USER_ID, [], 0)

        async def ours_sequence(k: int) -> None:
            await ours.fetch(USER_ID, [], n_seq)

        async def ours_items(k: int) -> None:
            await ours.fetch(USER_ID, candidate_sets[k], 0)

        variants = {
            "rankserve": ours_all,
            "rankserve_cached": cached_all,
            "floor": floor_all,
            "floor_hiredis_pack": floor_packed_all,
            "rankserve_profile": ours_profile,
            "floor_profile": floor_profile,
            "rankserve_sequence": ours_sequence,
            "floor_sequence": floor_sequence,
            "rankserve_items": ours_items,
            "floor_items": floor_items,
        }
        # Warm-up: connections, the cached store's item cache (every candidate set), code paths.
        for k in range(len(candidate_sets)):
            for fn in variants.values():
                await fn(k)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants.items())
        rng = random.Random(args.seed)
        gc.collect()
        for i in range(args.iterations):
            rng.shuffle(order)
            k = i % len(candidate_sets)
            for name, fn in order:
                t0 = time.perf_counter()
                await fn(k)
                samples[name].append(time.perf_counter() - t0)
        return {name: summarize(s) for name, s in samples.items()}
    finally:
        await ours.aclose()
        await cached.aclose()
        await floor.aclose()
        await floor_packed.aclose(close_connection_pool=True)


def find_feast_python(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    try:
        import feast  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    candidate = Path(__file__).resolve().parents[1] / ".venv-feast" / "bin" / "python"
    return str(candidate) if candidate.exists() else None


def run_feast(
    args: argparse.Namespace, port: int, data: dict[str, Any], candidate_sets: list[list[int]]
) -> dict[str, Any]:
    """Run the Feast part in the Feast interpreter; returns its JSON (or why it did not run)."""
    python = find_feast_python(args.feast_python)
    if python is None:
        return {
            "skipped": "feast is not importable and .venv-feast/bin/python does not exist "
            "(python -m venv .venv-feast && .venv-feast/bin/pip install 'feast[redis]')"
        }
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="feast-bench-"))
    try:
        np.save(work / "item_ids.npy", data["item_ids"])
        np.save(work / "item_index.npy", data["item_index"])
        np.save(work / "category_index.npy", data["category_index"])
        (work / "sequence.bin").write_bytes(data["sequence"])
        (work / "candidates.json").write_text(json.dumps(candidate_sets))
        spec = {
            "port": port,
            "work": str(work),
            "iterations": args.iterations,
            "user_id": USER_ID,
            "profile": 17,
            "seed": args.seed,
        }
        proc = subprocess.run(
            [python, str(Path(__file__).resolve()), "--feast-worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=args.feast_timeout,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if proc.returncode != 0:
            return {"error": f"feast worker exited {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        return {"error": f"feast worker took longer than {args.feast_timeout}s"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def feast_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the Feast venv: register, write the same values, then time get_online_features."""
    from datetime import datetime, timedelta

    import numpy as np
    import pandas as pd
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource
    from feast.types import Bytes, Int64
    from feast.value_type import ValueType

    work = Path(spec["work"])
    repo = work / "repo"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(
        f"project: {FEAST_PROJECT}\n"
        f"registry: {repo / 'registry.db'}\n"
        "provider: local\n"
        "online_store:\n"
        "  type: redis\n"
        f'  connection_string: "127.0.0.1:{spec["port"]}"\n'
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
    )
    now = datetime.now(UTC)
    item_ids = np.load(work / "item_ids.npy")
    items_df = pd.DataFrame(
        {
            "item_id": item_ids,
            "item_index": np.load(work / "item_index.npy").astype(np.int64),
            "category_index": np.load(work / "category_index.npy").astype(np.int64),
            "event_timestamp": now,
        }
    )
    users_df = pd.DataFrame(
        {
            "user_id": [spec["user_id"]],
            "profile": [spec["profile"]],
            "sequence": [(work / "sequence.bin").read_bytes()],
            "event_timestamp": now,
        }
    )
    items_df.to_parquet(work / "items.parquet")
    users_df.to_parquet(work / "users.parquet")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)
    user_fv = FeatureView(
        name="user_features",
        entities=[user],
        ttl=timedelta(days=3650),
        schema=[
            Field(name="user_id", dtype=Int64),
            Field(name="profile", dtype=Int64),
            Field(name="sequence", dtype=Bytes),
        ],
        source=FileSource(path=str(work / "users.parquet"), timestamp_field="event_timestamp"),
    )
    item_fv = FeatureView(
        name="item_features",
        entities=[item],
        ttl=timedelta(days=3650),
        schema=[
            Field(name="item_id", dtype=Int64),
            Field(name="item_index", dtype=Int64),
            Field(name="category_index", dtype=Int64),
        ],
        source=FileSource(path=str(work / "items.parquet"), timestamp_field="event_timestamp"),
    )
    store = FeatureStore(repo_path=str(repo))
    store.apply([user, item, user_fv, item_fv])
    store.write_to_online_store("user_features", users_df)
    for k in range(0, len(items_df), 20_000):
        store.write_to_online_store("item_features", items_df.iloc[k : k + 20_000])

    candidate_sets = json.loads((work / "candidates.json").read_text())
    user_features = ["user_features:profile", "user_features:sequence"]
    item_features = ["item_features:item_index", "item_features:category_index"]
    all_features = user_features + item_features

    def two_calls(k: int) -> None:
        u = store.get_online_features(features=user_features, entity_rows=[{"user_id": spec["user_id"]}]).to_dict()
        i = store.get_online_features(
            features=item_features, entity_rows=[{"item_id": c} for c in candidate_sets[k]]
        ).to_dict()
        if len(u["sequence"][0]) != len((work / "sequence.bin").read_bytes()) or None in i["item_index"]:
            raise RuntimeError("feast returned wrong data")

    def one_call(k: int) -> None:
        rows = [{"user_id": spec["user_id"], "item_id": c} for c in candidate_sets[k]]
        store.get_online_features(features=all_features, entity_rows=rows).to_dict()

    async def two_calls_async(k: int) -> None:
        await store.get_online_features_async(features=user_features, entity_rows=[{"user_id": spec["user_id"]}])
        await store.get_online_features_async(
            features=item_features, entity_rows=[{"item_id": c} for c in candidate_sets[k]]
        )

    out: dict[str, Any] = {"feast_version": __import__("feast").__version__}
    samples: dict[str, list[float]] = {"feast": [], "feast_one_call": []}
    for k in range(min(len(candidate_sets), 10)):
        two_calls(k)
    one_call(0)
    gc.collect()
    for i in range(spec["iterations"]):
        t0 = time.perf_counter()
        two_calls(i % len(candidate_sets))
        samples["feast"].append(time.perf_counter() - t0)
        # One call with (user, item) rows re-reads the user's 120 KB per row: slow, so sampled sparsely.
        if i % 10 == 0:
            t0 = time.perf_counter()
            one_call(i % len(candidate_sets))
            samples["feast_one_call"].append(time.perf_counter() - t0)
    try:
        loop = asyncio.new_event_loop()
        a_samples = []
        for k in range(5):
            loop.run_until_complete(two_calls_async(k))
        for i in range(spec["iterations"]):
            t0 = time.perf_counter()
            loop.run_until_complete(two_calls_async(i % len(candidate_sets)))
            a_samples.append(time.perf_counter() - t0)
        samples["feast_async"] = a_samples
        loop.close()
    except Exception as exc:  # async reads are optional in Feast; report why they did not run
        out["feast_async_error"] = f"{type(exc).__name__}: {exc}"
    out.update({name: summarize(s) for name, s in samples.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=None, help="benchmark against this server (default: embedded Valkey)")
    parser.add_argument("--iterations", type=int, default=400, help="timed requests per variant")
    parser.add_argument("--events", type=int, default=10_000, help="sequence length")
    parser.add_argument("--items", type=int, default=500, help="candidates per request")
    parser.add_argument("--catalogue", type=int, default=50_000, help="items written to the store")
    parser.add_argument("--candidate-sets", type=int, default=50, help="distinct candidate lists cycled through")
    parser.add_argument("--feast", choices=["auto", "skip"], default="auto", help="run the Feast comparison")
    parser.add_argument("--feast-python", default=None, help="interpreter with feast[redis] (default .venv-feast)")
    parser.add_argument("--feast-timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feast-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    if args.feast_worker:  # inside the Feast interpreter
        print(json.dumps(feast_worker(json.loads(args.feast_worker))))
        return 0

    from urllib.parse import urlsplit

    from feature_store.embedded import EmbeddedValkey
    from feature_store.store import EmbeddedConfig

    data = make_data(args.events, args.catalogue, args.seed)
    rng = random.Random(args.seed)
    all_ids = data["item_ids"].tolist()
    candidate_sets = [rng.sample(all_ids, args.items) for _ in range(args.candidate_sets)]
    server = None
    url = args.redis_url
    if url is None:
        server = EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none"))
        url = server.start()
    try:
        started = time.perf_counter()
        results = asyncio.run(run_ours(args, url, data, candidate_sets))
        log.info("rankserve + floor done in %.1f s", time.perf_counter() - started)
        feast: dict[str, Any] = {"skipped": "--feast skip"}
        if args.feast == "auto":
            started = time.perf_counter()
            feast = run_feast(args, int(urlsplit(url).port or 6379), data, candidate_sets)
            log.info("feast done in %.1f s", time.perf_counter() - started)
    finally:
        if server is not None:
            server.stop()

    report: dict[str, Any] = {
        "workload": {
            "events": args.events,
            "items": args.items,
            "catalogue": args.catalogue,
            "iterations": args.iterations,
            "sequence_bytes": len(data["sequence"]),
            "server": "embedded valkey" if server is not None else "external",
        },
        "results": results,
        "feast": feast,
    }
    ours, floor = results["rankserve"], results["floor"]
    ratios: dict[str, float] = {
        "rankserve_vs_floor_p50": round(ours["p50_ms"] / floor["p50_ms"], 3),
        "rankserve_vs_floor_p99": round(ours["p99_ms"] / floor["p99_ms"], 3),
        "rankserve_vs_floor_hiredis_pack_p50": round(ours["p50_ms"] / results["floor_hiredis_pack"]["p50_ms"], 3),
        "rankserve_vs_floor_hiredis_pack_p99": round(ours["p99_ms"] / results["floor_hiredis_pack"]["p99_ms"], 3),
    }
    feast_best = min(
        (v for k, v in feast.items() if k.startswith("feast") and isinstance(v, dict)),
        key=lambda v: v["p50_ms"],
        default=None,
    )
    if feast_best is not None:
        ratios["feast_best_vs_rankserve_p50"] = round(feast_best["p50_ms"] / ours["p50_ms"], 2)
        ratios["feast_best_vs_rankserve_p99"] = round(feast_best["p99_ms"] / ours["p99_ms"], 2)
    report["ratios"] = ratios
    report["acceptance"] = {
        "within_1.5x_floor": ratios["rankserve_vs_floor_p50"] <= 1.5 and ratios["rankserve_vs_floor_p99"] <= 1.5,
        "5x_faster_than_feast": None
        if feast_best is None
        else (ratios["feast_best_vs_rankserve_p50"] >= 5 and ratios["feast_best_vs_rankserve_p99"] >= 5),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
