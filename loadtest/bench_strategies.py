"""Benchmark sections on the serving model's own GSU inputs: retrieval strategies, and latency sweeps.

* `section_strategies`: every retrieval strategy (exact with and without duplicate removal,
  faiss.knn, numpy, eta, sim_hard, twin_v2) on the keys and queries the service builds for real requests
  of the workload, interleaved call by call: latency, CPU per call, recall@k against the exact
  top-k, and one latency-versus-recall plot (PNG).
* `section_sweeps`: in-process latency of the CPU stages (gather + retrieve, score, fuse) against
  history length (10^3, 10^4, 10^5) and candidate count (100, 500, 1,000), plotted.

Used by `rankserve bench` (loadtest/bench.py); nothing here starts a server.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# name -> make_retriever spec; exact first: it is the recall reference
STRATEGIES: dict[str, str] = {
    "exact": "exact",
    "exact_nodedup": "exact:dedup=false",
    "faiss_knn": "faiss_knn",
    "numpy": "numpy",
    "eta_64b_s128": "eta:bits=64,shortlist=128",
    "eta_64b_s256": "eta:bits=64,shortlist=256",
    "eta_128b_s256": "eta:bits=128,shortlist=256",
    "sim_hard": "sim_hard",
    "sim_hard_pad": "sim_hard:fallback=pad",
    "twin_v2_p4": "twin_v2:n_probe=4",
    "twin_v2_p8": "twin_v2:n_probe=8",
    "twin_v2_p16": "twin_v2:n_probe=16",
    "twin_v2_p8_nosplit": "twin_v2:n_probe=8,split_bias=false",
    "twin_v2_p8_size1": "twin_v2:n_probe=8,size_bias=1",
}


@dataclass
class GsuInput:
    """One request's GSU inputs as `service.assemble` builds them, plus the categories sim_hard needs
    and the behaviour clusters twin_v2 needs."""

    queries: F32
    keys: F32
    key_category: I64
    query_category: I64
    clusters: Any = None
    key_fingerprint: bytes | None = None


def gsu_input(model: Any, history: Any, item_index: I64, category_index: I64, request_ts: int,
              cluster_at: int | None = None) -> GsuInput:
    """The bias-augmented keys [L, A+1] and queries [B, A+1] of `service.assemble.scorer_inputs`.

    The history's stored clusters are used when the fetch returned them; otherwise the history is
    clustered here exactly as `rankserve ingest --cluster-bundle` would (`feature_store.clusters`:
    gap buckets taken at the history's newest event, `cluster_at` seconds later when given, so
    the request comes `request_ts - cluster time` after the clustering).
    """
    from feature_store.clusters import UserClusterer
    from feature_store.codecs import SequenceClusters
    from feature_store.schema import time_gap_bucket

    t = model.tables
    h_item, h_cat = t.clamp_rows(history.item, history.category)
    c_item, c_cat = t.clamp_rows(item_index, category_index)
    key = t.item_key[h_item] + t.category_key[h_cat]
    gap = time_gap_bucket(request_ts - history.timestamp, model.retrieval.time_gap_buckets)
    keys = np.empty((key.shape[0], key.shape[1] + 1), dtype=np.float32)
    keys[:, :-1] = key / math.sqrt(model.retrieval.head_dim)
    keys[:, -1] = t.gsu_action_bias[history.action] + t.gsu_gap_bias[gap]
    q = t.item_query[c_item] + t.category_query[c_cat]
    queries = np.ones((q.shape[0], q.shape[1] + 1), dtype=np.float32)
    queries[:, :-1] = q
    clusters = getattr(history, "clusters", None)
    if clusters is None:
        clusterer = UserClusterer.from_tables(t)
        result = clusterer.cluster(history.item, history.category, history.action, history.timestamp, cluster_at)
        if result is not None:
            clusters = SequenceClusters(result[0], result[1], clusterer.fingerprint)
    return GsuInput(queries, keys, h_cat.astype(np.int64), c_cat.astype(np.int64), clusters,
                    t.key_fingerprint if hasattr(t, "key_fingerprint") else None)


def gsu_search(retriever: Any, x: GsuInput, k: int) -> tuple[F32, I64]:
    """One strategy's top-k on one request's GSU inputs, with its context when it reads one."""
    from service.retrieval import RetrievalContext

    if retriever.uses_context:
        result: tuple[F32, I64] = retriever.search(
            x.queries, x.keys, k, RetrievalContext(x.key_category, x.query_category, clusters=x.clusters,
                                                   key_fingerprint=x.key_fingerprint)
        )
        return result
    out: tuple[F32, I64] = retriever.search(x.queries, x.keys, k)
    return out


def section_strategies(inputs: list[GsuInput], k: int, iterations: int, warmup: int, out_dir: Path | None,
                       strategies: dict[str, str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Latency (wall and process CPU), recall@k vs exact and speed-up vs faiss.knn of each strategy."""
    from service.retrieval import DistinctKeys, make_retriever, recall_at_k

    specs = strategies or STRATEGIES
    retrievers = {name: make_retriever(spec) for name, spec in specs.items()}
    recall = {name: float(np.mean([recall_at_k(x.queries, x.keys, k, gsu_search(r, x, k)[1]) for x in inputs]))
              for name, r in retrievers.items()}
    names = list(retrievers)
    for i in range(warmup):
        for name in names:
            gsu_search(retrievers[name], inputs[i % len(inputs)], k)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    order = names[:]
    shuffle = random.Random(seed)
    for i in range(iterations):
        shuffle.shuffle(order)  # a different order each round: drift and neighbours hit all alike
        x = inputs[i % len(inputs)]
        for name in order:
            time.sleep(0.005)  # let the previous method's thread pool go idle (OpenMP spins after a region)
            c0, t0 = time.process_time(), time.perf_counter()
            gsu_search(retrievers[name], x, k)
            wall[name].append((time.perf_counter() - t0) * 1000)
            cpu[name].append((time.process_time() - c0) * 1000)
    stats: dict[str, Any] = {}
    for name in names:
        a = np.asarray(wall[name])
        stats[name] = {
            "spec": specs[name],
            "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3),
            "cpu_p50_ms": round(float(np.median(cpu[name])), 3),
            "recall_at_k": round(recall[name], 4),
        }
    ref = stats.get("faiss_knn")
    if ref:
        for s in stats.values():
            s["speedup_vs_faiss_knn_p50"] = round(ref["p50_ms"] / s["p50_ms"], 2)
            s["cpu_speedup_vs_faiss_knn"] = round(ref["cpu_p50_ms"] / max(s["cpu_p50_ms"], 1e-6), 2)
    distinct = [DistinctKeys.of(x.keys).n_groups / x.keys.shape[0] for x in inputs]
    result: dict[str, Any] = {
        "shape": {"queries": int(inputs[0].queries.shape[0]), "keys": int(inputs[0].keys.shape[0]),
                  "dim": int(inputs[0].keys.shape[1]), "k": k, "requests": len(inputs)},
        "distinct_key_share": round(float(np.mean(distinct)), 3),
        "iterations": iterations,
        "methods": stats,
    }
    if out_dir is not None:
        result["plot"] = str(plot_latency_recall(stats, out_dir / "retrieval_latency_recall.png", result["shape"]))
    return result


