"""Retrieval (GSU) benchmark: every top-k strategy side by side on the same inputs, in one run.

    python -m loadtest.bench_retrieval [--repeats 40] [--lengths 1000,10000,100000] [--settle-ms 100]

Workloads: B candidates (queries) x L behaviours (keys), dimension d, top-k by inner product;
the standard one is B = 500, L = 10,000, d = 16, k = 64, and d = 17 (a bias column) is run at
L = 10,000 too. Methods, interleaved call by call in a shuffled order so machine noise (the
benchmark box is shared) hits them alike, each call after a short idle pause (--settle-ms) so
one method's spinning thread pool does not slow down the next:

- `exact`        the fused numba kernel, numba's default threads (all cores)
- `exact_1t`     the same on one thread
- `faiss_knn`    faiss.knn(METRIC_INNER_PRODUCT), faiss's default OpenMP threads (all cores)
- `faiss_knn_1t` the same on one thread
- `numpy`        matmul + argpartition + sort
- `exact_nodedup_1t` `exact` on one thread without the duplicate-key pass (random keys have no
                 duplicates: the pass is pure overhead here, measured by the difference)
- `eta_1t`       SimHash (64 bits) + Hamming shortlist of 256 + exact re-rank, one thread (approximate:
                 its "matches reference" is expected to be false; see bench_strategies for recall)
- `faiss_gpu`    faiss.knn_gpu, only where a GPU is visible

Reports median and p99 wall ms per call, the speed-up over `faiss_knn` (its median / the
method's), the median CPU ms of the process per call (all threads; on a shared box it shows the
work done apart from time lost to other tenants), and whether the result matches a float64
brute force (same top-k set up to near-ties). Prints
one JSON document and then a markdown table on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service import retrieval
from service.retrieval.kernels.topk_ip import cache_enabled

log = logging.getLogger("loadtest.bench_retrieval")

REFERENCE = "faiss_knn"


def summarize(samples_s: list[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds."""
    ms = sorted(s * 1e3 for s in samples_s)
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "n": len(ms),
    }


def make_methods() -> dict[str, retrieval.Retriever]:
    methods: dict[str, retrieval.Retriever] = {
        "exact": retrieval.make_retriever("exact"),
        "exact_1t": retrieval.make_retriever("exact", num_threads=1),
        "faiss_knn": retrieval.make_retriever("faiss_knn"),
        "faiss_knn_1t": retrieval.make_retriever("faiss_knn", num_threads=1),
        "numpy": retrieval.make_retriever("numpy"),
        "exact_nodedup_1t": retrieval.make_retriever("exact", num_threads=1, dedup=False),
        "eta_1t": retrieval.make_retriever("eta", num_threads=1),
    }
    if retrieval.gpu_available():
        methods["faiss_gpu"] = retrieval.make_retriever("faiss_gpu")
    return methods


def run_workload(
    methods: dict[str, retrieval.Retriever],
    n_queries: int,
    n_keys: int,
    dim: int,
    k: int,
    repeats: int,
    seed: int,
    settle_s: float,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    keys = rng.standard_normal((n_keys, dim), dtype=np.float32)

    def bind(method: retrieval.Retriever) -> Callable[[], tuple[Any, Any]]:
        return lambda: method.search(queries, keys, k)

    calls = {name: bind(method) for name, method in methods.items()}
    last: dict[str, tuple[Any, Any]] = {}
    for name, call in calls.items():  # warm: JIT cache load, allocator, faiss/BLAS thread pools
        call()
        last[name] = call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    shuffle = random.Random(seed)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for name in order:
            # let the previous method's thread pools go idle: OpenBLAS workers spin ~70 ms after a
            # GEMM and OpenMP ones a few ms, stealing a core from whatever runs next
            time.sleep(settle_s)
            c0, t0 = time.process_time(), time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    results: dict[str, Any] = {name: summarize(s) for name, s in samples.items()}
    for name, c in cpu.items():
        # CPU time of the whole process (all threads): the work done, whatever the other tenants
        # of the machine took; an OpenMP pool spinning after its parallel region counts too
        results[name]["cpu_p50_ms"] = round(statistics.median(c) * 1e3, 3)
    ref_ms = results[REFERENCE]["p50_ms"] if REFERENCE in results else None
    for name, (scores, idx) in last.items():
        problems = retrieval.check_against_reference(queries, keys, k, scores, idx)
        results[name]["matches_reference"] = not problems
        results[name]["recall_at_k"] = round(retrieval.recall_at_k(queries, keys, k, idx), 4)
        if problems:
            log.warning("%s does not match the reference: %s", name, problems[:3])
        if ref_ms:
            results[name]["speedup_vs_faiss_knn"] = round(ref_ms / results[name]["p50_ms"], 2)
    return {"B": n_queries, "L": n_keys, "d": dim, "k": k, "repeats": repeats, "results": results}


def machine_info(warm_up_s: float, faiss_threads: int) -> dict[str, Any]:
    import faiss
    import numba

    try:
        layer = numba.threading_layer()  # type: ignore[attr-defined]
    except ValueError:  # no parallel kernel has run yet
        layer = None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": layer,
        "faiss": faiss.__version__,
        "faiss_threads": faiss_threads,
        "numpy": np.__version__,
        "exact_warm_up_s": round(warm_up_s, 3),
        "numba_cache": cache_enabled(),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| B | L | d | k | method | median ms | p99 ms | speed-up vs faiss_knn | CPU ms (median) | matches reference "
        "| recall@k |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in report["workloads"]:
        for name, r in sorted(w["results"].items(), key=lambda item: item[1]["p50_ms"]):
            lines.append(
                f"| {w['B']} | {w['L']:,} | {w['d']} | {w['k']} | {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {r.get('speedup_vs_faiss_knn', float('nan')):.2f}x | {r['cpu_p50_ms']:.2f} "
                f"| {'yes' if r['matches_reference'] else 'NO'} | {r['recall_at_k']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per method at L = 10,000")
    parser.add_argument("--batch", type=int, default=500, help="B, candidates per request")
    parser.add_argument("--lengths", default="1000,10000,100000", help="comma-separated L values (d = 16)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bias-dim", action="store_true", help="skip the d = 17 workload")
    parser.add_argument("--format", choices=("json", "markdown", "both"), default="both")
    parser.add_argument("--settle-ms", type=float, default=100.0, help="idle time before each timed call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    warm_up_s = retrieval.warm_up()
    methods = make_methods()
    import faiss

    faiss_threads = int(faiss.omp_get_max_threads())  # the default, before any one-thread run
    workloads = [(int(n), 16) for n in args.lengths.split(",") if n]
    if not args.no_bias_dim:
        workloads.append((10_000, 17))
    report: dict[str, Any] = {"workloads": []}
    for n_keys, dim in workloads:
        # fewer calls for long histories, so one run stays within a few minutes
        repeats = max(9, round(args.repeats * min(1.0, 10_000 / n_keys)))
        log.info("workload B=%d L=%d d=%d k=%d, %d calls per method", args.batch, n_keys, dim, args.k, repeats)
        report["workloads"].append(
            run_workload(methods, args.batch, n_keys, dim, args.k, repeats, args.seed, args.settle_ms / 1e3)
        )
    report["machine"] = machine_info(warm_up_s, faiss_threads)
    if args.format in ("json", "both"):
        print(json.dumps(report, indent=2))
    if args.format == "both":
        print()
    if args.format in ("markdown", "both"):
        print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
