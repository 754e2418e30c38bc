"""`rankserve evaluate`: offline metrics of a run and its baselines on the run's own test split.

Per declared task (the run's schema): AUC, GAUC (per-user AUC weighted by the user's sample
count), logloss; for a task with an ESMM parent, its conditional AUC (the task among the parent's
positives, e.g. buy among clicked samples: the CVR AUC); Weighted Recall@K over ranking queries
(one query = one user at one request time: that moment's positives and their negatives), ranked
by the bundle's default fusion (the tasks' declared weights and transforms), with each R_e@K; and
the information abundance of every embedding table. Baselines, on the same samples: popularity
(train-period event counts per task, calibrated to probabilities by a 1-D logistic fit on the
training samples) and DIN-short (the same model on the last 50 behaviours, no retrieval), when
the run trained one. Everything about the data comes from the run (its recorded feature spec);
`--data-root` only relocates the files. Writes eval.json, eval.md and spectra.png into the run
directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_store.fusion import Fusion
from feature_store.schema import SchemaSpec
from models.batching import Collator
from models.checkpoint import RunError, load_run
from models.data.readers import dataset_of_run
from models.data.samples import SampleSet
from models.metrics import auc, gauc, logloss, weighted_recall_at_k
from models.model import RankingModel
from models.runtime import tune_malloc
from models.train import SPLIT_TEST, SPLIT_TRAIN, predict, samples_for_run

log = logging.getLogger("rankserve.evaluate")

# The event weights λ_e of WR@K (ResFlow) for the default click/cart/buy tasks, documented in
# BENCHMARKS.md; other task sets weigh their tasks equally (`wr_weights`).
WR_WEIGHTS = {"click": 0.2, "cart": 0.3, "buy": 0.5}


def wr_weights(tasks: list[str]) -> dict[str, float]:
    """λ_e per task: the documented click/cart/buy weights when every task has one, else 1/T each."""
    if tasks and all(t in WR_WEIGHTS for t in tasks):
        return {t: WR_WEIGHTS[t] for t in tasks}
    return {t: 1.0 / len(tasks) for t in tasks}


def fused_scores(spec: SchemaSpec, probs: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """The default fusion of a bundle of this schema, s = Σ_t w_t·f_t(p_t), as the service ranks."""
    fusion = spec.default_fusion()
    return Fusion.from_declared(list(spec.task_names), fusion)(np.asarray(probs, np.float32))


def popularity_scores(samples: SampleSet) -> npt.NDArray[np.float64]:
    """log1p(train-period events per item and task) for every sample, [N, T]."""
    split = samples.time_split
    if split is None:
        raise ValueError("popularity needs the samples' time split")
    before = samples.ev_ts < split.valid_start
    matrix = samples.schema.spec.task_action_matrix()  # [A, T]
    n_items = samples.schema.items.size
    out = np.zeros((samples.item.shape[0], matrix.shape[1]), dtype=np.float64)
    for t in range(matrix.shape[1]):
        hit = before & matrix[samples.ev_action, t]
        counts = np.bincount(samples.ev_item[hit], minlength=n_items).astype(np.float64)
        counts[0] = 0.0  # the OOV row pools unrelated items
        out[:, t] = np.log1p(counts[samples.item])
    return out


def fit_logistic_1d(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], steps: int = 50) -> tuple[float, float]:
    """Newton's method for p = σ(a·x + b): calibrates a score into a probability."""
    a, b = 0.0, float(np.log((y.mean() + 1e-6) / (1 - y.mean() + 1e-6)))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(a * x + b)))
        w = p * (1 - p) + 1e-9
        g = np.array([np.sum((p - y) * x), np.sum(p - y)])
        h = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]) + 1e-6 * np.eye(2)
        da, db = np.linalg.solve(h, g)
        a, b = a - da, b - db
        if abs(da) + abs(db) < 1e-9:
            break
    return a, b


def popularity_probs(samples: SampleSet) -> npt.NDArray[np.float64]:
    scores = popularity_scores(samples)
    train = samples.split == SPLIT_TRAIN
    probs = np.empty_like(scores)
    for t in range(scores.shape[1]):
        a, b = fit_logistic_1d(scores[train, t], samples.labels[train, t].astype(np.float64))
        probs[:, t] = 1 / (1 + np.exp(-(a * scores[:, t] + b)))
    return probs


