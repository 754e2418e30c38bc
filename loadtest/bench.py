"""`rankserve bench`: the standard workload, measured side by side in one run.

Standard workload: 1M-item catalogue, users with 10,000-event histories, 500 candidates per
request, k = 64 retrieved behaviours, 3 tasks, top-100 returned. The bench builds a bundle of
that size (random weights: latency does not depend on them), ingests users (from the synthetic set in
data-cache/synth when present, else generated) into an embedded Valkey, then measures,
interleaved so machine noise hits every method alike:

* retrieval: the service's exact strategy vs faiss.knn brute force vs numpy, same inputs;
* strategies: every GSU strategy (exact with and without duplicate removal, faiss.knn, numpy,
  eta, sim_hard) with recall@k against exact, plus a latency-versus-recall plot;
* scoring: ONNX Runtime vs TorchScript vs PyTorch eager on the same inputs;
* in-process `RankingService.rank` with its per-stage breakdown;
* sweeps: in-process latency against history length and candidate count, plotted;
* transports: REST and gRPC against a `rankserve serve` process on loopback at concurrency 1, 8
  and 32 (p50 / p95 / p99, throughput, server CPU per request);
* throughput: the highest open-loop REST load whose p99 stays within --slo-ms;
* memory: PSS / USS of one and two worker processes;
* fetch: `loadtest.bench_fetch` (ours vs the raw Redis floor vs Feast);
* side_features: `loadtest.bench_side`: the same workload served without and with side features
  (3 item, 2 user, 2 context; tables ingested, requests with a context), two servers measured in
  alternating rounds: server CPU per request, p50 / p99, and their ratio (target: at most 1.15).
* stream: `loadtest.bench_stream`: one `rankserve consume` worker against the raw Redis Streams
  floor (events/s), event-to-servable latency under a background event load, and REST p99 at
  concurrency 1 idle vs while consuming.

Servers run with the tuned environment (`loadtest.bench_e2e.TUNED_ENV`) unless --untuned.

`--gpu` (`make bench-gpu`) measures the GPU paths instead (`loadtest.bench_gpu`): faiss GPU and the
exact strategy on GPU, ONNX Runtime CUDA / TensorRT, and the in-process core and the servers with
RANKSERVE_EXECUTION_PROVIDER=cuda and RANKSERVE_RETRIEVAL_DEVICE=gpu. It checks first that a CUDA
device, onnxruntime's CUDA provider and faiss GPU are there and refuses in one line (exit 2) when
one is missing; it never falls back to CPU.
Prints JSON (and writes it with `--out`, plots beside it or in --plots) followed by a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from loadtest.bench_e2e import TUNED_ENV

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
    request_time: int = 1_700_000_000  # after every generated event; set from the data for a synthetic set


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "n": int(a.shape[0]),
    }


def interleaved(methods: Mapping[str, Callable[[int], object]], iterations: int, warmup: int) -> dict[str, list[float]]:
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


def build_bundle(root: Path, w: Workload, schema: Any = None, like: Path | None = None,
                 quantize: str | None = None) -> Path:
    """A bundle with the standard workload's table sizes and random weights (`quantize`: `write_bundle`'s).

    `schema` (a FeatureSchema) replaces the default vocabularies (ids 0..n-1), e.g. with those of
    a synthetic set, so that its ingested users and items are known to the bundle.
    `like`: another bundle whose scorer weights are copied wherever name and shape agree (a
    side-feature twin keeps the base's retrieval biases and event tables, so both retrieve alike).
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
        if like is not None:
            shared = torch.jit.load(str(like / "scorer.torchscript.pt")).state_dict()  # type: ignore[no-untyped-call]
            for name, t in model.scorer.state_dict().items():
                if name in shared and shared[name].shape == t.shape:
                    t.copy_(shared[name])
    model.eval()
    return write_bundle(model, root / "schema", {"variant": "twin", "data": "bench"}, root / "models", "bench",
                        quantize=quantize)


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
                      w: Workload, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Exact strategy vs faiss.knn vs numpy on the keys/queries the service builds.

    `extra`: more retrievers measured beside them (the GPU ones), each compared with faiss.knn too.
    """
    import math

    from feature_store.schema import time_gap_bucket
    from service.retrieval import make_retriever

    t = model.tables
    inputs = []
    for user, cands in reqs[:16]:
        res = store_fetch(user, cands)
        seq = res.sequence
        key = t.item_key[seq.item] + t.category_key[seq.category]
        gap = time_gap_bucket(w.request_time - seq.timestamp, model.retrieval.time_gap_buckets)
        keys = np.empty((key.shape[0], key.shape[1] + 1), dtype=np.float32)
        keys[:, :-1] = key / math.sqrt(model.retrieval.head_dim)
        keys[:, -1] = t.gsu_action_bias[seq.action] + t.gsu_gap_bias[gap]
        q = t.item_query[res.item_index] + t.category_query[res.category_index]
        queries = np.ones((q.shape[0], q.shape[1] + 1), dtype=np.float32)
        queries[:, :-1] = q
        inputs.append((queries, keys))
    retrievers = {name: make_retriever(name) for name in ("exact", "faiss_knn", "numpy")} | dict(extra or {})
    # identical results: the same top-k scores per query as faiss.knn. Histories repeat items, so
    # many keys are exact duplicates and index sets may differ among ties: compare scores.
    compared = ["exact", *(extra or {})]
    mismatched = dict.fromkeys(compared, 0)
    for queries, keys in inputs:
        sb, _ = retrievers["faiss_knn"].search(queries, keys, w.k)
        for name in compared:
            sa, _ = retrievers[name].search(queries, keys, w.k)
            mismatched[name] += int((np.abs(sa - sb) > 1e-4 * (1 + np.abs(sb))).any(axis=1).sum())
    mismatched_rows = mismatched["exact"]
    methods = {
        name: (lambda i, r=r: r.search(*inputs[i % len(inputs)], w.k)) for name, r in retrievers.items()
    }
    times = interleaved(methods, w.iterations, w.warmup)
    stats = {name: percentiles(v) for name, v in times.items()}
    out = {
        "shape": {"queries": w.candidates, "keys": w.history, "dim": int(inputs[0][1].shape[1]), "k": w.k},
        "latency_ms": stats,
        "speedup_vs_faiss_knn_p50": round(stats["faiss_knn"]["p50"] / stats["exact"]["p50"], 2),
        "rows_differing_from_faiss_knn": mismatched_rows,
        "rows_compared": len(inputs) * w.candidates,
    }
    if extra:
        out["rows_differing_from_faiss_knn_by_method"] = mismatched
        out["speedup_vs_faiss_knn_p50_by_method"] = {
            name: round(stats["faiss_knn"]["p50"] / stats[name]["p50"], 2) for name in compared
        }
    return out


def ort_session(path: Path, threads: int, spinning: bool) -> Any:
    """An ONNX Runtime CPU session as `service.scoring.OnnxScorer` builds it, with the spinning knob exposed."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def section_scoring(model: Any, bundle_path: Path, store_fetch: Callable[[int, list[int]], Any],
                    reqs: list[tuple[int, list[int]]], w: Workload, threads: int) -> dict[str, Any]:
    """ONNX Runtime (thread and spinning variants) vs TorchScript vs PyTorch eager.

    Same scorer inputs for all; wall time per call and CPU time of the process per call (on 2
    shared cores a spinning thread pool looks fast in wall time and costs the neighbours).
    """
    import torch

    from feature_store.schema import SCORER_INPUTS
    from service.scoring import TorchScriptScorer

    torch.set_num_threads(threads)
    batches = []
    for user, cands in reqs[:8]:
        res = store_fetch(user, cands)
        batches.append(model.inputs(res.sequence.before(w.request_time), res.user_index or 0, res.item_index,
                                    res.category_index, w.request_time))
    feeds = [{n: b[n] for n in SCORER_INPUTS} for b in batches]
    sessions = {
        f"onnxruntime_{threads}t_spin": ort_session(bundle_path / "scorer.onnx", threads, True),
        f"onnxruntime_{threads}t_nospin": ort_session(bundle_path / "scorer.onnx", threads, False),
        "onnxruntime_1t": ort_session(bundle_path / "scorer.onnx", 1, False),
    }
    ts = TorchScriptScorer(bundle_path / "scorer.torchscript.pt", threads, "cpu")
    eager = eager_scorer(bundle_path)

    def run_eager(i: int) -> Any:
        b = batches[i % len(batches)]
        with torch.inference_mode():
            return eager(*(torch.from_numpy(b[n]) for n in SCORER_INPUTS))

    def run_onnx(sess: Any) -> Callable[[int], object]:
        return lambda i: sess.run(None, feeds[i % len(feeds)])

    methods: dict[str, Callable[[int], object]] = {name: run_onnx(sess) for name, sess in sessions.items()}
    methods["torchscript"] = lambda i: ts.predict(batches[i % len(batches)])
    methods["pytorch_eager"] = run_eager
    reference = run_eager(0).numpy()
    diffs = {name: float(np.abs(sess.run(None, feeds[0])[0] - reference).max()) for name, sess in sessions.items()}
    cpu: dict[str, list[float]] = {name: [] for name in methods}

    def timed_cpu(name: str, fn: Callable[[int], object]) -> Callable[[int], object]:
        def call(i: int) -> object:
            c0 = time.process_time()
            out = fn(i)
            cpu[name].append((time.process_time() - c0) * 1000)
            return out

        return call

    times = interleaved({name: timed_cpu(name, fn) for name, fn in methods.items()}, w.iterations, w.warmup)
    stats = {name: percentiles(v) | {"cpu_p50": round(float(np.median(cpu[name][w.warmup:])), 3)}
             for name, v in times.items()}
    best_onnx = min((n for n in stats if n.startswith("onnxruntime")), key=lambda n: stats[n]["p50"])
    return {
        "batch": w.candidates,
        "threads": threads,
        "latency_ms": stats,
        "onnx_speedup_vs_eager_p50": round(stats["pytorch_eager"]["p50"] / stats[best_onnx]["p50"], 2),
        "best_onnx_variant": best_onnx,
        "max_abs_diff_vs_eager": diffs,
    }


