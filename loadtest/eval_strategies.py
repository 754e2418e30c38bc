"""Offline quality of each retrieval strategy: the served pipeline on held-out samples of a trained run.

    python -m loadtest.eval_strategies --run runs/tmall [--strategies exact,sim_hard,eta] \\
        [--max-queries 2000] [--out eval_strategies.json]

The offline evaluator (`rankserve evaluate`) retrieves with the PyTorch GSU, i.e. always exactly.
Here each test ranking query (a user at one request time, with the candidates of the run's test
split) goes through the *serving* path instead: `service.assemble.scorer_inputs` with the
strategy's retriever over the run's precomputed tables, then the run's scorer (PyTorch eager,
the same weights the exported ONNX has). Reported per strategy: AUC per task, the largest
difference to the exact strategy's probabilities, and the mean retrieval overlap with exact.
The exact strategy also reproduces the offline evaluator's own probabilities (checked: `parity`).

`--scorers torch,onnx,onnx-int8` also scores every strategy's inputs with the run's scorer exported
to ONNX (float) and quantized to int8 (`export.quantize`), run by ONNX Runtime as the service runs
it: the AUC a quantized bundle gives up, on the same queries and retrievals.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("loadtest.eval_strategies")

DEFAULT_STRATEGIES = "exact,sim_hard,sim_hard:fallback=pad,eta:bits=64,shortlist=256"
SCORERS = ("torch", "onnx", "onnx-int8")


def _split_strategies(text: str) -> list[str]:
    """Split on commas that start a new strategy (options inside a spec also use commas)."""
    from service.retrieval import available_retrievers

    names = set(available_retrievers())
    out: list[str] = []
    for part in text.split(","):
        if part.split(":", 1)[0] in names or not out:
            out.append(part)
        else:
            out[-1] += "," + part
    return out


def _scorer_functions(model: Any, spec: Any, names: list[str], workdir: Path) -> dict[str, Any]:
    """name -> f(inputs: list of numpy arrays in the scorer's input order) -> probabilities [B, T]."""
    import torch

    from export.exporter import export_onnx
    from export.parity import onnx_session, parity_batch
    from export.quantize import quantize_scorer

    def eager(inputs: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
        with torch.no_grad():
            return model.scorer(*(torch.from_numpy(x) for x in inputs)).numpy()

    functions: dict[str, Any] = {"torch": eager}
    if {"onnx", "onnx-int8"} & set(names):
        float_path, int8_path = workdir / "scorer.onnx", workdir / "scorer.int8.onnx"
        export_onnx(model.scorer, parity_batch(model, spec, seed=0), float_path)
        paths = {"onnx": float_path}
        if "onnx-int8" in names:
            quantize_scorer(float_path, int8_path)
            paths["onnx-int8"] = int8_path
        input_names = list(model.scorer.input_names)
        for name, path in paths.items():
            session = onnx_session(path)
            functions[name] = (lambda s: lambda inputs: s.run(None, dict(zip(input_names, inputs, strict=True)))[0])(
                session)
    return {name: functions[name] for name in names}


def evaluate_strategies(run_dir: Path, strategies: list[str], max_queries: int | None, seed: int = 0,
                        data_root: Path | None = None, cluster_min_events: int | None = None,
                        scorers: list[str] | None = None) -> dict[str, Any]:
    import tempfile

    from feature_store.codecs import Sequence
    from feature_store.schema import SCORER_INPUTS
    from loadtest.bench_strategies import gsu_input, gsu_search
    from models.batching import Collator
    from models.checkpoint import load_run
    from models.data.readers import dataset_of_run
    from models.evaluate import test_queries
    from models.metrics import auc
    from models.train import predict, samples_for_run
    from service.assemble import RetrievalSettings, Tables, scorer_inputs
    from service.retrieval import make_retriever

    t0 = time.perf_counter()
    model, schema, config = load_run(run_dir)
    events = dataset_of_run(config, data_root)
    samples = samples_for_run(config, events)
    spec = schema.spec
    idx = test_queries(samples, max_queries, seed)
    tables = Tables.from_dict({k: v.numpy() for k, v in model.precomputed_tables().items()})
    cfg = model.cfg
    settings = RetrievalSettings(k=cfg.retrieval_k, head_dim=cfg.attn_dim // cfg.n_heads,
                                 short_length=cfg.short_length, use_retrieval=cfg.use_retrieval,
                                 time_gap_buckets=spec.time_gap_buckets)
    served = SimpleNamespace(tables=tables, retrieval=settings)  # what gsu_input reads of a loaded bundle
    collator = Collator(samples, spec, spec.max_sequence_length)
    side_fields = [f.astype(dtype) for f, dtype in ((collator.side_ids, np.int64), (collator.side_values, np.float32))
                   if f is not None]  # a run with side features: the scorer's last inputs, in this order
    start, end = collator.history_window(idx)
    # ranking queries: samples of one user at one request time share the history
    key = samples.raw_user[idx] * (1 << 32) + samples.ts[idx]  # raw ids: unseen users share dense index 0
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0, True])
    groups = [order[a:b] for a, b in itertools.pairwise(bounds.tolist())]
    offline = predict(model, collator, idx)  # the offline evaluator's probabilities (exact PyTorch GSU)
    retrievers = {name: make_retriever(name) for name in strategies}
    # twin_v2 searches behaviour clusters stored at ingest: cluster each query's history the same way
    # (feature_store.clusters, with the run's key tables), as an ingest just before the request would
    clusterer = None
    if any(name.split(":", 1)[0] == "twin_v2" for name in strategies):
        from feature_store.clusters import ClusterParams, UserClusterer

        params = ClusterParams() if cluster_min_events is None else ClusterParams(min_events=cluster_min_events)
        clusterer = UserClusterer.from_tables(tables, params)
    scorers = scorers or ["torch"]
    with tempfile.TemporaryDirectory() as tmp:  # the sessions hold their graphs once made
        score_with = _scorer_functions(model, spec, scorers, Path(tmp))
    # one entry per strategy and scorer: the strategy's name alone for the PyTorch scorer
    entries = {(name, sc): name if sc == "torch" else f"{name}+{sc}" for name in strategies for sc in scorers}
    probs = {entry: np.zeros((idx.shape[0], len(spec.tasks)), dtype=np.float32) for entry in entries.values()}
    overlap: dict[str, list[float]] = {name: [] for name in strategies}
    seconds = dict.fromkeys(strategies, 0.0)
    lengths = []
    log.info("%d test samples in %d (user, request time) groups; offline probabilities done", idx.shape[0],
             len(groups))
    for n_done, g in enumerate(groups):
        if n_done and n_done % 500 == 0:
            log.info("%d / %d groups", n_done, len(groups))
        i0 = g[0]
        s, e = int(start[i0]), int(end[i0])
        hist = Sequence(item=samples.ev_item[s:e], category=samples.ev_category[s:e],
                        action=samples.ev_action[s:e], timestamp=samples.ev_ts[s:e])
        if clusterer is not None:
            from feature_store.codecs import SequenceClusters

            found = clusterer.cluster(hist.item, hist.category, hist.action, hist.timestamp)
            if found is not None:
                hist = hist.with_clusters(SequenceClusters(found[0], found[1], clusterer.fingerprint))
        lengths.append(e - s)
        ts = int(samples.ts[idx[i0]])
        items, cats = samples.item[idx[g]], samples.category[idx[g]]
        retrieved: dict[str, npt.NDArray[Any]] = {}
        # the GSU inputs as the service builds them, for the overlap of what each strategy retrieves
        gsu = gsu_input(served, hist, *tables.clamp_rows(items, cats), ts) if e - s > settings.k else None
        for name, r in retrievers.items():
            t1 = time.perf_counter()
            inputs = scorer_inputs(tables, settings, r, hist, int(samples.user[idx[i0]]), items, cats, ts, spec=spec)
            seconds[name] += time.perf_counter() - t1
            # each sample's own side features, as offline: the strategies differ in the GSU only
            side = [np.ascontiguousarray(field[idx[g]]) for field in side_fields]
            arrays = [np.ascontiguousarray(inputs[n]) for n in SCORER_INPUTS] + side
            for sc in scorers:
                probs[entries[name, sc]][g] = score_with[sc](arrays)
            if gsu is not None:
                retrieved[name] = gsu.keys[gsu_search(r, gsu, settings.k)[1]].reshape(len(g), -1)
        # overlap with exact: share of identical retrieved key rows (same behaviours, as far as keys tell)
        if "exact" in retrieved:
            for name, ret in retrieved.items():
                overlap[name].append(_row_overlap(retrieved["exact"], ret, settings.k))
    labels = samples.labels[idx]
    tasks = list(spec.task_names)
    report: dict[str, Any] = {
        "run": str(run_dir), "data": config["data"], "test_samples": int(idx.shape[0]), "queries": len(groups),
        "history_length": {"median": float(np.median(lengths)), "max": int(np.max(lengths)),
                           "share_longer_than_k": round(float(np.mean(np.asarray(lengths) > settings.k)), 3)},
        "offline_auc": {t: round(auc(labels[:, j], offline[:, j]), 4) for j, t in enumerate(tasks)},
        "strategies": {},
    }
    for (name, sc), key in entries.items():
        p = probs[key]
        entry: dict[str, Any] = {t: round(auc(labels[:, j], p[:, j]), 4) for j, t in enumerate(tasks)}
        entry["mean_auc"] = round(float(np.mean([entry[t] for t in tasks])), 4)
        if ("exact", sc) in entries:  # the same scorer's exact entry: what the retrieval alone changes
            entry["max_abs_diff_vs_exact"] = float(np.abs(p - probs[entries["exact", sc]]).max())
        if sc != "torch" and "torch" in scorers:  # what the runtime (and quantization) changes, unrounded
            same = probs[entries[name, "torch"]]
            entry["auc_change_vs_torch"] = {t: float(auc(labels[:, j], p[:, j]) - auc(labels[:, j], same[:, j]))
                                            for j, t in enumerate(tasks)}
            entry["max_abs_diff_vs_torch"] = float(np.abs(p - same).max())
        entry["retrieval_overlap_vs_exact"] = round(float(np.mean(overlap[name])), 4) if overlap[name] else None
        entry["assemble_ms_per_query"] = round(1000 * seconds[name] / len(groups), 3)
        report["strategies"][key] = entry
    if ("exact", "torch") in entries:  # the offline evaluator's probabilities are the PyTorch scorer's
        report["parity_exact_vs_offline_max_abs_diff"] = float(np.abs(probs[entries["exact", "torch"]] - offline).max())
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _row_overlap(a: npt.NDArray[Any], b: npt.NDArray[Any], k: int) -> float:
    """Mean share of b's retrieved key rows that are among a's, per query (keys [B, k*A] flattened)."""
    n, width = a.shape
    dim = width // k
    shares = []
    for q in range(n):
        ra = {row.tobytes() for row in a[q].reshape(k, dim)}
        rb = [row.tobytes() for row in b[q].reshape(k, dim)]
        shares.append(sum(r in ra for r in rb) / k)
    return float(np.mean(shares))


