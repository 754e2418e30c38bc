"""TargetAttention: the folded fast forward against the per-behaviour reference, values and gradients.
The ESMM task tree, the side-feature inputs, and the schema-driven widths of the scorer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from export.parity import parity_batch, random_batch
from feature_store.schema import SCORER_INPUTS, FeatureSchema
from models.model import (
    ModelConfig,
    NumericEmbedding,
    RankingModel,
    TargetAttention,
    esmm_probs,
    pair_indices,
    pairwise_dots,
)
from tests.helpers import side_schema, tiny_model, tiny_schema


def reference_forward(
    att: TargetAttention, key: Tensor, repr_: Tensor, action: Tensor, gap: Tensor, mask: Tensor, query: Tensor
) -> Tensor:
    """The attention as first written: every behaviour's value projected, then the weighted sum."""
    b, length, _ = key.shape
    k = key.reshape(b, length, att.n_heads, att.head_dim)
    q = query.reshape(b, 1, att.n_heads, att.head_dim)
    logits = (k * q).sum(-1) / math.sqrt(att.head_dim) + att.action_bias(action) + att.gap_bias(gap)
    m = mask.unsqueeze(-1)
    logits = logits * m + (1.0 - m) * -1e9
    weights = torch.softmax(logits, dim=1) * m
    values = att.value(repr_ + att.action_emb(action) + att.gap_emb(gap))  # [B, L, R]
    r = values.shape[-1]
    v = values.reshape(b, length, att.n_heads, r // att.n_heads)
    return (weights.unsqueeze(-1) * v).sum(1).reshape(b, r)


def random_inputs(b: int, length: int, a_dim: int, r_dim: int, n_act: int, n_gap: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, length, generator=g) > 0.3).float()
    mask[0] = 0.0  # an empty history: all padding
    mask[1] = 1.0  # a full one
    return [
        torch.randn(b, length, a_dim, generator=g),
        torch.randn(b, length, r_dim, generator=g),
        torch.randint(0, n_act, (b, length), generator=g),
        torch.randint(0, n_gap, (b, length), generator=g),
        mask,
        torch.randn(b, a_dim, generator=g),
    ]


def fast_forward(
    att: TargetAttention, key: Tensor, repr_: Tensor, action: Tensor, gap: Tensor, mask: Tensor, query: Tensor
) -> Tensor:
    """The model's form: action and gap folded into the behaviour rows, then the attention."""
    folded_key, folded_repr = att.behaviours(key, repr_, action, gap)
    return att(folded_key, folded_repr, mask, query)


def make_attention(n_heads: int, seed: int) -> TargetAttention:
    torch.manual_seed(seed)
    att = TargetAttention(attn_dim=16, repr_dim=32, n_heads=n_heads, n_actions=4, n_gaps=12)
    with torch.no_grad():
        for p in att.parameters():  # the biases start at zero, which would hide bias bugs
            p.add_(torch.randn_like(p) * 0.5)
    return att


@pytest.mark.parametrize(("n_heads", "length", "seed"), [(2, 64, 0), (1, 20, 1), (4, 7, 2), (2, 1, 3)])
def test_fast_forward_matches_reference(n_heads: int, length: int, seed: int) -> None:
    att = make_attention(n_heads, seed)
    inputs = random_inputs(33, length, 16, 32, 4, 12, seed)
    with torch.no_grad():  # inference and export: the small tables are gathers
        fast, ref = fast_forward(att, *inputs), reference_forward(att, *inputs)
        assert fast.shape == ref.shape == (33, 32)
        # float32: another summation order, so equal to rounding (~1e-6 of the outputs' scale)
        assert (fast - ref).abs().max() <= 1e-6 * ref.abs().max()
        assert torch.equal(fast[0], att.value.bias.new_zeros(32)), "an empty history attends to nothing"
        # float64: the same math
        att64 = att.double()
        in64 = [t.double() if t.is_floating_point() else t for t in inputs]
        torch.testing.assert_close(fast_forward(att64, *in64), reference_forward(att64, *in64), rtol=1e-12, atol=1e-12)