def eager_scorer(bundle_path: Path) -> Any:
    """The bundle's scorer as a PyTorch eager module (weights copied from the TorchScript file)."""
    import torch

    from feature_store.schema import FeatureSchema
    from models.model import ModelConfig, Scorer

    manifest = json.loads((bundle_path / "manifest.json").read_text())
    schema = FeatureSchema.load(bundle_path / "schema")
    scorer = Scorer(ModelConfig.from_dict(manifest["model"]["config"]), schema.spec)
    scripted = torch.jit.load(str(bundle_path / "scorer.torchscript.pt"))  # type: ignore[no-untyped-call]
    # the TorchScript file also holds the module's non-persistent buffers (constants the module
    # builds itself, not weights): copy only what the eager module keeps in its state
    kept = scorer.state_dict()
    scorer.load_state_dict({name: value for name, value in scripted.state_dict().items() if name in kept})
    scorer.eval()
    return scorer


async def section_inprocess(settings: Any, reqs: list[tuple[int, list[int]]], w: Workload,
                            check: Callable[[Any], dict[str, str]] | None = None) -> dict[str, Any]:
    """`RankingService.rank` in this process, per stage; `check(core)` once ready (the GPU run's: on the GPU?)."""
    from loadtest.serving import wait_until_ready
    from service.lifecycle import ServingCore
    from service.types import RankRequest

    core = await ServingCore.create(settings)
    try:
        await core.start()
        await wait_until_ready(core)
        checked = check(core) if check is not None else {}
        service = core.service
        stage_times: dict[str, list[float]] = {}
        totals: list[float] = []
        for i in range(w.warmup + w.iterations):
            user, cands = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            resp = await service.rank(RankRequest(user, list(cands), top_n=w.top_n, request_time=w.request_time,
                                                  debug=True))
            elapsed = (time.perf_counter() - t0) * 1000
            if i >= w.warmup:
                totals.append(elapsed)
                for stage, ms in resp.timings_ms.items():
                    stage_times.setdefault(stage, []).append(ms)
            if resp.degraded:
                raise RuntimeError("benchmark request was degraded: the store did not answer")
        return {"total_ms": percentiles(totals), "stages_ms": {s: percentiles(v) for s, v in stage_times.items()},
                **checked}
    finally:
        await core.aclose()