def markdown(report: dict[str, Any]) -> str:
    tasks = list(report["offline_auc"])
    def number(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [f"| strategy | {' | '.join(f'{t} AUC' for t in tasks)} | mean AUC | max abs Δp vs exact | "
             "largest AUC change vs PyTorch | retrieval overlap vs exact | assemble ms / query |",
             "|---|" + "---|" * (len(tasks) + 5)]
    for name, e in report["strategies"].items():
        changes = e.get("auc_change_vs_torch")
        largest = max(changes.values(), key=abs) if changes else None
        lines.append(f"| {name} | " + " | ".join(f"{e[t]:.4f}" for t in tasks)
                     + f" | {e['mean_auc']:.4f} | {number(e.get('max_abs_diff_vs_exact'), '.2g')} | "
                       f"{number(largest, '+.2g')} | {e['retrieval_overlap_vs_exact']} | "
                       f"{e['assemble_ms_per_query']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.eval_strategies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory (rankserve train --out)")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                        help=f"comma-separated make_retriever specs (default {DEFAULT_STRATEGIES})")
    parser.add_argument("--max-queries", type=int, default=None, help="sample this many test ranking queries")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--cluster-min-events", type=int, default=None,
                        help="twin_v2: cluster histories from this length on (default: ClusterParams' 256; "
                             "lower it for short-history data such as Tmall, with exact_below=0)")
    parser.add_argument("--scorers", default="torch",
                        help=f"comma-separated scorers among {','.join(SCORERS)} (default torch)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    scorers = [x for x in args.scorers.split(",") if x]
    unknown = sorted(set(scorers) - set(SCORERS))
    if unknown or not scorers:
        parser.error(f"--scorers: unknown {unknown}; choose among {', '.join(SCORERS)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    report = evaluate_strategies(args.run, _split_strategies(args.strategies), args.max_queries,
                                 data_root=args.data_root, cluster_min_events=args.cluster_min_events,
                                 scorers=scorers)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text + "\n\n" + markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
