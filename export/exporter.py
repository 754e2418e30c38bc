"""`rankserve export`: a trained run -> an immutable, versioned bundle (see export/bundle.py).

The exporter writes the scorer as ONNX and TorchScript plus the tables, checks PyTorch vs ONNX
Runtime vs TorchScript on one batch (padded and short histories, unknown ids included), records
the differences and every file's sha256 in the manifest, and only then moves the directory into
place with one rename, so a model registry never sees a half-written bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.bundle import (
    FORMAT,
    MANIFEST,
    ONNX_FILE,
    SCHEMA_DIR,
    SCORER_RUNTIMES,
    SPEC_FILE,
    TABLES_DIR,
    TORCHSCRIPT_FILE,
    BundleExistsError,
    list_versions,
    sha256_file,
)
from export.parity import PARITY_TOLERANCE, parity_batch, scorer_parity
from export.quantize import QUANTIZATIONS, QUANTIZED_PARITY_TOLERANCE, quantize_scorer
from feature_store.schema import SCORER_OUTPUT, FeatureSchema, SchemaSpec
from models.checkpoint import RUN_SPEC_FILE, load_run
from models.model import RankingModel, Scorer

log = logging.getLogger("rankserve.export")

DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "cand_repr": {0: "batch"},
    "cand_cross": {0: "batch"},
    "long_pooled": {0: "batch"},
    "long_attended": {0: "batch"},
    "short_pooled": {0: "batch"},
    "short_attended": {0: "batch"},
    "user_repr": {0: "batch"},
    "user_dense": {0: "batch"},
    "weekday": {0: "batch"},
    "side_ids": {0: "batch"},
    "side_values": {0: "batch"},
    SCORER_OUTPUT: {0: "batch"},
}


def default_fusion(spec: SchemaSpec) -> dict[str, Any]:
    """Additive fusion s = Σ w_t·f_t(p_t) with the tasks' declared weights and transforms.

    The default tasks (click 1, cart 3, buy 10) keep the Tmall weights: rarer, more valuable
    events weigh more.
    """
    return spec.default_fusion()


def export_onnx(scorer: Scorer, example: dict[str, torch.Tensor], path: Path) -> None:
    """Trace under no_grad: the small tables export as Gathers (their training path is OneHot -> MatMul)."""
    names = list(scorer.input_names)  # the schema's scorer_inputs
    args = tuple(example[name] for name in names)
    with torch.no_grad():
        torch.onnx.export(
            scorer,
            args,
            str(path),
            dynamo=False,  # the TorchScript-based exporter: fast and exact for these ops
            opset_version=17,
            input_names=names,
            output_names=[SCORER_OUTPUT],
            dynamic_axes={n: DYNAMIC_AXES[n] for n in [*names, SCORER_OUTPUT]},
            do_constant_folding=True,
        )


def export_torchscript(scorer: Scorer, example: dict[str, torch.Tensor], path: Path) -> None:
    """Trace under no_grad, like `export_onnx`: the traced graph keeps the Gathers."""
    example_args = tuple(example[name] for name in scorer.input_names)
    with torch.no_grad():
        traced = torch.jit.trace(scorer, example_args, check_trace=False)  # type: ignore[no-untyped-call]
    traced.save(str(path))


def _io_spec(names: tuple[str, ...], example: dict[str, torch.Tensor], probs: torch.Tensor) -> dict[str, Any]:
    def spec(name: str, t: torch.Tensor) -> dict[str, Any]:
        axes = DYNAMIC_AXES[name]
        return {
            "name": name,
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": [axes.get(i, int(d)) for i, d in enumerate(t.shape)],
        }

    return {
        "inputs": [spec(n, example[n]) for n in names],
        "outputs": [spec(SCORER_OUTPUT, probs)],
    }


def write_bundle(
    model: RankingModel,
    schema_dir: Path,
    run_config: dict[str, Any],
    out_root: Path,
    name: str,
    version: int | None = None,
    fusion: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    scorer_runtime: str = "onnx",
    spec_file: Path | None = None,
    quantize: str | None = None,
) -> Path:
    """Write `out_root/name/version/` and return its path. Refuses to overwrite a version.

    `scorer_runtime` ("onnx" or "torchscript") is the runtime the service uses for this bundle
    unless its settings override it; both scorers are always written. `spec_file`, the run's
    feature spec (RUN/spec.yaml), is copied into the bundle as `spec.yaml`. The default fusion is
    the schema's declared task weights and transforms. `quantize="int8"` writes the ONNX scorer
    with int8 dense layers (`export.quantize`; the TorchScript scorer stays float), held to
    `QUANTIZED_PARITY_TOLERANCE` instead of `PARITY_TOLERANCE`.
    """
    if scorer_runtime not in SCORER_RUNTIMES:
        raise ValueError(f"scorer_runtime must be one of {SCORER_RUNTIMES}, got {scorer_runtime!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    model.eval()
    schema = FeatureSchema.load(schema_dir, mmap=False)
    names = schema.spec.scorer_inputs
    if tuple(model.scorer.input_names) != names:
        raise ValueError(
            f"the model's scorer takes {list(model.scorer.input_names)}, its schema's scorer inputs are {list(names)}"
        )
    if version is None:
        existing = list_versions(out_root, name)
        version = (existing[-1] + 1) if existing else 1
    final = out_root / name / str(version)
    if final.exists():
        raise BundleExistsError(f"bundle {final} already exists; bundles are immutable, pick a new version")
    (out_root / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=out_root / name))
    try:
        example = parity_batch(model, schema.spec, seed=0)
        with torch.no_grad():
            probs = model.scorer(*(example[n] for n in names))
        if quantize is None:
            export_onnx(model.scorer, example, staging / ONNX_FILE)
        else:
            float_graph = staging / f".float.{ONNX_FILE}"
            export_onnx(model.scorer, example, float_graph)
            quantize_scorer(float_graph, staging / ONNX_FILE)
            float_graph.unlink()
        export_torchscript(model.scorer, example, staging / TORCHSCRIPT_FILE)
        onnx_tolerance = PARITY_TOLERANCE if quantize is None else QUANTIZED_PARITY_TOLERANCE
        parity = scorer_parity(model, staging / ONNX_FILE, staging / TORCHSCRIPT_FILE, schema.spec, onnx_tolerance)
        if not parity["passed"]:
            raise RuntimeError(f"export parity failed: {parity}")

        (staging / TABLES_DIR).mkdir()
        tables_meta: dict[str, Any] = {}
        for table_name, tensor in model.precomputed_tables().items():
            arr = np.ascontiguousarray(tensor.detach().cpu().numpy().astype("<f4"))
            rel = f"{TABLES_DIR}/{table_name}.npy"
            np.save(staging / rel, arr)
            tables_meta[table_name] = {"file": rel, "shape": list(arr.shape), "dtype": "float32"}
        schema.save(staging / SCHEMA_DIR)
        if spec_file is not None:
            shutil.copyfile(spec_file, staging / SPEC_FILE)

        tasks = list(schema.spec.task_names)
        cfg = model.cfg
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "name": name,
            "version": version,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "schema": schema.manifest_entry(),
            "tasks": tasks,
            "fusion": fusion or default_fusion(schema.spec),
            "feature_spec": SPEC_FILE if spec_file is not None else None,
            "retrieval": {
                "strategy": "twin_exact",
                "metric": "inner_product",
                "k": cfg.retrieval_k,
                "head_dim": cfg.attn_dim // cfg.n_heads,
                "short_length": cfg.short_length,
                "use_retrieval": cfg.use_retrieval,
                "max_sequence_length": schema.spec.max_sequence_length,
            },
            "model": {"config": cfg.to_dict(), "variant": run_config.get("variant"), "data": run_config.get("data")},
            "scorer": {
                "runtime": scorer_runtime,
                "onnx": ONNX_FILE,
                "torchscript": TORCHSCRIPT_FILE,
                "quantization": quantize,  # of the ONNX scorer; None: float32 like the model
                **_io_spec(names, example, probs),
            },
            "tables": tables_meta,
            "parity": parity,
            "metrics": metrics or {},
        }
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest["files"] = {str(p.relative_to(staging)): sha256_file(p) for p in files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for p in staging.rglob("*"):  # immutable on disk too
            if p.is_file():
                os.chmod(p, 0o444)
        os.chmod(staging, 0o755)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def export_run(
    run_dir: Path, out_root: Path, name: str | None = None, version: int | None = None, scorer_runtime: str = "onnx",
    quantize: str | None = None,
) -> Path:
    model, _schema, config = load_run(run_dir)
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    spec_file = run_dir / RUN_SPEC_FILE
    bundle_name = name or bundle_name_of(config)
    return write_bundle(
        model,
        run_dir / "schema",
        config,
        out_root,
        bundle_name,
        version=version,
        metrics={"best_valid_mean_auc": metrics.get("best_valid_mean_auc")},
        scorer_runtime=scorer_runtime,
        spec_file=spec_file if spec_file.is_file() else None,
        quantize=quantize,
    )


def bundle_name_of(config: dict[str, Any]) -> str:
    """A bundle name from what the run recorded: its feature spec's name (older runs: the data set)."""
    raw = str((config.get("feature_spec") or {}).get("name") or config.get("data") or "model")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-.")
    return name or "model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="run directory written by `rankserve train`")
    p.add_argument("--out", type=Path, required=True, help="model root; the bundle goes to OUT/NAME/VERSION")
    p.add_argument("--name", help="bundle name (default: the feature spec's name)")
    p.add_argument("--version", type=int, help="bundle version (default: next integer)")
    p.add_argument(
        "--scorer-runtime", choices=SCORER_RUNTIMES, default="onnx",
        help="runtime the service scores this bundle with, unless RANKSERVE_SCORER_RUNTIME overrides it",
    )
    p.add_argument(
        "--quantize", choices=QUANTIZATIONS, default=None,
        help="int8: the ONNX scorer's dense layers with int8 weights (less CPU; the export refuses a graph more than "
             f"{QUANTIZED_PARITY_TOLERANCE} off the model on its parity batches; measure the AUC "
             "change with `python -m loadtest.eval_strategies --scorers torch,onnx-int8` before serving it)",
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    path = export_run(args.run, args.out, args.name, args.version, args.scorer_runtime, args.quantize)
    manifest = json.loads((path / MANIFEST).read_text())
    log.info(
        "bundle exported",
        extra={"bundle": str(path), "parity": manifest["parity"], "seconds": round(time.perf_counter() - t0, 1)},
    )
    sys.stdout.write(f"{path}\n")  # the one machine-readable output: the bundle path, for scripts
    return 0
