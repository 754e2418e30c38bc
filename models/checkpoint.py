"""Run directories: save and load a trained model with its schema and config (weights only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from feature_store.errors import UserError
from feature_store.schema import FeatureSchema
from feature_store.spec import FeatureSpec
from models.model import ModelConfig, RankingModel

RUN_SPEC_FILE = "spec.yaml"  # the feature spec the run was trained from (export copies it into the bundle)


class RunError(UserError):
    """A run directory that is missing or incomplete."""


def save_run(
    run_dir: Path,
    model: RankingModel,
    schema: FeatureSchema,
    config: dict[str, Any],
    metrics: dict[str, Any],
    spec: FeatureSpec | None = None,
) -> None:
    """Write a run directory; with `spec`, also RUN/spec.yaml (the feature spec, as YAML)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    schema.save(run_dir / "schema")
    if spec is not None:
        (run_dir / RUN_SPEC_FILE).write_text(spec.to_yaml())
    torch.save(model.state_dict(), run_dir / "checkpoint.pt")
    # keys in their given order: a feature spec's actions are ordered (an action's code is its position)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def load_run(run_dir: str | Path) -> tuple[RankingModel, FeatureSchema, dict[str, Any]]:
    """Rebuild a trained model from its run directory (`weights_only`: nothing is unpickled)."""
    run = Path(run_dir)
    missing = [f for f in ("config.json", "checkpoint.pt", "schema") if not (run / f).exists()]
    if missing:
        raise RunError(f"{run} is not a complete run directory (missing {', '.join(missing)}): "
                       "train one with `rankserve train --out DIR`")
    config = json.loads((run / "config.json").read_text())
    schema = FeatureSchema.load(run / "schema", mmap=False)
    model_cfg = ModelConfig.from_dict(config["model"])
    sizes = schema.vocab_sizes()
    model = RankingModel(model_cfg, schema.spec, sizes["user"], sizes["item"], sizes["category"])
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True))
    model.eval()
    return model, schema, config
