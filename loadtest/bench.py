"""`rankserve bench`: the standard workload of DESIGN.md, measured side by side in one run.

Standard workload: 1M-item catalogue, users with 10,000-event histories, 500 candidates per
request, k = 64 retrieved behaviours, 3 tasks, top-100 returned. The bench builds a bundle of
that size (random weights unless `--bundle` names a trained one: latency does not depend on
the weights), ingests users into an embedded Valkey, then measures, interleaved so machine
noise hits every method alike:

* retrieval: the service's exact strategy vs faiss.knn brute force vs numpy, same inputs;
* scoring: ONNX Runtime vs TorchScript vs PyTorch eager on the same inputs;
* in-process `RankingService.rank` with its per-stage breakdown;
* REST and gRPC against a `rankserve serve` process on loopback (concurrency 1).

Prints JSON (and writes it with `--out`) followed by a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("rankserve.bench")


@dataclass
class Workload:
    items: int = 1_000_000
    categories: int = 5_000
    users: int = 32
    history: int = 10_000
    candidates: int = 500
    k: int = 64
    top_n: int = 100
    iterations: int = 200
    warmup: int = 20
    seed: int = 0


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "n": int(a.shape[0]),
    }


def interleaved(methods: dict[str, Callable[[int], object]], iterations: int, warmup: int) -> dict[str, list[float]]:
    """Run each method once per round, rotating the order, and collect wall times in ms."""
    names = list(methods)
    for i in range(warmup):
        for name in names:
            methods[name](i)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iterations):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            methods[name](i)
            times[name].append((time.perf_counter() - t0) * 1000)
    return times


# ---------------------------------------------------------------------------------------------
# setup


def build_bundle(root: Path, w: Workload, schema: Any = None) -> Path:
    """A bundle with the standard workload's table sizes and random weights.

    `schema` (a FeatureSchema) replaces the default vocabularies (ids 0..n-1), e.g. with those of
    a synthetic set, so that its ingested users and items are known to the bundle.
    """
    import torch

    from export.exporter import write_bundle
    from feature_store.schema import FeatureSchema, SchemaSpec, Vocabulary
    from models.model import ModelConfig, RankingModel

    if schema is None:
        schema = FeatureSchema(
            SchemaSpec(name="bench"),
            Vocabulary.build(np.arange(w.users)),
            Vocabulary.build(np.arange(w.items)),
            Vocabulary.build(np.arange(w.categories)),
        )
    schema.save(root / "schema")
    torch.manual_seed(w.seed)
    sizes = schema.vocab_sizes()
    model = RankingModel(ModelConfig(retrieval_k=w.k), schema.spec, sizes["user"], sizes["item"], sizes["category"])
    with torch.no_grad():
        for p in model.scorer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    return write_bundle(model, root / "schema", {"variant": "twin", "data": "bench"}, root / "models", "bench")


def bench_events(w: Workload) -> tuple[Any, npt.NDArray[np.int64]]:
    """Users with `history` events each (raw ids == vocabulary ids), and each item's category."""
    from models.data.events import EventLog

    rng = np.random.default_rng(w.seed)
    item_category = rng.integers(0, w.categories, w.items)
    n = w.users * w.history
    items = rng.zipf(1.3, n) % w.items
    ts = 1_700_000_000 - rng.integers(60, 365 * 86_400, n)
    log_ = EventLog.from_unsorted(
        np.repeat(np.arange(w.users), w.history), items, item_category[items],
        rng.choice(4, n, p=[0.85, 0.05, 0.04, 0.06]), ts, dedup=False,
    )
    return log_, item_category


def candidate_sets(w: Workload, log_: Any, rounds: int) -> list[tuple[int, list[int]]]:
    """(user, candidates): a fifth from the user's history (revisits), the rest uniform."""
    rng = np.random.default_rng(w.seed + 1)
    users, offsets = log_.user_offsets()
    out = []
    for r in range(rounds):
        u = r % users.shape[0]
        hist = log_.item_id[offsets[u] : offsets[u + 1]]
        n_hist = w.candidates // 5
        cands = np.r_[rng.choice(hist, n_hist), rng.integers(0, w.items, w.candidates - n_hist)]
        out.append((int(users[u]), [int(c) for c in cands]))
    return out


# ---------------------------------------------------------------------------------------------
# sections