def pointwise_metrics(samples: SampleSet, idx: npt.NDArray[np.int64], probs: npt.NDArray[Any]) -> dict[str, Any]:
    """Per-task AUC, GAUC, logloss (and conditional AUC) on samples drawn as the model was trained.

    A task with a parent also gets `conditional`: its AUC among the parent's positives (the CVR
    AUC of buy under click), scored by the task's probability.
    """
    spec = samples.schema.spec
    tasks = list(spec.task_names)
    labels = samples.labels[idx]
    users = samples.raw_user[idx]  # OOV users all share dense index 0: group by raw id
    out: dict[str, Any] = {}
    for t, name in enumerate(tasks):
        out[name] = {
            "auc": auc(labels[:, t], probs[:, t]),
            "gauc": gauc(labels[:, t], probs[:, t], users),
            "logloss": logloss(labels[:, t], probs[:, t]),
            "positives": int(labels[:, t].sum()),
        }
    conditional: dict[str, Any] = {}
    for t, parent in enumerate(spec.task_parents()):
        if parent >= 0:
            under = labels[:, parent] > 0.5
            conditional[tasks[t]] = {
                "parent": tasks[parent],
                "auc": auc(labels[under, t], probs[under, t]),
                "samples": int(under.sum()),
            }
    if conditional:
        out["conditional"] = conditional
    return out


def ranking_metrics(samples: SampleSet, idx: npt.NDArray[np.int64], probs: npt.NDArray[Any], k: int) -> dict[str, Any]:
    """WR@K and each R_e@K over ranking queries (a user on a day: positives + many negatives)."""
    spec = samples.schema.spec
    tasks = list(spec.task_names)
    labels = samples.labels[idx]
    fused = fused_scores(spec, probs)
    queries = query_ids(samples, idx)
    weights = wr_weights(tasks)
    wr_labels = {e: labels[:, tasks.index(e)] for e in weights}
    out: dict[str, Any] = weighted_recall_at_k(wr_labels, fused, queries, k, weights)
    out["queries"] = int(np.unique(queries).shape[0])
    return out


def table_spectra(model: RankingModel) -> dict[str, npt.NDArray[np.float64]]:
    """Singular values of each embedding table, via the d×d Gram matrix (fast for tall tables)."""
    out = {}
    for name, table in model.embedding_tables().items():
        w = table.weight.detach().double().numpy()
        eig = np.clip(np.linalg.eigvalsh(w.T @ w), 0.0, None)
        out[name] = np.sqrt(eig)[::-1]
    return out


def information_abundances(spectra: dict[str, npt.NDArray[np.float64]]) -> dict[str, dict[str, float]]:
    return {
        name: {"ia": float(sv.sum() / sv.max()) if sv.max() > 0 else 0.0, "dim": int(sv.shape[0])}
        for name, sv in spectra.items()
    }