def markdown(report: dict[str, Any]) -> str:
    lines = ["| measurement | p50 ms | p99 ms | note |", "|---|---|---|---|"]
    r = report.get("retrieval")
    if r:
        for name, s in r["latency_ms"].items():
            lines.append(f"| retrieval: {name} | {s['p50']} | {s['p99']} | |")
        lines.append(f"| retrieval speedup vs faiss.knn (p50) | | | {r['speedup_vs_faiss_knn_p50']}x, "
                     f"{r['rows_differing_from_faiss_knn']}/{r['rows_compared']} rows differ |")
    st = report.get("strategies")
    if st:
        for name, m in st["methods"].items():
            lines.append(f"| strategy: {name} | {m['p50_ms']} | {m['p99_ms']} | recall@{st['shape']['k']} "
                         f"{m['recall_at_k']}, CPU {m['cpu_p50_ms']} ms, {m.get('speedup_vs_faiss_knn_p50')}x "
                         f"faiss.knn wall, {m.get('cpu_speedup_vs_faiss_knn')}x CPU |")
    s = report.get("scoring")
    if s:
        for name, sc in s["latency_ms"].items():
            cpu = f"CPU {sc['cpu_p50']} ms" if "cpu_p50" in sc else ""  # the GPU run times wall clock only
            lines.append(f"| scoring: {name} | {sc['p50']} | {sc['p99']} | {cpu} |")
        if "best_onnx_variant" in s:
            lines.append(f"| ONNX ({s['best_onnx_variant']}) speedup vs eager (p50) | | | "
                         f"{s['onnx_speedup_vs_eager_p50']}x |")
    p = report.get("in_process")
    if p:
        lines.append(f"| in-process rank (total) | {p['total_ms']['p50']} | {p['total_ms']['p99']} | |")
        for stage, sp in p["stages_ms"].items():
            lines.append(f"| stage: {stage} | {sp['p50']} | {sp['p99']} | |")
    sw = report.get("sweeps")
    if sw:
        for case, stages in sw["cases"].items():
            lines.append(f"| sweep {case}: total | {stages['total']['p50']} | {stages['total']['p99']} | "
                         f"retrieve {stages['retrieve']['p50']}, score {stages['score']['p50']} (p50) |")
    e2e = report.get("e2e", {})
    for key, label in (("concurrency", ""), ("concurrency_batched", " (scorer micro-batching)")):
        for transport, levels in e2e.get(key, {}).items():
            if not isinstance(levels, dict) or transport == "scorer_batches":
                continue
            for c, m in levels.items():
                lines.append(f"| {transport} c={c}{label} | {m['p50']} | {m['p99']} | p95 {m['p95']}, "
                             f"{m['throughput_rps']} req/s, server CPU {m['server_cpu_ms_per_request']} ms/req, "
                             f"{m['failures']} failures |")
    batches = e2e.get("concurrency_batched", {}).get("scorer_batches")
    if batches:
        lines.append(f"| scorer micro-batching (wait {batches['wait_ms']} ms) | | | "
                     f"{batches['mean_requests_per_call']} requests per scorer call on average "
                     f"({batches['calls']} calls) |")
    t = e2e.get("throughput")
    if t:
        lines.append(f"| REST max throughput with p99 <= {t['slo_p99_ms']} ms | | | "
                     f"{t['max_rps_within_slo']} req/s (offered {t['at_offered_rps']}) |")
    mem = report.get("memory")
    if mem:
        lines.append(f"| second worker adds | | | PSS {mem['second_worker_adds_pss_mb']} MB; "
                     f"worker USS {mem['worker_uss_mb']} MB |")
    f = report.get("fetch")
    if f and "summary" in f:
        for name, v in f["summary"].items():
            lines.append(f"| fetch: {name} | {v.get('p50_ms')} | {v.get('p99_ms')} | |")
    sf = report.get("side_features")
    if sf:
        from loadtest.bench_side import markdown_rows

        lines += markdown_rows(sf)
    st = report.get("stream")
    if st:
        from loadtest.bench_stream import markdown_rows as stream_rows

        lines += ["", *stream_rows(st)]
    if report.get("gpu"):
        from loadtest.bench_gpu import markdown_rows as gpu_rows

        lines += gpu_rows(report)
    return "\n".join(lines)