def section_retrieval(model: Any, store_fetch: Callable[[int, list[int]], Any], reqs: list[tuple[int, list[int]]],
                      w: Workload) -> dict[str, Any]:
    """Exact strategy vs faiss.knn vs numpy on the keys/queries the service builds."""
    import math

    from feature_store.schema import time_gap_bucket
    from service.retrieval import make_retriever

    t = model.tables
    inputs = []
    for user, cands in reqs[:16]:
        res = store_fetch(user, cands)
        seq = res.sequence
        key = t.item_key[seq.item] + t.category_key[seq.category]
        gap = time_gap_bucket(1_700_000_000 - seq.timestamp, model.retrieval.time_gap_buckets)
        keys = np.empty((key.shape[0], key.shape[1] + 1), dtype=np.float32)
        keys[:, :-1] = key / math.sqrt(model.retrieval.head_dim)
        keys[:, -1] = t.gsu_action_bias[seq.action] + t.gsu_gap_bias[gap]
        q = t.item_query[res.item_index] + t.category_query[res.category_index]
        queries = np.ones((q.shape[0], q.shape[1] + 1), dtype=np.float32)
        queries[:, :-1] = q
        inputs.append((queries, keys))
    retrievers = {name: make_retriever(name) for name in ("exact", "faiss_knn", "numpy")}
    # identical results: the same top-k scores per query as faiss.knn. Histories repeat items, so
    # many keys are exact duplicates and index sets may differ among ties: compare scores.
    mismatched_rows = 0
    for queries, keys in inputs:
        sa, _ = retrievers["exact"].search(queries, keys, w.k)
        sb, _ = retrievers["faiss_knn"].search(queries, keys, w.k)
        mismatched_rows += int((np.abs(sa - sb) > 1e-4 * (1 + np.abs(sb))).any(axis=1).sum())
    methods = {
        name: (lambda i, r=r: r.search(*inputs[i % len(inputs)], w.k)) for name, r in retrievers.items()
    }
    times = interleaved(methods, w.iterations, w.warmup)
    stats = {name: percentiles(v) for name, v in times.items()}
    return {
        "shape": {"queries": w.candidates, "keys": w.history, "dim": int(inputs[0][1].shape[1]), "k": w.k},
        "latency_ms": stats,
        "speedup_vs_faiss_knn_p50": round(stats["faiss_knn"]["p50"] / stats["exact"]["p50"], 2),
        "rows_differing_from_faiss_knn": mismatched_rows,
        "rows_compared": len(inputs) * w.candidates,
    }


def section_scoring(model: Any, bundle_path: Path, store_fetch: Callable[[int, list[int]], Any],
                    reqs: list[tuple[int, list[int]]], w: Workload, threads: int) -> dict[str, Any]:
    """ONNX Runtime vs TorchScript vs PyTorch eager on identical scorer inputs."""
    import torch

    from export.bundle import SCORER_INPUTS
    from models.checkpoint import load_run  # noqa: F401  (documents where eager models come from)
    from service.scoring import OnnxScorer, TorchScriptScorer

    torch.set_num_threads(threads)
    batches = []
    for user, cands in reqs[:8]:
        res = store_fetch(user, cands)
        batches.append(model.inputs(res.sequence, res.user_index or 0, res.item_index, res.category_index,
                                    1_700_000_000))
    onnx = OnnxScorer(bundle_path / "scorer.onnx", threads)
    ts = TorchScriptScorer(bundle_path / "scorer.torchscript.pt", threads, "cpu")
    eager = eager_scorer(bundle_path)

    def run_eager(i: int) -> object:
        b = batches[i % len(batches)]
        with torch.inference_mode():
            return eager(*(torch.from_numpy(b[n]) for n in SCORER_INPUTS))

    methods = {
        "onnxruntime": lambda i: onnx.predict(batches[i % len(batches)]),
        "torchscript": lambda i: ts.predict(batches[i % len(batches)]),
        "pytorch_eager": run_eager,
    }
    diff = float(np.abs(onnx.predict(batches[0]) - run_eager(0).numpy()).max())  # type: ignore[attr-defined]
    times = interleaved(methods, w.iterations, w.warmup)
    stats = {name: percentiles(v) for name, v in times.items()}
    return {
        "batch": w.candidates,
        "threads": threads,
        "latency_ms": stats,
        "onnx_speedup_vs_eager_p50": round(stats["pytorch_eager"]["p50"] / stats["onnxruntime"]["p50"], 2),
        "max_abs_diff_onnx_vs_eager": diff,
    }


