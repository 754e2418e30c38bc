"""ONNX Runtime vs PyTorch eager on the same scorer, across batch sizes, with ONNX Runtime's op profile.

    python -m loadtest.bench_scoring [--batches 8,20,100,500,1000] [--iterations 100] [--threads 1]

A bundle with the standard workload's model configuration and random weights (the scorer's cost
does not depend on the catalogue size: the large tables are gathered outside the graph, so a
20,000-item catalogue stands in for 1M), the export's own parity batch at each size, both
runtimes called alternately, medians of wall time. Then ONNX Runtime's per-op profile at the
standard batch (500): where the graph's time goes. Then a least-squares fit of each runtime's
median to t(B) = per-call cost + B x per-candidate cost: the speed-up at batch B is
(e_call + e_cand·B) / (o_call + o_cand·B), so the fit tells what bounds it (the per-call cost,
ONNX Runtime's edge, decides small batches; the per-candidate kernels decide large ones).
The same graph quantized to int8 (`rankserve export --quantize int8`) runs in the same
alternation: its time and its largest difference to the float graph's probabilities.
Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench import Workload, build_bundle, eager_scorer


def _session(path: Path, threads: int, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def op_profile(session: Any, feeds: dict[str, Any], runs: int) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per op type over `runs` calls (top 10)."""
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += float(e["dur"])
    total = sum(per_op.values()) or 1.0
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    return {op: round(100 * us / total, 1) for op, us in top}


def linear_fit(batches: list[int], ms: list[float]) -> dict[str, float]:
    """Least-squares t(B) = per_call_ms + per_candidate_us / 1000 * B."""
    slope, intercept = np.polyfit(np.asarray(batches, dtype=np.float64), np.asarray(ms, dtype=np.float64), 1)
    return {"per_call_ms": round(float(intercept), 3), "per_candidate_us": round(float(slope) * 1000, 3)}


def cost_model(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each runtime's fitted per-call and per-candidate cost, and the speed-up they imply in the limits."""
    batches = [r["batch"] for r in rows]
    eager = linear_fit(batches, [r["eager_ms"] for r in rows])
    onnx = linear_fit(batches, [r["onnx_ms"] for r in rows])
    return {
        "pytorch_eager": eager,
        "onnxruntime": onnx,
        # B -> 0: only the per-call costs count; B -> infinity: only the per-candidate kernels
        "speedup_small_batch_limit": round(eager["per_call_ms"] / max(onnx["per_call_ms"], 1e-9), 2),
        "speedup_large_batch_limit": round(eager["per_candidate_us"] / max(onnx["per_candidate_us"], 1e-9), 2),
    }


def run_bench(batches: list[int], iterations: int, threads: int) -> dict[str, Any]:
    import torch

    from export.parity import parity_batch
    from export.quantize import quantize_scorer
    from feature_store.schema import SCORER_INPUTS, FeatureSchema
    from models.model import ModelConfig, RankingModel

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="rankserve-bench-scoring-") as tmp:
        root = Path(tmp)
        bundle = build_bundle(root, Workload(items=20_000))
        manifest = json.loads((bundle / "manifest.json").read_text())
        schema = FeatureSchema.load(bundle / "schema")
        sizes = schema.vocab_sizes()
        shapes = RankingModel(ModelConfig.from_dict(manifest["model"]["config"]), schema.spec, sizes["user"],
                              sizes["item"], sizes["category"])  # only for the parity batch's id ranges
        eager = eager_scorer(bundle)
        session = _session(bundle / "scorer.onnx", threads)
        quantize_scorer(bundle / "scorer.onnx", root / "scorer.int8.onnx")
        int8 = _session(root / "scorer.int8.onnx", threads)
        rows = []
        for size in batches:
            batch = parity_batch(shapes, schema.spec, seed=1, batch_size=size)
            feeds = {n: batch[n].numpy() for n in SCORER_INPUTS}
            args = [batch[n] for n in SCORER_INPUTS]
            eager_ms: list[float] = []
            onnx_ms: list[float] = []
            int8_ms: list[float] = []
            with torch.inference_mode():
                float_probs = session.run(None, feeds)[0]
                diff = float(np.abs(eager(*args).numpy() - float_probs).max())
                int8_diff = float(np.abs(int8.run(None, feeds)[0] - float_probs).max())
                for _ in range(iterations):
                    t0 = time.perf_counter()
                    eager(*args)
                    eager_ms.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    session.run(None, feeds)
                    onnx_ms.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    int8.run(None, feeds)
                    int8_ms.append((time.perf_counter() - t0) * 1000)
            warm = max(1, iterations // 8)
            e, o = float(np.median(eager_ms[warm:])), float(np.median(onnx_ms[warm:]))
            q = float(np.median(int8_ms[warm:]))
            rows.append({"batch": size, "eager_ms": round(e, 3), "onnx_ms": round(o, 3),
                         "onnx_speedup": round(e / o, 2), "max_abs_diff": diff, "onnx_int8_ms": round(q, 3),
                         "int8_speedup_vs_onnx": round(o / q, 2), "int8_max_abs_diff_vs_onnx": int8_diff})
        standard = parity_batch(shapes, schema.spec, seed=1, batch_size=500)
        profiled = _session(bundle / "scorer.onnx", threads, profile_prefix=str(root / "ort-profile"))
        profile = op_profile(profiled, {n: standard[n].numpy() for n in SCORER_INPUTS}, runs=30)
    return {"threads": threads, "iterations": iterations, "batches": rows, "cost_model": cost_model(rows),
            "onnx_op_share_pct_batch_500": profile}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| batch | PyTorch eager ms | ONNX Runtime ms | ONNX speed-up | max abs diff | ONNX int8 ms | "
             "int8 speed-up | int8 max abs diff |", "|---|---|---|---|---|---|---|---|"]
    for r in report["batches"]:
        lines.append(
            f"| {r['batch']} | {r['eager_ms']} | {r['onnx_ms']} | {r['onnx_speedup']}x | {r['max_abs_diff']:.1e} "
            f"| {r['onnx_int8_ms']} | {r['int8_speedup_vs_onnx']}x | {r['int8_max_abs_diff_vs_onnx']:.1e} |"
        )
    cm = report["cost_model"]
    lines.append("\n| fit t(B) = per call + B x per candidate | per call ms | per candidate µs |\n|---|---|---|")
    for name in ("pytorch_eager", "onnxruntime"):
        lines.append(f"| {name} | {cm[name]['per_call_ms']} | {cm[name]['per_candidate_us']} |")
    lines.append(f"\nspeed-up limits: small batches {cm['speedup_small_batch_limit']}x, "
                 f"large batches {cm['speedup_large_batch_limit']}x")
    ops = ", ".join(f"{op} {share}%" for op, share in report["onnx_op_share_pct_batch_500"].items())
    lines.append(f"\nONNX Runtime kernel time at batch 500: {ops}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_scoring", description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,20,100,500,1000", help="comma-separated batch sizes (candidates)")
    p.add_argument("--iterations", type=int, default=100, help="calls per runtime and batch size")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of both runtimes")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    args = p.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",")]
    if len(batches) < 2 or min(batches) < 4:
        p.error("--batches needs two or more sizes of at least 4 (the parity batch's four edge-case rows)")
    report = run_bench(batches, args.iterations, args.threads)
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n\n" + markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