def test_fast_forward_gradients_match_reference() -> None:
    """Training path (one-hot small tables, autograd): same loss gradients for every parameter and input."""
    att = make_attention(2, 5)
    inputs = random_inputs(17, 24, 16, 32, 4, 12, 5)
    float_inputs = [0, 1, 5]  # key, repr, query
    grads = []
    for forward in (lambda *x: fast_forward(att, *x), lambda *x: reference_forward(att, *x)):
        att.zero_grad()
        leaves = [t.clone().requires_grad_(i in float_inputs) for i, t in enumerate(inputs)]
        out = forward(*leaves)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([p.grad.clone() for p in att.parameters()] + [leaves[i].grad for i in float_inputs])
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_event_tables_are_the_fold_rows() -> None:
    """The bundle's event tables hold exactly what `behaviours` adds, row code = action * n_gaps + gap."""
    att = make_attention(2, 7)
    action = torch.arange(4).repeat_interleave(12)
    gap = torch.arange(12).repeat(4)
    key, rep = torch.zeros(1, 48, 16), torch.zeros(1, 48, 32)
    with torch.no_grad():
        folded_key, folded_repr = att.behaviours(key, rep, action[None], gap[None])
        bias, emb = att.event_tables()
    assert bias.shape == (48, 2) and emb.shape == (48, 32)
    code = action * 12 + gap
    assert torch.equal(folded_key[0, :, 16:], bias[code]) and torch.equal(folded_key[0, :, :16], key[0])
    assert torch.equal(folded_repr[0], emb[code])



def probs_and_logits(model: RankingModel, schema: FeatureSchema, seed: int = 3) -> tuple[Tensor, Tensor]:
    """The scorer's output and the task heads' logits on one parity batch."""
    captured: list[Tensor] = []
    hook = model.scorer.heads.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        inputs = parity_batch(model, schema.spec, seed=seed, batch_size=40)
        with torch.no_grad():
            probs = model.scorer(*(inputs[n] for n in schema.spec.scorer_inputs))
    finally:
        hook.remove()
    return probs, captured[0]


@pytest.mark.parametrize("heads", ["resflow", "mmoe"])
def test_default_schema_esmm_is_the_click_chain(heads: str) -> None:
    """The default tasks (cart and buy under click) give exactly the former p_click * p_task."""
    schema = tiny_schema()
    assert schema.spec.task_parents() == (-1, 0, 0)
    assert schema.spec.scorer_inputs == SCORER_INPUTS
    model = tiny_model(schema, heads=heads)
    probs, logits = probs_and_logits(model, schema)
    p = torch.sigmoid(logits)
    assert torch.equal(probs, torch.cat([p[:, :1], p[:, :1] * p[:, 1:]], dim=-1))


def test_esmm_parent_chain() -> None:
    """buy <- cart <- view, like alone, declared child first: p = sigmoid * p(parent), never above it."""
    schema = side_schema()
    spec = schema.spec
    tasks = list(spec.task_names)
    assert tasks == ["buy", "like", "view", "cart"]
    assert spec.task_parents() == (3, -1, -1, 2)
    model = tiny_model(schema)
    probs, logits = probs_and_logits(model, schema)
    s = torch.sigmoid(logits)
    buy, like, view, cart = range(4)
    assert torch.equal(probs[:, like], s[:, like]) and torch.equal(probs[:, view], s[:, view])
    assert torch.equal(probs[:, cart], s[:, view] * s[:, cart])
    assert torch.equal(probs[:, buy], probs[:, cart] * s[:, buy])
    assert bool((probs[:, cart] <= probs[:, view]).all()) and bool((probs[:, buy] <= probs[:, cart]).all())
    # without ESMM every task is its own sigmoid
    model.scorer.cfg.esmm = False
    probs, logits = probs_and_logits(model, schema)
    assert torch.equal(probs, torch.sigmoid(logits))


def test_esmm_probs_without_parents_is_sigmoid() -> None:
    logits = torch.randn(7, 3)
    assert torch.equal(esmm_probs(logits, (-1, -1, -1), (0, 1, 2)), torch.sigmoid(logits))
    # a deeper chain declared in reverse: 2 <- 1 <- 0
    p = esmm_probs(logits, (1, 2, -1), (2, 1, 0))
    s = torch.sigmoid(logits)
    assert torch.equal(p[:, 2], s[:, 2]) and torch.equal(p[:, 1], s[:, 2] * s[:, 1])
    assert torch.equal(p[:, 0], (s[:, 2] * s[:, 1]) * s[:, 0])