ALL_SECTIONS = ("retrieval", "strategies", "scoring", "in_process", "sweeps", "transports", "throughput", "memory",
                "fetch", "side_features", "stream")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Workload()
    p.add_argument("--data", default="auto",
                   help="auto (data-cache/synth when present, else generated) | generated | synthetic:DIR")
    p.add_argument("--items", type=int, default=d.items, help="catalogue size (generated data)")
    p.add_argument("--users", type=int, default=64, help="users ingested")
    p.add_argument("--history", type=int, default=d.history, help="behaviours per user history")
    p.add_argument("--candidates", type=int, default=d.candidates, help="candidates per request")
    p.add_argument("--k", type=int, default=d.k, help="behaviours retrieved per candidate")
    p.add_argument("--iterations", type=int, default=d.iterations, help="timed requests per measurement")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed requests before each measurement")
    p.add_argument("--threads", type=int, default=None, help="in-process scorer threads (default: available CPUs)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {ALL_SECTIONS}; default: all, with --gpu "
                        "retrieval,scoring,in_process,transports (throughput may be added)")
    p.add_argument("--gpu", action="store_true",
                   help="measure the GPU paths (faiss GPU, ONNX Runtime CUDA and TensorRT, servers with "
                        "RANKSERVE_EXECUTION_PROVIDER=cuda and RANKSERVE_RETRIEVAL_DEVICE=gpu); refuses to start, "
                        "exit 2, without a CUDA device, onnxruntime-gpu or faiss GPU (`make bench-gpu`)")
    p.add_argument("--gpu-batch-wait-ms", type=float, default=1.0,
                   help="with --gpu: run the transports again with RANKSERVE_SCORER_BATCH_WAIT_MS set to this "
                        "(scorer micro-batching; 0 skips that run)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="serve a bundle whose ONNX scorer is quantized (`rankserve export --quantize`)")
    p.add_argument("--levels", default="1,8,32", help="client concurrency levels of the transports section")
    p.add_argument("--level-requests", type=int, default=300, help="requests per transport and level")
    p.add_argument("--slo-ms", type=float, default=50.0, help="p99 objective of the throughput search")
    p.add_argument("--step-seconds", type=float, default=15.0, help="duration of each throughput step")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server environment (repeatable); the tuned defaults are "
                        + ", ".join(f"{k}={v}" for k, v in TUNED_ENV.items()))
    p.add_argument("--untuned", action="store_true", help="start servers without the tuned environment")
    p.add_argument("--workers", type=int, default=1, help="server worker processes of the transports sections")
    p.add_argument("--side-rounds", type=int, default=6,
                   help="side_features: alternating rounds (each one run per server: base, then side, or side, base)")
    p.add_argument("--side-requests", type=int, default=100, help="side_features: requests per server and round")
    p.add_argument("--side-concurrency", type=int, default=1, help="side_features: closed-loop client concurrency")
    p.add_argument("--side-transports", default="rest", help="side_features: comma-separated subset of rest,grpc")
    p.add_argument("--side-inprocess", type=int, default=100,
                   help="side_features: requests per bundle of the in-process per-stage split (0: skip it)")
    p.add_argument("--side-budget-s", type=float, default=1200.0,
                   help="side_features: stop starting rounds after this many seconds of measuring (one at least)")
    p.add_argument("--stream-rounds", type=int, default=6, help="stream: alternating rounds of each comparison")
    p.add_argument("--stream-events", type=int, default=100_000, help="stream: events per throughput round")
    p.add_argument("--stream-rate", type=float, default=5000.0, help="stream: background events/s")
    p.add_argument("--stream-producer-batch", type=int, default=1000,
                   help="stream: events per producer send in the throughput rounds (one packed entry per shard a "
                        "send; 1000 is the most one POST /v1/events takes)")
    p.add_argument("--stream-control-cores", type=float, default=0.0,
                   help="stream: add a control phase to the serving rounds, beside a process that keeps this many "
                   "cores busy (0-1) without events or Redis work")
    p.add_argument("--stream-serve-requests", type=int, default=150,
                   help="stream: REST requests per serving round (each phase gets rounds x this many)")
    p.add_argument("--stream-probes", type=int, default=200, help="stream: event-to-servable probes")
    p.add_argument("--stream-population", type=int, default=100_000,
                   help="stream: users the throughput events are drawn from (the workload's users among them)")
    p.add_argument("--stream-cluster-ids", action="store_true",
                   help="stream: cluster the workload's histories and alternate consumer rounds with and without "
                   "nearest-centroid twin_v2 cluster ids")
    p.add_argument("--stream-consumer-nice", type=int, default=0,
                   help="stream: start the serving rounds' consumer with `--nice N` (a lower CPU priority than the "
                   "server's, as the pods' CPU requests give it in Kubernetes)")
    p.add_argument("--stream-throughput-only", action="store_true",
                   help="stream: the throughput part only (no server, no latency or serving rounds)")
    p.add_argument("--plots", type=Path, default=None, help="directory of the PNG plots (default: beside --out)")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument("--out-md", type=Path, help="also write the markdown table here")
    p.add_argument("--keep", action="store_true", help="keep the temporary bundle directory")


