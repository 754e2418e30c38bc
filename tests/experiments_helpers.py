"""Builders shared by the experiments and shadow tests: bundles, config files, metric lookups."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from feature_store.schema import FeatureSchema
from loadtest.prom import metric_sum as metric_value
from models.model import RankingModel
from tests.helpers import tiny_model


def retrained_tiny_model(schema: FeatureSchema, seed: int) -> RankingModel:
    """`tiny_model` with different weights: what a differently trained bundle looks like to serving."""
    model = tiny_model(schema)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.eval()
    return model


def two_version_model_dir(root: Path, retrained_seed: int) -> Path:
    """`root/models` with tiny/1 (`tiny_model`) and tiny/2 (retrained with `retrained_seed`), same schema."""
    from export.exporter import write_bundle
    from tests.helpers import tiny_schema

    schema = tiny_schema()
    schema.save(root / "schema")
    write_bundle(tiny_model(schema), root / "schema", {}, root / "models", "tiny")
    write_bundle(retrained_tiny_model(schema, seed=retrained_seed), root / "schema", {}, root / "models", "tiny")
    return root / "models"


def write_config(path: Path, doc: dict[str, Any]) -> None:
    """Write the experiments file atomically (a poller never reads half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)

__all__ = ["metric_value", "retrained_tiny_model", "two_version_model_dir", "write_config"]