def eager_scorer(bundle_path: Path) -> Any:
    """The bundle's scorer as a PyTorch eager module (weights copied from the TorchScript file)."""
    import torch

    from feature_store.schema import FeatureSchema
    from models.model import ModelConfig, Scorer

    manifest = json.loads((bundle_path / "manifest.json").read_text())
    schema = FeatureSchema.load(bundle_path / "schema")
    scorer = Scorer(ModelConfig(**manifest["model"]["config"]), schema.spec)
    scripted = torch.jit.load(str(bundle_path / "scorer.torchscript.pt"))
    scorer.load_state_dict(scripted.state_dict())
    scorer.eval()
    return scorer


async def section_inprocess(settings: Any, reqs: list[tuple[int, list[int]]], w: Workload) -> dict[str, Any]:
    from service.lifecycle import ServingCore
    from service.types import RankRequest

    core = await ServingCore.create(settings)
    try:
        await core.start()
        deadline = time.monotonic() + 300
        while not (await core.check_readiness()).ready:
            if time.monotonic() > deadline:
                raise RuntimeError("the in-process core did not become ready")
            await asyncio.sleep(0.1)
        service = core.service
        stage_times: dict[str, list[float]] = {}
        totals: list[float] = []
        for i in range(w.warmup + w.iterations):
            user, cands = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            resp = await service.rank(RankRequest(user, cands, top_n=w.top_n, request_time=1_700_000_000, debug=True))
            elapsed = (time.perf_counter() - t0) * 1000
            if i >= w.warmup:
                totals.append(elapsed)
                for stage, ms in resp.timings_ms.items():
                    stage_times.setdefault(stage, []).append(ms)
            if resp.degraded:
                raise RuntimeError("benchmark request was degraded: the store did not answer")
        return {"total_ms": percentiles(totals), "stages_ms": {s: percentiles(v) for s, v in stage_times.items()}}
    finally:
        await core.aclose()


def section_transports(settings_env: dict[str, str], model_dir: Path, redis_url: str,
                       reqs: list[tuple[int, list[int]]], w: Workload) -> dict[str, Any]:
    """REST and gRPC latency at concurrency 1 against a `rankserve serve` process."""
    import httpx

    from feature_store.embedded import free_port

    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))} | settings_env
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--model-dir", str(model_dir), "--redis-url", redis_url],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{http_port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                raise RuntimeError("server did not become ready")
            bodies = [
                json.dumps({"user_id": u, "candidates": c, "top_n": w.top_n, "request_time": 1_700_000_000})
                for u, c in reqs
            ]

            def rest(i: int) -> object:
                r = client.post("/v1/rank", content=bodies[i % len(bodies)],
                                headers={"content-type": "application/json"})
                if r.status_code != 200:
                    raise RuntimeError(f"REST {r.status_code}: {r.text[:200]}")
                return r

            grpc_call = grpc_caller(f"127.0.0.1:{grpc_port}", reqs, w)
            times = interleaved({"rest": rest, "grpc": grpc_call}, w.iterations, w.warmup)
        return {name: percentiles(v) for name, v in times.items()}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def grpc_caller(target: str, reqs: list[tuple[int, list[int]]], w: Workload) -> Callable[[int], object]:
    import grpc

    from service.proto import ranker_pb2, ranker_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = ranker_pb2_grpc.RankerStub(channel)
    messages = [
        ranker_pb2.RankRequest(user_id=u, candidates=c, top_n=w.top_n, request_time=1_700_000_000) for u, c in reqs
    ]

    def call(i: int) -> object:
        return stub.Rank(messages[i % len(messages)], timeout=30)

    return call