def section_concurrency_batched(model_dir: Path, redis_url: str, server_env: Mapping[str, str],
                                args: argparse.Namespace, bodies: list[bytes], reqs: list[tuple[int, list[int]]],
                                w: Workload, levels: list[int], root: Path) -> dict[str, Any]:
    """The transports section again, against a server with scorer micro-batching on; how many requests shared a call."""
    import httpx

    from loadtest.bench_e2e import section_concurrency
    from loadtest.bench_gpu import check_server
    from loadtest.serving import ServerProcess

    env = dict(server_env) | {"RANKSERVE_SCORER_BATCH_WAIT_MS": str(args.gpu_batch_wait_ms)}
    with ServerProcess(model_dir, redis_url, env=env, workers=args.workers,
                       log_path=root / "server-batched.log") as server:
        check_server(server.base_url)
        out = section_concurrency(server, bodies, reqs, w.top_n, w.request_time, levels, args.level_requests)
        metrics = httpx.get(server.base_url + "/metrics", timeout=10.0).text
    values = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in ("rankserve_scorer_batch_requests_sum", "rankserve_scorer_batch_requests_count"):
            values[name.rsplit("_", 1)[1]] = float(value)
    calls = values.get("count", 0.0)
    out["scorer_batches"] = {"wait_ms": args.gpu_batch_wait_ms, "calls": int(calls),
                             "mean_requests_per_call": round(values.get("sum", 0.0) / calls, 2) if calls else None}
    return out


