"""TargetAttention: the folded fast forward against the per-behaviour reference, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from models.model import TargetAttention


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

