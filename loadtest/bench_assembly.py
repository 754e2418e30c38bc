"""Where one request's ranking work goes: the scorer's input assembly part by part, then the scorer.

    python -m loadtest.bench_assembly [--rounds 4] [--users 64] [--out result.json]

Builds the standard workload (generated data, as `rankserve bench` does: 1M items, 10,000-event
histories, 500 candidates, k = 64, 3 tasks), ingests it into an embedded Valkey, fetches each
user's request once, and then runs the served path's `scorer_inputs` and the bundle's scorer on
those requests in turn, `--rounds` times, one thread. `scorer_inputs` reports its own parts (its
`lap` hook), so the parts are the served code, not a copy of it. Users rotate, so each request
reads the tables' rows from cold memory as a server's does. Reported per part: p50 and mean wall
ms; and the process CPU per request of the whole (inputs + scorer).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.loadgen import print_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_assembly", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="passes over the users' requests")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--out", type=Path, help="write the result as JSON")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the tuned server: no spinning OpenMP pools

    from feature_store.embedded import EmbeddedValkey
    from feature_store.redis_store import create_store
    from feature_store.store import EmbeddedConfig, FeatureStoreConfig
    from loadtest.bench import Workload, candidate_sets, percentiles
    from loadtest.serving import ingest, prepare_workload
    from service.registry import ModelRegistry
    from service.retrieval import make_retriever
    from service.settings import Settings

    w = Workload(users=args.users)
    root = Path(tempfile.mkdtemp(prefix="rankserve-assembly-"))
    prepared = prepare_workload(root, w, "generated")
    requests = candidate_sets(w, prepared.events, args.users)
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
        ingest(valkey.url, prepared)
        config = FeatureStoreConfig(url=valkey.url)
        settings = Settings(model_dir=prepared.model_dir, feature_store=config, scorer_threads=1, poll_interval_s=0)
        model = ModelRegistry(settings, lambda: make_retriever("exact")).load_version()
        store = create_store(config)

        async def fetch_all() -> list[Any]:
            try:
                return [await store.fetch(user, cands) for user, cands in requests]
            finally:
                await store.aclose()

        fetched = asyncio.run(fetch_all())

    parts: dict[str, list[float]] = {}
    state = {"t": 0.0}

    def lap(part: str) -> None:
        now = time.perf_counter()
        parts.setdefault(part, []).append((now - state["t"]) * 1000)
        state["t"] = now

    def run(result: Any) -> None:
        history = result.sequence.before(w.request_time)
        state["t"] = time.perf_counter()
        inputs = model.inputs(history, result.user_index or 0, result.item_index, result.category_index,
                              w.request_time, lap=lap)
        state["t"] = time.perf_counter()
        model.scorer.predict(inputs)
        lap("score (ONNX Runtime)")

    for result in fetched[:8]:  # warm-up: kernels loaded, allocator settled
        run(result)
    parts.clear()
    cpu0 = time.process_time()
    for _ in range(args.rounds):
        for result in fetched:
            run(result)
    cpu_ms = (time.process_time() - cpu0) * 1000 / (args.rounds * len(fetched))
    report: dict[str, Any] = {
        "workload": {"items": w.items, "history": w.history, "candidates": w.candidates, "k": w.k,
                     "users": args.users, "rounds": args.rounds},
        "parts_ms": {name: percentiles(times) | {"mean": round(float(np.mean(times)), 3)}
                     for name, times in parts.items()},
        "cpu_ms_per_request": round(cpu_ms, 3),
    }
    lines = ["| part | p50 ms | mean ms |", "|---|---|---|"]
    lines += [f"| {name} | {v['p50']} | {v['mean']} |" for name, v in report["parts_ms"].items()]
    lines.append(f"| **process CPU per request (inputs + scorer)** | | {report['cpu_ms_per_request']} |")
    print_report(lines, report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
