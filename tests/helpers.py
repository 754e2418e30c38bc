"""Shared test builders: a tiny schema and model that export in a second (no dataset needed)."""

from __future__ import annotations

import numpy as np
import torch

from feature_store.schema import FeatureSchema, SchemaSpec, Vocabulary
from feature_store.spec import FeatureSpec, SideFeatures
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
                      tower_dims=[16, 8], side_dim=3)
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


SIDE_SPEC = {
    "name": "tiny-side",
    "events": {"path": "events.csv"},
    "actions": {"view": ["v"], "like": ["l"], "cart": ["c"], "buy": ["b"], "impression": ["i"]},
    # a child declared before its parent, a parent that is not the first task, a task without one
    "tasks": [
        {"name": "buy", "positive": ["buy"], "parent": "cart", "weight": 10},
        {"name": "like", "positive": ["like"], "weight": 2, "transform": "power:0.5"},
        {"name": "view", "positive": ["view", "cart", "buy"]},
        {"name": "cart", "positive": ["cart", "buy"], "parent": "view", "weight": 3},
    ],
    "user_features": {"path": "users.csv", "categorical": ["city"], "numeric": [{"name": "age"}]},
    "item_features": {"path": "items.csv", "categorical": [{"name": "brand", "max_vocabulary": 3,
                                                            "hash_buckets": 4}, "seller"],
                      "numeric": [{"name": "price", "log1p": True}]},
    "context_features": {"categorical": ["device"], "numeric": ["hour"]},
    "sequence": {"max_length": 500, "short_length": 5},
}


def side_feature_spec(groups: tuple[str, ...] = ("user", "item", "context"), kinds: tuple[str, ...] = (
        "categorical", "numeric")) -> FeatureSpec:
    """`SIDE_SPEC` keeping only the side-feature `groups` and, in them, the feature `kinds`."""
    doc = dict(SIDE_SPEC)
    for group in ("user", "item", "context"):
        key = f"{group}_features"
        if group not in groups:
            doc.pop(key)
        else:
            doc[key] = {k: v for k, v in doc[key].items() if k not in ("categorical", "numeric") or k in kinds}
    return FeatureSpec.parse(doc)


def side_schema(groups: tuple[str, ...] = ("user", "item", "context"),
                kinds: tuple[str, ...] = ("categorical", "numeric")) -> FeatureSchema:
    """A tiny schema of `side_feature_spec` with side features fitted on random columns."""
    spec = side_feature_spec(groups, kinds)
    rng = np.random.default_rng(1)
    n = 200
    columns = {
        "user": {"city": rng.choice(["paris", "lyon", "nice", None], n), "age": rng.normal(35, 10, n)},
        "item": {"brand": rng.choice([f"b{k}" for k in range(8)], n), "seller": rng.choice(["s1", "s2"], n),
                 "price": rng.lognormal(3, 1, n)},
        "context": {"device": rng.choice(["ios", "android", "web"], n), "hour": rng.integers(0, 24, n)},
    }
    side = SideFeatures.fit(spec, columns)
    return FeatureSchema(
        SchemaSpec.from_feature_spec(spec, side),
        Vocabulary.build(rng.choice(10_000, 40, replace=False)),
        Vocabulary.build(rng.choice(10_000, 300, replace=False)),
        Vocabulary.build(rng.choice(1_000, 12, replace=False)),
    )
