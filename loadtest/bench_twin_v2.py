"""twin_v2 before/after, side by side: key-only clusters (the first twin_v2) vs bias-aware ones.

    python -m loadtest.bench_twin_v2 [--tables bench|runs/synth] [--iterations 60]

Inputs: the standard workload's first 8 requests (500 candidates x 10,000 behaviours, the bench's
random-weight bundle over data-cache/synth, as `rankserve bench --sections strategies` builds
them), or with `--tables runs/synth` the trained run's GSU tables over the 8 longest synthetic
histories (last 10,000 events, 100 candidates from the history and 400 random). Each history is
clustered at its newest event, as `rankserve ingest --cluster-bundle` does; recall@64 against
exact is measured at the request time and 1 and 7 days later (gap buckets drifted), latency
(interleaved, one process) at the request time. Prints one JSON report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SPECS = {
    "exact": "exact",
    "faiss_knn": "faiss_knn",
    "before_p8": "twin_v2:n_probe=8,size_bias=1,split_bias=false",
    "before_p64": "twin_v2:n_probe=64,size_bias=1,split_bias=false",
    "after_p4": "twin_v2:n_probe=4",
    "after_p8": "twin_v2:n_probe=8",
    "after_p16": "twin_v2:n_probe=16",
    "after_p8_nosplit": "twin_v2:n_probe=8,split_bias=false",
}


def bench_histories() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    from feature_store.embedded import EmbeddedValkey
    from feature_store.redis_store import create_store
    from feature_store.store import EmbeddedConfig, FeatureStoreConfig
    from loadtest.bench import Workload, candidate_sets
    from loadtest.serving import ingest, prepare_workload
    from service.registry import ModelRegistry
    from service.retrieval import make_retriever
    from service.settings import Settings

    w = Workload(users=64)
    first = prepare_workload(Path(tempfile.mkdtemp(prefix="twin-v2-bench-")), w, "auto")
    if first.source != "generated":
        w.request_time = int(first.events.timestamp.max()) + 3600
    out = []
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
        ingest(valkey.url, first)
        cfg = FeatureStoreConfig(url=valkey.url)
        settings = Settings(model_dir=first.model_dir, feature_store=cfg, scorer_threads=2, poll_interval_s=0,
                            max_candidates=1000)
        model = ModelRegistry(settings, lambda: make_retriever("exact")).load_version()
        loop = asyncio.new_event_loop()
        store = create_store(cfg)
        for user, cands in candidate_sets(w, first.events, 64)[:8]:
            res = loop.run_until_complete(store.fetch(user, cands))
            h = res.sequence.before(w.request_time)
            out.append({"item": h.item, "category": h.category, "action": h.action, "timestamp": h.timestamp,
                        "c_item": res.item_index, "c_cat": res.category_index})
        loop.run_until_complete(store.aclose())
        loop.close()
    t = model.tables
    tables = {n: np.asarray(getattr(t, n)) for n in ("item_key", "category_key", "item_query", "category_query",
                                                     "gsu_action_bias", "gsu_gap_bias")}
    meta = {"request_time": w.request_time, "head_dim": model.retrieval.head_dim, "source": first.source}
    return tables, out, meta


def trained_histories(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    from models.checkpoint import load_run
    from models.data.readers import dataset_of_run

    model, schema, config = load_run(run)
    tables = {k: v.detach().numpy() for k, v in model.precomputed_tables().items()}
    ev = dataset_of_run(config).events
    _, offsets = ev.user_offsets()
    rng = np.random.default_rng(1)
    n_items = tables["item_key"].shape[0]
    out = []
    for u in np.argsort(-np.diff(offsets))[:8].tolist():
        e = int(offsets[u + 1])
        s = max(int(offsets[u]), e - 10_000)
        item = schema.items.lookup(ev.item_id[s:e]).astype(np.int64)
        cat = schema.categories.lookup(ev.category_id[s:e]).astype(np.int64)
        pick = rng.choice(e - s, 100)
        out.append({"item": item, "category": cat, "action": np.asarray(ev.action[s:e], np.int64),
                    "timestamp": np.asarray(ev.timestamp[s:e], np.int64),
                    "c_item": np.r_[item[pick], rng.integers(1, n_items, 400)],
                    "c_cat": np.r_[cat[pick], cat[rng.integers(0, e - s, 400)]]})
    meta = {"request_time": int(ev.timestamp.max()) + 3600, "head_dim": model.cfg.attn_dim // model.cfg.n_heads,
            "source": str(run)}
    return tables, out, meta


def gsu(tables: dict[str, Any], h: dict[str, Any], head_dim: int, at: int) -> tuple[Any, Any]:
    """Queries [B, A+1] and bias-augmented keys [L, A+1] as `service.assemble` builds them at time `at`."""
    from feature_store.schema import time_gap_bucket

    key = tables["item_key"][h["item"]] + tables["category_key"][h["category"]]
    gap = time_gap_bucket(at - h["timestamp"], tables["gsu_gap_bias"].shape[0])
    keys = np.empty((key.shape[0], key.shape[1] + 1), np.float32)
    keys[:, :-1] = key / math.sqrt(head_dim)
    keys[:, -1] = tables["gsu_action_bias"][h["action"]] + tables["gsu_gap_bias"][gap]
    q = tables["item_query"][h["c_item"]] + tables["category_query"][h["c_cat"]]
    queries = np.ones((q.shape[0], q.shape[1] + 1), np.float32)
    queries[:, :-1] = q
    return queries, keys


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tables", default="bench", help="bench | a trained run directory (runs/synth)")
    p.add_argument("--iterations", type=int, default=60)
    args = p.parse_args()
    from feature_store.clusters import UserClusterer, cluster_keys
    from feature_store.codecs import SequenceClusters
    from service.retrieval import RetrievalContext, make_retriever, recall_at_k

    tables, hists, meta = bench_histories() if args.tables == "bench" else trained_histories(Path(args.tables))
    clusterer = UserClusterer(tables["item_key"], tables["category_key"], tables["gsu_action_bias"],
                              tables["gsu_gap_bias"])
    fp = clusterer.fingerprint
    t0 = time.perf_counter()
    after = [clusterer.cluster(h["item"], h["category"], h["action"], h["timestamp"]) for h in hists]
    cluster_ms = (time.perf_counter() - t0) / len(hists) * 1000
    before = [cluster_keys(tables["item_key"][h["item"]] + tables["category_key"][h["category"]]) for h in hists]
    retrievers = {n: make_retriever(s) for n, s in SPECS.items()}

    def search(name: str, i: int, queries: Any, keys: Any) -> Any:
        r = retrievers[name]
        if not r.uses_context:
            return r.search(queries, keys, 64)[1]
        a, c = (before if name.startswith("before") else after)[i]  # type: ignore[misc]
        return r.search(queries, keys, 64, RetrievalContext(clusters=SequenceClusters(a, c, fp),
                                                                    key_fingerprint=fp))[1]

    lag_h = float(np.median([(meta["request_time"] - int(h["timestamp"].max())) / 3600 for h in hists]))
    report: dict[str, Any] = {"tables": meta["source"], "requests": len(hists),
                              "cluster_ms_per_user": round(cluster_ms, 1),
                              "clusters_after": float(np.mean([a[1] for a in after])),  # type: ignore[index]
                              "clusters_before": float(np.mean([b[1] for b in before])),
                              "request_after_clustering_h_median": round(lag_h, 1), "recall_at_64": {}}
    for days in (0, 1, 7):
        inputs = [gsu(tables, h, meta["head_dim"], meta["request_time"] + days * 86_400) for h in hists]
        report["recall_at_64"][f"+{days}d"] = {
            n: round(float(np.mean([recall_at_k(q, k, 64, search(n, i, q, k)) for i, (q, k) in enumerate(inputs)])), 4)
            for n in SPECS if n.startswith(("before", "after"))}
    inputs = [gsu(tables, h, meta["head_dim"], meta["request_time"]) for h in hists]
    wall: dict[str, list[float]] = {n: [] for n in SPECS}
    cpu: dict[str, list[float]] = {n: [] for n in SPECS}
    names, shuffle = list(SPECS), random.Random(0)
    report["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    for it in range(args.iterations):
        shuffle.shuffle(names)
        q, k = inputs[it % len(inputs)]
        for n in names:
            time.sleep(0.005)
            c0, w0 = time.process_time(), time.perf_counter()
            search(n, it % len(inputs), q, k)
            wall[n].append((time.perf_counter() - w0) * 1000)
            cpu[n].append((time.process_time() - c0) * 1000)
    ref_w, ref_c = np.median(wall["faiss_knn"]), np.median(cpu["faiss_knn"])
    report["latency"] = {n: {"p50_ms": round(float(np.median(wall[n])), 2),
                             "cpu_p50_ms": round(float(np.median(cpu[n])), 2),
                             "speedup_vs_faiss_knn_p50": round(float(ref_w / np.median(wall[n])), 1),
                             "cpu_speedup_vs_faiss_knn": round(float(ref_c / np.median(cpu[n])), 1)} for n in SPECS}
    report["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
