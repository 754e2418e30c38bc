"""`rankserve train`: seeded, reproducible training with early stopping on validation.

The data comes from a feature spec: `--spec SPEC.yaml` (a team's own events, actions, tasks and
side features; docs/SCHEMA.md), or `--data`/`--action-map` for the built-in presets, which are
specs too. A run directory holds everything later steps need, so `evaluate` and `export` take
no data flags:

    RUN/config.json        feature spec (and the directory its paths resolve from), split,
                           sampling and model config, seed, the fitted schema spec
    RUN/spec.yaml          the feature spec, as YAML (export copies it into the bundle)
    RUN/schema/            the FeatureSchema (spec + side features + vocabularies) the model was trained on
    RUN/checkpoint.pt      best state_dict (by validation mean AUC)
    RUN/metrics.json       per-epoch losses and validation metrics, timings
    RUN/din_short/         the DIN-short baseline (same data and split), unless --no-baselines
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm import tqdm

from feature_store.spec import FeatureSpec
from models.batching import Collator
from models.checkpoint import save_run
from models.data.readers import add_dataset_arguments, load_spec_dataset, spec_from_args
from models.data.samples import SampleSet, TimeSplit, build_samples
from models.metrics import auc
from models.model import ModelConfig, RankingModel
from models.runtime import tune_malloc

log = logging.getLogger("rankserve.train")

SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2
PREDICT_ELEMENTS = 256 * 1000  # batch rows x history width per prediction batch


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 0  # stop at the first epoch that does not improve validation
    seed: int = 0
    negatives_per_positive: int = 4
    max_users: int | None = None
    max_train_samples: int | None = None  # a seeded random subset per epoch budget (huge synthetic sets)
    max_valid_samples: int | None = 200_000
    threads: int = 2


def set_seed(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizers(model: RankingModel, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam for dense weights; SparseAdam for the big tables when they produce sparse gradients."""
    if not model.cfg.sparse_embeddings:
        return [torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)]
    table_params = [t.weight for t in model.embedding_tables().values()]
    ids = {id(p) for p in table_params}
    dense = [p for p in model.parameters() if id(p) not in ids]
    return [torch.optim.SparseAdam(table_params, lr=cfg.lr), torch.optim.Adam(dense, lr=cfg.lr)]