def plot_latency_recall(stats: dict[str, Any], path: Path, shape: dict[str, int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    markers = "osD^v<>PXh*"
    for i, (name, s) in enumerate(stats.items()):  # a legend, not labels: the fast ones sit on top of each other
        ax.scatter(s["p50_ms"], s["recall_at_k"], s=50, marker=markers[i % len(markers)],
                   label=f"{name} ({s['p50_ms']:.1f} ms, {s['recall_at_k']:.3f})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.set_xlabel("median latency per request (ms, log scale)")
    ax.set_ylabel(f"recall@{shape['k']} vs exact")
    ax.set_title(f"GSU strategies: {shape['queries']} candidates x {shape['keys']:,} behaviours, d={shape['dim']}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# latency against history length and candidate count


def long_history(events: Any, length: int, request_ts: int, seed: int = 0) -> Any:
    """A chronological history of `length` events from the workload's users (concatenated, resampled)."""
    from feature_store.codecs import Sequence

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(events), size=length, replace=length > len(events)))
    ts = np.sort(rng.integers(request_ts - 365 * 86_400, request_ts - 60, length))
    return Sequence(
        item=np.asarray(events.item_index[pick]), category=np.asarray(events.category_index[pick]),
        action=np.asarray(events.action[pick], dtype=np.int64), timestamp=ts,
    )


@dataclass
class IndexedEvents:
    """Events already mapped to vocabulary indices (what the store returns)."""

    item_index: I64
    category_index: I64
    action: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.item_index.shape[0])


def section_sweeps(model: Any, events: IndexedEvents, request_ts: int, lengths: list[int], candidates: list[int],
                   base_length: int, base_candidates: int, iterations: int, out_dir: Path | None,
                   seed: int = 0) -> dict[str, Any]:
    """Per-stage in-process latency (ms) for each history length and candidate count, interleaved."""
    rng = np.random.default_rng(seed + 1)
    n_items = model.tables.item_key.shape[0]
    cases: dict[str, tuple[Any, I64, I64]] = {}
    for length in lengths:
        hist = long_history(events, length, request_ts, seed)
        cand = rng.integers(1, n_items, base_candidates)
        cases[f"L={length}"] = (hist, cand, _categories(events, cand, rng))
    for n in candidates:
        hist = long_history(events, base_length, request_ts, seed)
        cand = rng.integers(1, n_items, n)
        cases[f"C={n}"] = (hist, cand, _categories(events, cand, rng))

    def run(name: str) -> dict[str, float]:
        hist, cand, cats = cases[name]
        t0 = time.perf_counter()
        inputs = model.inputs(hist, 1, cand, cats, request_ts)
        t1 = time.perf_counter()
        probs = model.scorer.predict(inputs)
        t2 = time.perf_counter()
        model.fusion(probs)
        t3 = time.perf_counter()
        return {"retrieve": (t1 - t0) * 1000, "score": (t2 - t1) * 1000, "fuse": (t3 - t2) * 1000,
                "total": (t3 - t0) * 1000}

    names = list(cases)
    for name in names:
        run(name)
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    shuffle = random.Random(seed)
    for _ in range(iterations):
        shuffle.shuffle(names)
        for name in names:
            for stage, ms in run(name).items():
                samples[name].setdefault(stage, []).append(ms)
    stats = {
        name: {stage: {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3)}
               for stage, v in st.items()}
        for name, st in samples.items()
    }
    result: dict[str, Any] = {"base_length": base_length, "base_candidates": base_candidates, "iterations": iterations,
                              "cases": stats}
    if out_dir is not None:
        result["plot"] = str(plot_sweeps(stats, lengths, candidates, base_length, base_candidates,
                                         out_dir / "latency_sweeps.png"))
    return result