# ---------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = ["| measurement | p50 ms | p99 ms | note |", "|---|---|---|---|"]
    r = report.get("retrieval")
    if r:
        for name, s in r["latency_ms"].items():
            lines.append(f"| retrieval: {name} | {s['p50']} | {s['p99']} | |")
        lines.append(f"| retrieval speedup vs faiss.knn (p50) | | | {r['speedup_vs_faiss_knn_p50']}x, "
                     f"{r['rows_differing_from_faiss_knn']}/{r['rows_compared']} rows differ |")
    s = report.get("scoring")
    if s:
        for name, st in s["latency_ms"].items():
            lines.append(f"| scoring: {name} | {st['p50']} | {st['p99']} | |")
        lines.append(f"| ONNX speedup vs eager (p50) | | | {s['onnx_speedup_vs_eager_p50']}x |")
    p = report.get("in_process")
    if p:
        lines.append(f"| in-process rank (total) | {p['total_ms']['p50']} | {p['total_ms']['p99']} | |")
        for stage, st in p["stages_ms"].items():
            lines.append(f"| stage: {stage} | {st['p50']} | {st['p99']} | |")
    t = report.get("transports")
    if t:
        for name, st in t.items():
            ratio = round(st["p50"] / p["total_ms"]["p50"], 2) if p else None
            lines.append(f"| {name} (concurrency 1) | {st['p50']} | {st['p99']} | {ratio}x in-process p50 |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Workload()
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--history", type=int, default=d.history)
    p.add_argument("--candidates", type=int, default=d.candidates)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--threads", type=int, default=None, help="scorer threads (default: available CPUs)")
    p.add_argument("--sections", default="retrieval,scoring,in_process,transports",
                   help="comma-separated subset of retrieval,scoring,in_process,transports")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument("--keep", action="store_true", help="keep the temporary bundle directory")


def run(args: argparse.Namespace) -> int:
    from feature_store.embedded import EmbeddedValkey
    from feature_store.ingest import ingest_log
    from feature_store.schema import FeatureSchema
    from feature_store.store import EmbeddedConfig, FeatureStoreConfig, create_store
    from service.settings import Settings, available_cpus

    w = Workload(items=args.items, users=args.users, history=args.history, candidates=args.candidates, k=args.k,
                 iterations=args.iterations, warmup=args.warmup)
    threads = args.threads or available_cpus()
    sections = set(args.sections.split(","))
    root = Path(tempfile.mkdtemp(prefix="rankserve-bench-"))
    report: dict[str, Any] = {"workload": asdict(w), "cpus": available_cpus(), "scorer_threads": threads}
    t0 = time.perf_counter()
    try:
        bundle_path = build_bundle(root, w)
        schema = FeatureSchema.load(bundle_path / "schema")
        events, _ = bench_events(w)
        reqs = candidate_sets(w, events, 64)
        report["setup_s"] = {"bundle": round(time.perf_counter() - t0, 1)}
        with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
            cfg = FeatureStoreConfig(url=valkey.url)

            async def ingest() -> None:
                async with create_store(cfg) as store:
                    await ingest_log(store, events, schema, "bench", activate=True)

            asyncio.run(ingest())
            report["setup_s"]["ingest"] = round(time.perf_counter() - t0, 1)
            settings = Settings(model_dir=root / "models", feature_store=cfg, scorer_threads=threads,
                                poll_interval_s=0, max_candidates=max(1000, w.candidates))

            from service.registry import ModelRegistry
            from service.retrieval import make_retriever

            registry = ModelRegistry(settings, lambda: make_retriever("exact"))
            model = registry.load_version()
            loop = asyncio.new_event_loop()
            fetch_store = create_store(cfg)

            def fetch(user: int, cands: list[int]) -> Any:
                return loop.run_until_complete(fetch_store.fetch(user, cands))

            if "retrieval" in sections:
                report["retrieval"] = section_retrieval(model, fetch, reqs, w)
            if "scoring" in sections:
                report["scoring"] = section_scoring(model, bundle_path, fetch, reqs, w, threads)
            loop.run_until_complete(fetch_store.aclose())
            loop.close()
            if "in_process" in sections:
                report["in_process"] = asyncio.run(section_inprocess(settings, reqs, w))
            if "transports" in sections:
                env = {"RANKSERVE_SCORER_THREADS": str(threads), "RANKSERVE_POLL_INTERVAL_S": "0",
                       "RANKSERVE_MAX_CANDIDATES": str(max(1000, w.candidates)), "RANKSERVE_LOG_LEVEL": "WARNING"}
                report["transports"] = section_transports(env, root / "models", valkey.url, reqs, w)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text + "\n\n" + markdown(report) + "\n")
    return 0
