"""Parity between PyTorch, ONNX Runtime and TorchScript scorers on the same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from feature_store.schema import SchemaSpec
from models.model import Batch, RankingModel

PARITY_TOLERANCE = 1e-5


def parity_batch(model: RankingModel, spec: SchemaSpec, seed: int, batch_size: int = 48) -> dict[str, torch.Tensor]:
    """Scorer inputs (`spec.scorer_inputs`) of `random_batch`, gathered and retrieved by the model (eval mode)."""
    batch = random_batch(model, spec, seed, batch_size)
    model.eval()
    with torch.no_grad():
        return {k: v.contiguous() for k, v in model.scorer_inputs(batch).items()}


def random_batch(model: RankingModel, spec: SchemaSpec, seed: int, batch_size: int = 48) -> Batch:
    """A random training-side batch that covers the edge cases.

    Rows have empty, shorter-than-k, and long histories, and ids that are out of vocabulary (0).
    Actions are drawn among the schema's; side ids (when the schema has categorical side
    features) within each feature's code range 0..size-1 at its offset, code 0 (missing) included;
    side values (numeric ones) around the normalized range, with some far out.
    """
    g = torch.Generator().manual_seed(seed)
    n_users = model.repr_user.num_embeddings
    n_items = model.attn_item.num_embeddings
    n_cats = model.attn_category.num_embeddings
    length = max(model.cfg.retrieval_k * 2, 8)
    lengths = torch.randint(0, length + 1, (batch_size,), generator=g)
    lengths[0], lengths[1], lengths[2] = 0, 1, length  # empty, single, full
    lengths[3] = max(model.cfg.retrieval_k - 1, 1)  # just under k
    pos = torch.arange(length).unsqueeze(0)
    mask = (pos >= (length - lengths).unsqueeze(1)).float()

    def ids(high: int, shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randint(0, high, shape, generator=g)
        return torch.where(torch.rand(shape, generator=g) < 0.1, torch.zeros_like(x), x)  # 10% unknown

    batch = Batch(
        user=ids(n_users, (batch_size,)),
        item=ids(n_items, (batch_size,)),
        category=ids(n_cats, (batch_size,)),
        cand_cross=torch.rand((batch_size, spec.n_cross_features), generator=g)
        * (torch.rand((batch_size, 1), generator=g) < 0.5),  # half the candidates are revisits
        hist_item=ids(n_items, (batch_size, length)) * mask.long(),
        hist_category=ids(n_cats, (batch_size, length)) * mask.long(),
        hist_action=torch.randint(0, spec.n_actions, (batch_size, length), generator=g) * mask.long(),
        hist_gap=torch.randint(0, spec.time_gap_buckets, (batch_size, length), generator=g) * mask.long(),
        hist_mask=mask,
        user_dense=torch.rand((batch_size, spec.n_history_features), generator=g) * 5,
        weekday=torch.randint(0, 7, (batch_size,), generator=g),
        side_ids=side_id_rows(spec, g, batch_size) if spec.side.n_ids else None,
        side_values=side_value_rows(spec, g, batch_size) if spec.side.n_values else None,
    )
    return batch


def side_id_rows(spec: SchemaSpec, g: torch.Generator, batch_size: int) -> torch.Tensor:
    """[B, n_ids] int64: per feature a code in 0..size-1 (a tenth of them 0, missing), plus its offset."""
    sizes = torch.tensor([e.size for group in spec.side.groups() for e in group.categorical], dtype=torch.int64)
    offsets = torch.from_numpy(spec.side.id_offsets.astype("int64"))
    codes = (torch.rand((batch_size, sizes.shape[0]), generator=g) * sizes).long().clamp_max(sizes - 1)
    codes = torch.where(torch.rand(codes.shape, generator=g) < 0.1, torch.zeros_like(codes), codes)
    codes[0] = 0  # a row of out-of-vocabulary codes only
    codes[-1] = sizes - 1  # the last code of every feature
    return codes + offsets


def side_value_rows(spec: SchemaSpec, g: torch.Generator, batch_size: int) -> torch.Tensor:
    """[B, n_values] float32: standard normal (the normalized scale), a few rows far outside it."""
    values = torch.randn((batch_size, spec.side.n_values), generator=g)
    values[-1] *= 20.0
    return values


def onnx_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def scorer_parity(model: RankingModel, onnx_path: Path, torchscript_path: Path, spec: SchemaSpec,
                  onnx_tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Max |Δp| per task of ONNX Runtime and TorchScript against PyTorch, over two batches of different shapes.

    `passed` is whether each runtime is within its tolerance: `PARITY_TOLERANCE`, or `onnx_tolerance`
    for a quantized ONNX graph.
    """
    sess = onnx_session(onnx_path)
    scripted = torch.jit.load(str(torchscript_path))  # type: ignore[no-untyped-call]
    tasks = list(spec.task_names)
    worst = {"onnx": np.zeros(len(tasks)), "torchscript": np.zeros(len(tasks))}
    for seed, size in ((1, 64), (2, 5)):
        inputs = parity_batch(model, spec, seed=seed, batch_size=size)
        names = spec.scorer_inputs
        args = tuple(inputs[n] for n in names)
        with torch.no_grad():
            ref = model.scorer(*args).numpy()
            ts = scripted(*args).numpy()
        ox = sess.run(None, {n: inputs[n].numpy() for n in names})[0]
        worst["onnx"] = np.maximum(worst["onnx"], np.abs(ox - ref).max(axis=0))
        worst["torchscript"] = np.maximum(worst["torchscript"], np.abs(ts - ref).max(axis=0))
    # a NaN anywhere (a diverged model, or one runtime's output) is no agreement: it counts as an
    # infinite difference, which no tolerance admits (a NaN compares false with every bound)
    worst = {rt: np.where(np.isnan(diff), np.inf, diff) for rt, diff in worst.items()}
    per_task = {rt: dict(zip(tasks, map(float, diff), strict=True)) for rt, diff in worst.items()}
    tolerance = {"onnx": onnx_tolerance, "torchscript": PARITY_TOLERANCE}
    return {
        "tolerance": tolerance,
        "max_abs_diff": float(max(d.max() for d in worst.values())),
        "per_task": per_task,
        "passed": all(float(diff.max()) <= tolerance[rt] for rt, diff in worst.items()),
    }