def _categories(events: IndexedEvents, cand: I64, rng: np.random.Generator) -> I64:
    """Candidate categories: those of random workload events (the bundle's tables are random anyway)."""
    return np.asarray(events.category_index[rng.integers(0, len(events), cand.shape[0])], dtype=np.int64)


def plot_sweeps(stats: dict[str, Any], lengths: list[int], candidates: list[int], base_length: int,
                base_candidates: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    panels: list[tuple[Any, list[int], str, str]] = [
        (axes[0], lengths, "L", f"history length (log), {base_candidates} candidates"),
        (axes[1], candidates, "C", f"candidates, history {base_length:,}"),
    ]
    for ax, xs, key, label in panels:
        for stage, style in (("total", "-o"), ("retrieve", "--s"), ("score", ":^")):
            ax.plot(xs, [stats[f"{key}={x}"][stage]["p50"] for x in xs], style, label=f"{stage} p50")
        ax.plot(xs, [stats[f"{key}={x}"]["total"]["p99"] for x in xs], "-x", alpha=0.5, label="total p99")
        ax.set_xlabel(label)
        ax.set_ylabel("ms (in-process, one request)")
        ax.grid(True, alpha=0.3)
        if key == "L":
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("CPU stages of one request (gather + retrieve, score, fuse)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def indexed_events(events: Any, schema: Any) -> IndexedEvents:
    """The workload's events with items and categories mapped through the bundle's vocabularies."""
    return IndexedEvents(
        item_index=np.asarray(schema.items.lookup(events.item_id), dtype=np.int64),
        category_index=np.asarray(schema.categories.lookup(events.category_id), dtype=np.int64),
        action=np.asarray(events.action, dtype=np.int64),
    )


Fetch = Callable[[int, list[int]], Any]
