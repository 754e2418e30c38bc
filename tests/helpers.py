"""Shared test builders: a tiny schema and model that export in a second (no dataset needed)."""

from __future__ import annotations

import numpy as np
import torch

from feature_store.schema import FeatureSchema, SchemaSpec, Vocabulary
from models.model import ModelConfig, RankingModel


def tiny_schema() -> FeatureSchema:
    rng = np.random.default_rng(0)
    return FeatureSchema(
        SchemaSpec(name="tiny", short_sequence_length=5),
        Vocabulary.build(rng.choice(10_000, 40, replace=False)),
        Vocabulary.build(rng.choice(10_000, 300, replace=False)),
        Vocabulary.build(rng.choice(1_000, 12, replace=False)),
    )


def tiny_model(schema: FeatureSchema, heads: str = "resflow", use_retrieval: bool = True) -> RankingModel:
    torch.manual_seed(0)
    cfg = ModelConfig(retrieval_k=8, short_length=5, heads=heads, use_retrieval=use_retrieval, expert_dim=16,
                      tower_dims=[16, 8])
    sizes = schema.vocab_sizes()
    model = RankingModel(cfg, schema.spec, sizes["user"], sizes["item"], sizes["category"])
    # non-trivial weights everywhere (fresh biases are zero, which would hide bias bugs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # populate BatchNorm statistics so eval-mode normalisation is not the identity
    model.scorer.dense_norm.running_mean.uniform_(0, 2)
    model.scorer.dense_norm.running_var.uniform_(0.5, 2)
    model.eval()
    return model