def section_fetch(iterations: int) -> dict[str, Any]:
    """`loadtest.bench_fetch` (ours vs the raw redis-py floor vs Feast) in a subprocess; its JSON report."""
    cmd = [sys.executable, "-m", "loadtest.bench_fetch", "--iterations", str(iterations)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "command": " ".join(cmd[1:])}
    doc: dict[str, Any] = json.loads(proc.stdout)
    summary = {}
    for name, v in {**doc.get("results", {}), **doc.get("feast", {})}.items():
        if isinstance(v, dict) and "p50_ms" in v:
            summary[name] = {"p50_ms": v["p50_ms"], "p99_ms": v["p99_ms"]}
    return {"command": "python -m loadtest.bench_fetch --iterations " + str(iterations), "summary": summary,
            "report": doc}


def run(args: argparse.Namespace) -> int:
    gpu_info: Any = None
    if args.gpu:
        from loadtest import bench_gpu

        sections_arg = args.sections or ",".join(bench_gpu.GPU_DEFAULT_SECTIONS)
        bench_gpu.check_sections({s.strip().replace("-", "_") for s in sections_arg.split(",") if s.strip()})
        gpu_info = bench_gpu.preflight()  # before anything is built: refuses in one line without CUDA
    else:
        sections_arg = args.sections or ",".join(ALL_SECTIONS)
    # before numba or faiss load libgomp: its pools spin for milliseconds after each parallel region,
    # which on 2 cores takes CPU from the next method and counts in its CPU time (the service is
    # deployed with the same setting: TUNED_ENV)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from feature_store.embedded import EmbeddedValkey
    from feature_store.redis_store import create_store
    from feature_store.store import EmbeddedConfig, FeatureStoreConfig
    from loadtest.bench_e2e import section_concurrency, section_memory, section_throughput
    from loadtest.bench_strategies import gsu_input, indexed_events, section_strategies, section_sweeps
    from loadtest.serving import ServerProcess, ingest, prepare_workload
    from service.errors import BundleRejected
    from service.registry import ModelRegistry
    from service.retrieval import make_retriever
    from service.settings import Settings, available_cpus

    w = Workload(items=args.items, users=args.users, history=args.history, candidates=args.candidates, k=args.k,
                 iterations=args.iterations, warmup=args.warmup)
    threads = args.threads or available_cpus()
    sections = {s.strip().replace("-", "_") for s in sections_arg.split(",") if s.strip()}
    unknown = sections - set(ALL_SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; use {', '.join(ALL_SECTIONS)}")
    # these compare the bundle with float twins of it (PyTorch eager; the side-feature bundle), which an int8
    # scorer would turn into a comparison of quantization (python -m loadtest.bench_scoring measures that)
    float_only = sorted(sections & {"scoring", "side_features"})
    if args.quantize and float_only:
        raise SystemExit(f"--quantize does not go with the sections {float_only}: they compare the bundle with "
                         "float twins of it; leave them out (--sections in_process,transports,...)")
    plots = args.plots or (args.out.parent if args.out else Path("bench-plots"))
    server_env = ({} if args.untuned else dict(TUNED_ENV)) | dict(kv.split("=", 1) for kv in args.server_env)
    if gpu_info is not None:
        from loadtest.bench_gpu import GPU_SERVER_ENV

        server_env |= GPU_SERVER_ENV
    root = Path(tempfile.mkdtemp(prefix="rankserve-bench-"))
    report: dict[str, Any] = {"cpus": available_cpus(), "scorer_threads_in_process": threads,
                              "bench_omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                              "server_env": server_env, "loadavg_at_start": round(os.getloadavg()[0], 2)}
    if gpu_info is not None:
        report["gpu"] = gpu_info.describe()
    t0 = time.perf_counter()
    try:
        first = prepare_workload(root, w, args.data, quantize=args.quantize)
        if first.source != "generated":
            w.request_time = int(first.events.timestamp.max()) + 3600
        report["workload"] = asdict(w) | {"data": first.source, "scorer_quantization": args.quantize}
        reqs = candidate_sets(w, first.events, 64)
        report["setup_s"] = {"bundles": round(time.perf_counter() - t0, 1)}
        with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
            report["setup_s"]["ingest"] = round(ingest(valkey.url, first), 1)
            cfg = FeatureStoreConfig(url=valkey.url)
            gpu_settings: dict[str, Any] = {}
            if gpu_info is not None:
                from loadtest.bench_gpu import GPU_SETTINGS

                gpu_settings = dict(GPU_SETTINGS)
            settings = Settings(model_dir=first.model_dir, feature_store=cfg, scorer_threads=threads,
                                poll_interval_s=0, max_candidates=max(1000, w.candidates), **gpu_settings)
            registry = ModelRegistry(settings, lambda: make_retriever("exact", device=settings.retrieval_device
                                                                     if gpu_info is not None else "cpu"))
            try:
                model = registry.load_version()
            except BundleRejected as exc:
                if gpu_info is None:
                    raise
                from loadtest.bench_gpu import GpuUnavailable

                raise GpuUnavailable(
                    f"GPU benchmark stopped: the bundle does not load on the GPU: {exc.message}"
                ) from exc
            loop = asyncio.new_event_loop()
            fetch_store = create_store(cfg)

            def fetch(user: int, cands: list[int]) -> Any:
                return loop.run_until_complete(fetch_store.fetch(user, cands))

            if "retrieval" in sections:
                extra = None
                if gpu_info is not None:
                    from loadtest.bench_gpu import gpu_retrievers

                    extra = gpu_retrievers()
                report["retrieval"] = section_retrieval(model, fetch, reqs, w, extra)
            if "strategies" in sections:
                inputs = []
                for user, cands in reqs[:8]:
                    res = fetch(user, cands)
                    inputs.append(gsu_input(model, res.sequence.before(w.request_time), res.item_index,
                                            res.category_index, w.request_time))
                report["strategies"] = section_strategies(inputs, w.k, max(20, w.iterations // 4), 3, plots)
            if "scoring" in sections and gpu_info is not None:
                from loadtest.bench_gpu import section_scoring_gpu

                report["scoring"] = section_scoring_gpu(model, first.bundle_path, fetch, reqs, w, threads, root)
            elif "scoring" in sections:
                report["scoring"] = section_scoring(model, first.bundle_path, fetch, reqs, w, threads)
            if "sweeps" in sections:
                report["sweeps"] = section_sweeps(
                    model, indexed_events(first.events, first.schema), w.request_time, [1_000, 10_000, 100_000],
                    [100, 500, 1_000], w.history, w.candidates, max(10, w.iterations // 10), plots)
            loop.run_until_complete(fetch_store.aclose())
            loop.close()
            if "in_process" in sections:
                check = None
                if gpu_info is not None:
                    from loadtest.bench_gpu import check_inprocess

                    check = check_inprocess
                report["in_process"] = asyncio.run(section_inprocess(settings, reqs, w, check))
            bodies = [orjson.dumps({"user_id": u, "candidates": c, "top_n": w.top_n, "request_time": w.request_time})
                      for u, c in reqs]
            levels = [int(x) for x in args.levels.split(",") if x]
            e2e: dict[str, Any] = {}
            if {"transports", "throughput"} & sections:
                with ServerProcess(first.model_dir, valkey.url, env=server_env, workers=args.workers,
                                   log_path=root / "server.log") as server:
                    if gpu_info is not None:
                        from loadtest.bench_gpu import check_server

                        e2e["server_provider"] = check_server(server.base_url)
                    if "transports" in sections:
                        e2e["concurrency"] = section_concurrency(server, bodies, reqs, w.top_n, w.request_time,
                                                                 levels, args.level_requests)
                    if "throughput" in sections:
                        e2e["throughput"] = section_throughput(server, bodies, args.slo_ms, step_s=args.step_seconds)
                if gpu_info is not None and "transports" in sections and args.gpu_batch_wait_ms > 0:
                    e2e["concurrency_batched"] = section_concurrency_batched(
                        first.model_dir, valkey.url, server_env, args, bodies, reqs, w, levels, root)
            report["e2e"] = e2e
            if "memory" in sections:
                report["memory"] = section_memory(first.model_dir, valkey.url, bodies, server_env)
            if "side_features" in sections:
                from loadtest.bench_side import section_side_features

                report["side_features"] = section_side_features(
                    root / "side-features", w, first, valkey.url, reqs, server_env, rounds=args.side_rounds,
                    requests=args.side_requests, concurrency=args.side_concurrency,
                    transports=[t.strip() for t in args.side_transports.split(",") if t.strip()],
                    inprocess_requests=args.side_inprocess,
                    scorer_threads=int(server_env.get("RANKSERVE_SCORER_THREADS", threads)),
                    base_store_pid=valkey.pid, budget_s=args.side_budget_s)
            if "stream" in sections:
                from loadtest.bench_stream import section_stream

                report["stream"] = section_stream(
                    root, w, first, valkey.url, bodies, server_env, rounds=args.stream_rounds,
                    events=args.stream_events, rate=args.stream_rate, probes=args.stream_probes,
                    population=args.stream_population, cluster_ids=args.stream_cluster_ids,
                    throughput_only=args.stream_throughput_only, consumer_nice=args.stream_consumer_nice,
                    serve_requests=args.stream_serve_requests, control_cores=args.stream_control_cores,
                    producer_batch=args.stream_producer_batch)
        if "fetch" in sections:
            report["fetch"] = section_fetch(max(100, w.iterations))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2, sort_keys=True)
    table = markdown(report)
    if args.out:
        args.out.write_text(text)
    if args.out_md:
        args.out_md.write_text(table + "\n")
    sys.stdout.write(text + "\n\n" + table + "\n")
    return 0