@torch.no_grad()
def predict(model: RankingModel, collator: Collator, idx: npt.NDArray[np.int64], batch_size: int = 512) -> np.ndarray:
    """Task probabilities [N, T] for sample indices `idx` (eval mode).

    Batches stay small enough that their tensors stay under the 32 MiB heap threshold
    (see models.runtime.tune_malloc): larger ones are slower, not faster.
    """
    model.eval()
    start, end = collator.history_window(idx)
    width = max(int(np.minimum(end - start, collator.max_history).max(initial=1)), 1)
    batch_size = max(8, min(batch_size, PREDICT_ELEMENTS // width))  # lifelong histories: fewer rows
    out = [model(batch).numpy() for _, batch in collator.batches(idx, batch_size)]
    n_tasks = model.scorer.n_tasks
    return np.concatenate(out) if out else np.zeros((0, n_tasks), dtype=np.float32)


def validation_auc(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    return [auc(labels[:, t], probs[:, t]) for t in range(labels.shape[1])]


def fit(
    samples: SampleSet, model_cfg: ModelConfig, train_cfg: TrainConfig, progress: bool = True
) -> tuple[RankingModel, dict[str, Any]]:
    """Train on split 0 with early stopping on split 1; returns the best model and its history."""
    set_seed(train_cfg.seed)
    torch.set_num_threads(train_cfg.threads)
    tune_malloc()
    schema = samples.schema
    spec = schema.spec
    sizes = schema.vocab_sizes()
    model = RankingModel(model_cfg, spec, sizes["user"], sizes["item"], sizes["category"])
    optimizers = make_optimizers(model, train_cfg)
    collator = Collator(samples, spec, model_cfg.train_history)
    valid_collator = Collator(samples, spec, spec.max_sequence_length)  # validate as the service serves
    train_idx = np.flatnonzero(samples.split == SPLIT_TRAIN).astype(np.int64)
    valid_idx = np.flatnonzero(samples.split == SPLIT_VALID).astype(np.int64)
    if train_idx.size == 0 or valid_idx.size == 0:
        raise ValueError(f"need training and validation samples, got {train_idx.size} and {valid_idx.size}")
    rng = np.random.default_rng(train_cfg.seed)
    if train_cfg.max_train_samples and train_idx.size > train_cfg.max_train_samples:
        train_idx = np.sort(rng.choice(train_idx, train_cfg.max_train_samples, replace=False))
    if train_cfg.max_valid_samples and valid_idx.size > train_cfg.max_valid_samples:
        valid_idx = np.sort(rng.choice(valid_idx, train_cfg.max_valid_samples, replace=False))
    bce = nn.BCELoss()
    history: list[dict[str, Any]] = []
    best_score, best_state, bad_epochs = -1.0, None, 0
    started = time.perf_counter()
    for epoch in range(train_cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        losses = []
        batches = collator.batches(train_idx, train_cfg.batch_size, shuffle_seed=train_cfg.seed + epoch)
        n_batches = -(-train_idx.size // train_cfg.batch_size)
        for chunk, batch in tqdm(batches, total=n_batches, desc=f"epoch {epoch + 1}", disable=not progress):
            labels = torch.from_numpy(samples.labels[chunk])
            probs = model(batch).clamp(1e-7, 1 - 1e-7)
            loss = bce(probs, labels)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            losses.append(float(loss.detach()))
        train_seconds = time.perf_counter() - t0
        val_probs = predict(model, valid_collator, valid_idx)
        val_auc = validation_auc(samples.labels[valid_idx], val_probs)
        score = float(np.nanmean(val_auc))
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "valid_auc": dict(zip(spec.task_names, val_auc, strict=True)),
            "valid_mean_auc": score,
            "seconds": round(time.perf_counter() - t0, 2),
            "train_seconds": round(train_seconds, 2),
        }
        history.append(record)
        log.info("epoch done", extra=record)
        if score > best_score:
            best_score, bad_epochs = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs > train_cfg.patience:
                log.info("early stop", extra={"epoch": epoch + 1, "best_valid_mean_auc": best_score})
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"epochs": history, "best_valid_mean_auc": best_score, "seconds": time.perf_counter() - started}


def samples_for_run(config: dict[str, Any], dataset: Any, negatives_per_positive: int | None = None) -> SampleSet:
    """Rebuild the run's samples (deterministic), optionally with another negative count.

    `dataset` is the run's data as `models.data.readers.dataset_of_run(config)` loads it: the
    recorded feature spec, `max_users` applied at load time. The side features are fitted again
    on the same rows, so the schema (and its hash) is the run's.
    """
    return build_samples(
        dataset,
        split=TimeSplit(**config["split"]),
        negatives_per_positive=negatives_per_positive or config["train"]["negatives_per_positive"],
        seed=config["train"]["seed"],
    )


def without_side_features(spec: FeatureSpec) -> FeatureSpec:
    """The same spec with no user, item or context features: the model to compare against."""
    return spec.model_copy(update={"user_features": None, "item_features": None, "context_features": None})


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset_arguments(p)  # --spec, or --data / --action-map, and --data-root
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--heads", choices=["mmoe", "ple", "resflow"], default="resflow", help="multi-task head")
    p.add_argument("--no-esmm", action="store_true", help="independent task probabilities instead of ESMM chaining")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="passes over the training samples at most")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="samples per optimizer step")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="learning rate (Adam)")
    p.add_argument("--patience", type=int, default=TrainConfig.patience,
                   help="epochs without validation improvement before stopping early (0: never stop early)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="seed of sampling, initialization and shuffling")
    p.add_argument("--negatives", type=int, default=TrainConfig.negatives_per_positive, help="negatives per positive")
    p.add_argument("--max-users", type=int, default=None, help="train on a deterministic subset of users")
    p.add_argument("--max-train-samples", type=int, default=None, help="seeded subset of the training samples")
    p.add_argument("--max-valid-samples", type=int, default=TrainConfig.max_valid_samples,
                   help="seeded subset of the validation samples (validation searches whole histories)")
    p.add_argument("--retrieval-k", type=int, default=ModelConfig.retrieval_k,
                   help="behaviours retrieved per candidate from the lifelong sequence (GSU top-k)")
    p.add_argument(
        "--train-history", type=int, default=ModelConfig.train_history, help="behaviours searched in training"
    )
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch intra-op threads")
    p.add_argument("--short-length", type=int, default=None,
                   help="most recent behaviours attended to directly (the short sequence); "
                   "default: the spec's sequence.short_length")
    p.add_argument("--attn-dim", type=int, default=ModelConfig.attn_dim,
                   help="dimension of the attention (retrieval) embeddings")
    p.add_argument("--repr-dim", type=int, default=ModelConfig.repr_dim,
                   help="dimension of the representation embeddings")
    p.add_argument("--side-dim", type=int, default=ModelConfig.side_dim,
                   help="embedding width of each categorical side feature")
    p.add_argument("--no-side-features", action="store_true",
                   help="train without the spec's user, item and context features (to measure what they add)")
    p.add_argument("--no-side-interactions", action="store_true",
                   help="side features only concatenated into the towers, without their pairwise dot products")
    p.add_argument("--sparse", action="store_true", help="sparse embedding gradients (large catalogues)")
    p.add_argument("--no-baselines", action="store_true", help="skip training the DIN-short baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in CI logs)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    spec, base = spec_from_args(args)
    if args.no_side_features:
        spec = without_side_features(spec)
    # subset users while loading, so a 100M-event synthetic set is never read whole
    dataset = load_spec_dataset(spec, base, max_users=args.max_users)
    train_cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        negatives_per_positive=args.negatives,
        max_users=args.max_users,
        max_train_samples=args.max_train_samples,
        max_valid_samples=args.max_valid_samples,
        threads=args.threads,
    )
    samples = build_samples(dataset, negatives_per_positive=args.negatives, seed=args.seed)
    split = samples.time_split
    if split is None:
        raise RuntimeError("build_samples returned samples without their time split")
    schema_spec = samples.schema.spec
    log.info(
        "samples built",
        extra={
            "spec": spec.name,
            "events": len(dataset.events),
            "samples": int(samples.labels.shape[0]),
            "per_split": np.bincount(samples.split, minlength=3).tolist(),
            "side_ids": schema_spec.side.n_ids,
            "side_values": schema_spec.side.n_values,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    model_cfg = ModelConfig(
        heads=args.heads,
        esmm=not args.no_esmm,
        retrieval_k=args.retrieval_k,
        train_history=args.train_history,
        short_length=args.short_length if args.short_length is not None else spec.sequence.short_length,
        attn_dim=args.attn_dim,
        repr_dim=args.repr_dim,
        side_dim=args.side_dim,
        side_interactions=not args.no_side_interactions,
        sparse_embeddings=args.sparse,
    )
    variants = [("", model_cfg)]
    if not args.no_baselines:
        din = dataclasses.replace(model_cfg, use_retrieval=False, short_length=50)
        variants.append(("din_short", din))
    data_label = spec.name if getattr(args, "spec", None) else str(getattr(args, "data", None) or spec.name)
    for sub, cfg in variants:
        run_dir = args.out / sub if sub else args.out
        model, metrics = fit(samples, cfg, train_cfg, progress=not args.no_progress)
        config = {
            "data": data_label,
            # evaluate, export and ingest read the data as training did, from the recorded spec
            "feature_spec": spec.model_dump(mode="json"),
            "spec_base": str(base),
            "side_features": not args.no_side_features,
            "split": {"valid_start": split.valid_start, "test_start": split.test_start},
            "schema_spec": schema_spec.to_dict(),
            "model": cfg.to_dict(),
            "train": train_cfg.__dict__,
            "variant": sub or "twin",
        }
        save_run(run_dir, model, samples.schema, config, metrics, spec)
        log.info("run saved", extra={"run": str(run_dir), "best_valid_mean_auc": metrics["best_valid_mean_auc"]})
    log.info("training finished", extra={"seconds": round(time.perf_counter() - t0, 1)})
    return 0
