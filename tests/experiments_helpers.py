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


def write_config(path: Path, doc: dict[str, Any]) -> None:
    """Write the experiments file atomically (a poller never reads half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)

__all__ = ["metric_value", "retrained_tiny_model", "write_config"]