def plot_spectra(spectra: dict[str, dict[str, npt.NDArray[np.float64]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({t for s in spectra.values() for t in s})
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, table in zip(axes[0], names, strict=True):
        for model_name, s in spectra.items():
            if table in s:
                sv = s[table]
                ax.semilogy(np.arange(1, sv.shape[0] + 1), sv / sv.max(), marker=".", label=model_name)
        ax.set_title(table)
        ax.set_xlabel("index")
        ax.set_ylabel("σ / σ_max")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Singular spectra of the embedding tables (flat = information-rich, steep = collapsed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results: dict[str, Any], spec: SchemaSpec, k: int) -> str:
    tasks = list(spec.task_names)
    parents = spec.task_parents()
    conditional = [(tasks[t], tasks[p]) for t, p in enumerate(parents) if p >= 0]
    weights = wr_weights(tasks)
    head = ["model"]
    for t in tasks:
        head += [f"{t} AUC", f"{t} GAUC", f"{t} logloss"]
    head += [f"{t}\\|{p} AUC" for t, p in conditional]  # the bar escaped: a markdown table cell
    head += [*[f"R_{e}@{k}" for e in weights], f"WR@{k}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model_name, r in results.items():
        row = [model_name]
        for t in tasks:
            row += [f"{r[t]['auc']:.4f}", f"{r[t]['gauc']:.4f}", f"{r[t]['logloss']:.4f}"]
        row += [f"{r['conditional'][t]['auc']:.4f}" for t, _ in conditional]
        row += [f"{r['ranking'][f'R_{e}@{k}']:.4f}" for e in weights]
        row.append(f"{r['ranking'][f'WR@{k}']:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def query_ids(samples: SampleSet, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """One id per ranking query: a user (raw id; unseen users share dense index 0) on one day."""
    pairs = np.stack([samples.raw_user[idx], samples.ts[idx] // 86_400], axis=1)
    return np.unique(pairs, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def test_queries(samples: SampleSet, max_queries: int | None, seed: int = 0) -> npt.NDArray[np.int64]:
    """Test-split sample indices; with `max_queries`, whole ranking queries (user x day) sampled."""
    test_idx = np.flatnonzero(samples.split == SPLIT_TEST).astype(np.int64)
    if max_queries is None:
        return test_idx
    keys = query_ids(samples, test_idx)
    uniq = np.unique(keys)
    if uniq.shape[0] <= max_queries:
        return test_idx
    keep = np.random.default_rng(seed).choice(uniq, max_queries, replace=False)
    return test_idx[np.isin(keys, keep)]


def evaluate_run(
    run_dir: Path, data_root: Path | None, eval_negatives: int, k: int, max_queries: int | None = None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    tune_malloc()
    model, schema, config = load_run(run_dir)
    dataset = dataset_of_run(config, data_root)
    # pointwise metrics on the test split drawn as in training (same negative ratio, so logloss
    # measures calibration on the distribution the models learned); WR@K on ranking queries with
    # `eval_negatives` popularity negatives per positive (a spec with impressions: its impressions)
    impressions = dataset.spec.impression_action is not None
    pointwise = samples_for_run(config, dataset)
    # impressions are the negatives of both sets: the negative count does not apply
    ranking = pointwise if impressions else samples_for_run(config, dataset, negatives_per_positive=eval_negatives)
    if pointwise.schema.hash != schema.hash or ranking.schema.hash != schema.hash:
        diff = schema.spec.differences(pointwise.schema.spec) or ["vocabularies"]
        raise RunError(
            f"{run_dir}: the samples rebuilt from the run's data have another schema ({', '.join(diff)}): "
            "the data files changed since training"
        )
    spec = schema.spec
    tasks = list(spec.task_names)
    point_idx = test_queries(pointwise, max_queries)
    rank_idx = test_queries(ranking, max_queries)
    # serving searches the whole history: so does the evaluator
    point_collator = Collator(pointwise, spec, spec.max_sequence_length)
    rank_collator = Collator(ranking, spec, spec.max_sequence_length)
    results: dict[str, Any] = {}
    spectra: dict[str, dict[str, npt.NDArray[np.float64]]] = {}
    models = {"twin (ours)": model}
    din_dir = run_dir / "din_short"
    if (din_dir / "checkpoint.pt").exists():
        models["din-short"] = load_run(din_dir)[0]
    for name, m in models.items():
        results[name] = pointwise_metrics(pointwise, point_idx, predict(m, point_collator, point_idx))
        results[name]["ranking"] = ranking_metrics(ranking, rank_idx, predict(m, rank_collator, rank_idx), k)
        spectra[name] = table_spectra(m)
        results[name]["information_abundance"] = information_abundances(spectra[name])
    results["popularity"] = pointwise_metrics(pointwise, point_idx, popularity_probs(pointwise)[point_idx])
    results["popularity"]["ranking"] = ranking_metrics(ranking, rank_idx, popularity_probs(ranking)[rank_idx], k)
    report = {
        "run": str(run_dir),
        "data": config.get("data"),
        "feature_spec": dataset.spec.name,
        "test_samples": {"pointwise": int(point_idx.shape[0]), "ranking": int(rank_idx.shape[0])},
        "negatives_per_positive": config["train"]["negatives_per_positive"],
        "max_queries": max_queries,
        "eval_negatives_per_positive": eval_negatives,
        "k": k,
        "fusion": spec.default_fusion(),
        "wr_weights": wr_weights(tasks),
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    table_names = list(spectra[next(iter(spectra))])
    ia_lines = ["| model | " + " | ".join(table_names) + " |", "|---|" + "---|" * len(table_names)]
    for name, s in spectra.items():
        ia = information_abundances(s)
        ia_lines.append(f"| {name} | " + " | ".join(f"{v['ia']:.2f} / {v['dim']}" for v in ia.values()) + " |")
    if impressions:
        point_negatives = rank_negatives = "impression negatives"
    else:
        point_negatives = f"{config['train']['negatives_per_positive']} popularity negatives per positive"
        rank_negatives = f"{eval_negatives} popularity negatives per positive"
    md = (
        f"Test split of `{config.get('data', dataset.spec.name)}`. AUC, GAUC, logloss: {point_idx.shape[0]} "
        f"samples drawn as in training ({point_negatives}). WR@{k}: {rank_idx.shape[0]} samples in ranking "
        f"queries (a user on a day: the day's positives and {rank_negatives}).\n\n"
        + markdown_table(results, spec, k)
        + "\n\nInformation abundance (Σσ/σ_max / width) of the embedding tables:\n\n"
        + "\n".join(ia_lines)
        + "\n"
    )
    (run_dir / "eval.md").write_text(md)
    plot_spectra(spectra, run_dir / "spectra.png")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="run directory written by `rankserve train`")
    p.add_argument("--data-root", type=Path, default=None,
                   help="where the run's data files are now, if they moved (default: where training read them)")
    p.add_argument("--eval-negatives", type=int, default=19,
                   help="popularity negatives per test positive (specs without an impression action)")
    p.add_argument("--k", type=int, default=10, help="K of Weighted Recall@K")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate a seeded subset of test queries")


def run(args: argparse.Namespace) -> int:
    report = evaluate_run(args.run, args.data_root, args.eval_negatives, args.k, args.max_queries)
    log.info("evaluation written", extra={"run": str(args.run), "seconds": report["seconds"]})
    import sys

    sys.stdout.write((args.run / "eval.md").read_text())
    return 0