def test_scorer_widths_follow_the_schema() -> None:
    """Actions, cross and history widths from the schema; side ids embedded, side values concatenated."""
    schema = side_schema()
    spec = schema.spec
    model = tiny_model(schema)
    scorer = model.scorer
    assert scorer.input_names == spec.scorer_inputs
    assert scorer.attention.action_bias.rows == spec.n_actions == 4
    assert scorer.dense_norm.num_features == spec.n_history_features
    assert scorer.side_emb is not None and scorer.side_emb.num_embeddings == spec.side.table_rows
    inputs = parity_batch(model, spec, seed=0, batch_size=6)
    assert inputs["side_ids"].shape == (6, spec.side.n_ids) and inputs["side_ids"].dtype == torch.int64
    assert inputs["side_values"].shape == (6, spec.side.n_values) and inputs["side_values"].dtype == torch.float32
    base = [inputs[n] for n in SCORER_INPUTS]
    with pytest.raises(TypeError, match="side inputs"):
        scorer(*base)
    # the side inputs reach the heads: another user/item/context row changes the scores
    with torch.no_grad():
        ref = scorer(*base, inputs["side_ids"], inputs["side_values"])
        other_ids = scorer(*base, inputs["side_ids"].flip(0), inputs["side_values"])
        other_values = scorer(*base, inputs["side_ids"], inputs["side_values"] + 1.0)
    assert not torch.allclose(ref, other_ids) and not torch.allclose(ref, other_values)


@pytest.mark.parametrize(
    ("groups", "kinds"),
    [
        (("user", "item", "context"), ("categorical", "numeric")),
        (("item",), ("numeric",)),
        (("context",), ("categorical",)),
    ],
)
def test_side_features_train_one_step(groups: tuple[str, ...], kinds: tuple[str, ...]) -> None:
    """One optimizer step moves the side table (when there is one) and the heads."""
    schema = side_schema(groups, kinds)
    model = tiny_model(schema)
    assert model.scorer.input_names[len(SCORER_INPUTS):] == tuple(
        n for n, k in (("side_ids", "categorical"), ("side_values", "numeric")) if k in kinds
    )
    batch = random_batch(model, schema.spec, seed=4, batch_size=32)
    labels = (torch.rand(32, len(schema.spec.tasks), generator=torch.Generator().manual_seed(0)) < 0.3).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    probs = model(batch)
    assert probs.shape == (32, 4)
    loss = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), labels)
    loss.backward()  # type: ignore[no-untyped-call]
    if model.scorer.side_emb is not None:
        grad = model.scorer.side_emb.weight.grad
        assert grad is not None and bool((grad != 0).any())
    opt.step()
    after = model.state_dict()
    if model.scorer.side_emb is not None:
        assert not torch.equal(before["scorer.side_emb.weight"], after["scorer.side_emb.weight"])
    assert not torch.equal(before["scorer.heads.out.0.weight"], after["scorer.heads.out.0.weight"])
    batch.side_ids, batch.side_values = None, None
    with pytest.raises(ValueError, match="has no side_"):
        model(batch)


def test_numeric_embedding_starts_as_gaussian_soft_buckets() -> None:
    """At initialization bucket h's weight is softmax_h(-(x - c_h)^2 / (2 spacing^2)) over even centres."""
    emb = NumericEmbedding(n_features=2, n_buckets=6, dim=3)
    x = torch.tensor([[-3.0, 0.1], [0.7, 2.4]])
    centres = torch.linspace(-2.5, 2.5, 6)
    spacing = float(centres[1] - centres[0])
    weights = torch.softmax(-((x.unsqueeze(-1) - centres) ** 2) / (2 * spacing**2), dim=-1)
    expected = torch.einsum("bfh,fhd->bfd", weights, emb.buckets)
    torch.testing.assert_close(emb(x), expected, atol=1e-5, rtol=0)
    # the nearest centre carries the most weight
    assert int(weights[1, 0].argmax()) == int((centres - 0.7).abs().argmin())


def test_pairwise_dots_are_every_pair_once() -> None:
    fields = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
    got = pairwise_dots(fields, *pair_indices(5))
    expected = torch.stack(
        [(fields[:, i] * fields[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5)], dim=-1
    )
    torch.testing.assert_close(got, expected)


def test_side_interactions_widen_the_towers_and_old_configs_load_without_them() -> None:
    schema = side_schema()
    spec = schema.spec
    model = tiny_model(schema)
    assert model.scorer.side_interactions and model.scorer.numeric_emb is not None
    n_fields = spec.side.n_ids + spec.side.n_values
    cfg = model.cfg
    plain = RankingModel(ModelConfig(**{**cfg.to_dict(), "side_interactions": False}), spec, 3, 3, 3)
    assert plain.scorer.numeric_emb is None and not plain.scorer.side_interactions
    widths = [next(m for m in s.heads.modules() if isinstance(m, torch.nn.Linear)).in_features
              for s in (model.scorer, plain.scorer)]
    assert widths[0] - widths[1] == spec.side.n_values * cfg.side_dim + n_fields * (n_fields - 1) // 2
    recorded = cfg.to_dict()
    del recorded["side_interactions"]  # a config recorded before side interactions existed
    assert not ModelConfig.from_dict(recorded).side_interactions
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
