"""The ranking model: DARE decoupled embeddings, TWIN general/exact search units, multi-task heads.

The model is split along the line the service draws:

* `RankingModel` holds the embedding tables (DARE: a small *attention* table for retrieval and a
  *representation* table for aggregation) and the TWIN key/query projections. At export, the
  item and category keys and queries are precomputed per row (TWIN caches item-side
  projections), so the service gathers them with numpy from memory-mapped `.npy` files.
* The general search unit (GSU) scores every behaviour with the exact search unit's own metric,
  summed over heads: s_j = Σ_h k_jh·q_h/√d_h + Σ_h (b_act[a_j,h] + b_gap[g_j,h]); it keeps the
  top-k with `topk` + `gather` (no Python loops), so the graph exports too.
* The exact search unit's target attention pools the retrieved and the recent behaviours per
  head (`attention_pool`). The pooling has no parameters, so it runs before the exported part:
  here in torch, in the service in numba over the behaviour rows in place.
* `Scorer` is everything with weights after that (the attention's value projection, feature
  interaction, task heads) on dense inputs. It is what goes to ONNX and TorchScript. Its inputs
  are the schema's `scorer_inputs`: the base ones, then `side_ids` (categorical side features,
  one embedding table) and `side_values` (normalized numeric side features) when the schema has them.
* ESMM follows the schema's task parents: p(task) = σ(z_task) · p(parent), parents first.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from feature_store.schema import SchemaSpec


@dataclass
class ModelConfig:
    """Architecture hyper-parameters; recorded in checkpoints and bundle manifests."""

    attn_dim: int = 16  # DARE attention table width = n_heads * head dim (the retrieval dimension)
    n_heads: int = 2
    repr_dim: int = 32  # DARE representation table width
    user_dim: int = 16
    retrieval_k: int = 64  # GSU keeps this many behaviours per candidate
    short_length: int = 20  # most recent behaviours attended directly
    use_retrieval: bool = True  # False: DIN-short baseline (recent behaviours only)
    train_history: int = 1000  # training-time cap on behaviours searched (serving searches the whole sequence)
    heads: str = "resflow"  # mmoe | ple | resflow
    esmm: bool = True  # a task with a parent is conditional on it: p_t = p_parent * p(t | parent)
    n_experts: int = 4
    expert_dim: int = 64
    tower_dims: list[int] = field(default_factory=lambda: [64, 32])
    weekday_dim: int = 4
    side_dim: int = 8  # embedding width of each categorical side feature (user, item, context)
    # Side features as fields of one width (numeric ones soft-bucketed) and their pairwise dot
    # products into the towers: a context x item-attribute match is one product, not a function
    # the MLP has to discover. Configs written before it existed load without it.
    side_interactions: bool = True
    numeric_buckets: int = 16  # soft buckets of a numeric side feature's embedding
    sparse_embeddings: bool = False  # SparseAdam on the big tables (million-item catalogues)

    def __post_init__(self) -> None:
        if self.attn_dim % self.n_heads or self.repr_dim % self.n_heads:
            raise ValueError("attn_dim and repr_dim must be divisible by n_heads")
        if self.heads not in ("mmoe", "ple", "resflow"):
            raise ValueError(f"heads must be mmoe, ple or resflow, got {self.heads!r}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelConfig:
        """The config a run or bundle recorded; one recorded before side interactions has none."""
        return cls(**{"side_interactions": False, **d})  # type: ignore[arg-type]


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class SmallEmbedding(nn.Module):
    """An embedding table of a few rows, looked up as one-hot @ weight.

    Same values as `nn.Embedding` (exactly: 1·w + 0·rest), but its backward is one matmul
    instead of a sort-based scatter over tens of thousands of indices per batch, which made the
    action/gap/weekday tables the most expensive op of a training step.
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.rows = rows
        self.weight = nn.Parameter(torch.randn(rows, dim))

    def forward(self, idx: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # GSU, inference, export: a plain gather, same values
            return torch.nn.functional.embedding(idx, self.weight)
        return torch.nn.functional.one_hot(idx, self.rows).to(self.weight.dtype) @ self.weight


class NumericEmbedding(nn.Module):
    """Each numeric feature as a soft mixture of learned bucket embeddings (AutoDis).

    Bucket h of feature f has logit a_fh·x + b_fh. Initialized to a_h = s·c_h, b_h = -s·c_h²/2,
    the softmax equals that of -s/2·(x - c_h)²: Gaussian soft buckets at centres c_h over the
    normalized range, which training then moves. No lookup, so it exports as MatMul/Softmax.
    """

    def __init__(self, n_features: int, n_buckets: int, dim: int) -> None:
        super().__init__()
        centres = torch.linspace(-2.5, 2.5, n_buckets)
        sharpness = 1.0 / float(centres[1] - centres[0]) ** 2 if n_buckets > 1 else 1.0
        self.slope = nn.Parameter((sharpness * centres).repeat(n_features, 1))
        self.bias = nn.Parameter((-sharpness * centres**2 / 2).repeat(n_features, 1))
        self.buckets = nn.Parameter(torch.randn(n_features, n_buckets, dim) * 0.05)

    def forward(self, values: Tensor) -> Tensor:
        """[B, F] normalized values -> [B, F, dim]."""
        weights = torch.softmax(values.unsqueeze(-1) * self.slope + self.bias, dim=-1)  # [B, F, H]
        return torch.matmul(weights.transpose(0, 1), self.buckets).transpose(0, 1)


def pair_indices(n: int) -> tuple[Tensor, Tensor]:
    """(i, j) of every pair of n fields with i < j, as two index vectors."""
    pairs = list(itertools.combinations(range(n), 2))
    left, right = [p[0] for p in pairs], [p[1] for p in pairs]
    return torch.tensor(left, dtype=torch.int64), torch.tensor(right, dtype=torch.int64)


def pairwise_dots(fields: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """[B, F, d] -> [B, P]: the dot products of the field pairs (left[p], right[p]).

    Two gathers, one product and one sum: the fewest ONNX Runtime ops measured. A [B, F, F] Gram
    matmul runs there as one tiny GEMM per candidate, and a product per field costs an op each.
    """
    return (fields[:, left] * fields[:, right]).sum(-1)


class TargetAttention(nn.Module):
    """TWIN's multi-head target attention with a scalar cross-feature bias per head.

    logit_jh = k_jh·q_h/√d_h + b_act[a_j, h] + b_gap[g_j, h]; values are the DARE representation
    plus action and gap embeddings, projected. The GSU uses the same logits (summed over heads).
    The action and gap parts are per behaviour, not per candidate, so they are folded into the
    behaviour rows before the attention (`behaviours`): the service does that once per history row
    from the bundle's event tables, and the scorer graph holds no gathers or scatters over behaviours.
    """

    def __init__(self, attn_dim: int, repr_dim: int, n_heads: int, n_actions: int, n_gaps: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = attn_dim // n_heads
        self.action_bias = SmallEmbedding(n_actions, n_heads)
        self.gap_bias = SmallEmbedding(n_gaps, n_heads)
        self.action_emb = SmallEmbedding(n_actions, repr_dim)
        self.gap_emb = SmallEmbedding(n_gaps, repr_dim)
        self.value = nn.Linear(repr_dim, repr_dim)
        nn.init.zeros_(self.action_bias.weight)
        nn.init.zeros_(self.gap_bias.weight)

    def logits(self, key: Tensor, query: Tensor, action: Tensor, gap: Tensor) -> Tensor:
        """Per-head logits [B, L, H] for keys [B, L, A] against one query [B, A] per row."""
        b, length, _ = key.shape
        k = key.reshape(b, length, self.n_heads, self.head_dim)
        q = query.reshape(b, 1, self.n_heads, self.head_dim)
        dot = (k * q).sum(-1) / math.sqrt(self.head_dim)
        logits: Tensor = dot + self.action_bias(action) + self.gap_bias(gap)
        return logits

    def behaviours(self, key: Tensor, repr_: Tensor, action: Tensor, gap: Tensor) -> tuple[Tensor, Tensor]:
        """Behaviour rows with their action and time gap folded in: keys [.., A + H], values [.., R].

        key_aug = [k | b_act[a] + b_gap[g]]: the per-head bias rides along as H extra key columns
        that the attention's augmented query multiplies by 1. repr_aug = r + (A[a] + G[g]). The
        event parts are exactly the rows of `event_tables` at code a * n_gaps + g, so the service's
        numpy fold gives the same floats.
        """
        bias = self.action_bias(action) + self.gap_bias(gap)
        return torch.cat([key, bias], dim=-1), repr_ + (self.action_emb(action) + self.gap_emb(gap))

    def event_tables(self) -> tuple[Tensor, Tensor]:
        """The fold's tables by event code a * n_gaps + g: bias [n_actions * n_gaps, H], repr [.., R]."""
        bias = self.action_bias.weight[:, None, :] + self.gap_bias.weight[None, :, :]
        rep = self.action_emb.weight[:, None, :] + self.gap_emb.weight[None, :, :]
        return bias.reshape(-1, self.n_heads), rep.reshape(-1, rep.shape[-1])

    def forward(self, key: Tensor, repr_: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        """out_h = Σ_j w_jh (W r̃_j + b)_h over folded behaviours (`behaviours`): `project` of `attention_pool`."""
        pooled, attended = attention_pool(key, repr_, mask, query, self.n_heads)
        return self.project(pooled, attended)

    def project(self, pooled: Tensor, attended: Tensor) -> Tensor:
        """The value projection of pooled rows [B, H, R] (`attention_pool`): out [B, R].

        The projection is linear, so it commutes with the attention-weighted sum: out_h =
        W_h (Σ_j w_jh r̃_j) + b_h Σ_j w_jh, where Σ_j w_jh is `attended` [B, 1]: 1, or 0 for an
        empty history (tests/unit/test_model.py keeps projecting every behaviour first as the reference).
        """
        b, h = pooled.shape[0], self.n_heads
        r = pooled.shape[-1]
        # one [B, H·R] x [H·R, R] product with a block-diagonal weight (head h's value rows in block
        # h): out[b, h·R/H + o] = Σ_r pooled[b, h, r] W[h·R/H + o, r]. An einsum would export as an
        # Einsum node, which ONNX Runtime runs at less than half this MatMul's speed (0.11 against
        # 0.04 ms at 500 candidates); the graph builds the block weight on each run from the value
        # weight (a few small ops on a [H·R, R] array)
        wh = self.value.weight.reshape(h, r // h, r).transpose(1, 2)  # [H, R, R/H]
        eye = torch.eye(h, dtype=wh.dtype, device=wh.device)
        block = (eye[:, None, :, None] * wh[:, :, None, :]).reshape(h * r, r)  # [H·R, H·R/H]
        return pooled.reshape(b, h * r) @ block + self.value.bias * attended


def attention_pool(key: Tensor, repr_: Tensor, mask: Tensor, query: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    """TWIN target attention up to the value projection: pooled rows [B, H, R] and `attended` [B, 1].

    pooled_h = Σ_j w_jh r̃_j with w_h = softmax_j(k̃_j · q̃_h) over the folded behaviours
    (`TargetAttention.behaviours`). The logits of all heads are one batched matmul of the folded
    keys [B, L, A + H] with an augmented query [B, A + H, H]: head h's query (scaled by 1/√d_h)
    in the rows of head h, then an identity block that picks each head's bias column. No
    parameters: the service computes the same in numba (`service.assemble`). `attended` is the
    mask's max, exactly (a sum of the weights over L would round differently with the batch size
    in ONNX Runtime, and a candidate's scores must not depend on it).
    """
    b, h = key.shape[0], n_heads
    a_dim = query.shape[-1]  # a Python int, so the head mask below is a constant of a traced graph
    dh = a_dim // h
    head_of = (torch.arange(a_dim, device=key.device) // dh).unsqueeze(-1) == torch.arange(h, device=key.device)
    qbd = query.unsqueeze(-1) * (head_of.to(query.dtype) / math.sqrt(dh))  # [B, A, H]
    eye = torch.eye(h, dtype=query.dtype, device=query.device).expand(b, h, h)
    logits = torch.matmul(key, torch.cat([qbd, eye], dim=1)).transpose(1, 2)  # [B, H, L]
    m = mask.unsqueeze(1)  # [B, 1, L]
    logits = logits * m + (1.0 - m) * -1e9
    w = torch.softmax(logits, dim=-1) * m  # padding (and empty histories) weigh exactly 0
    return torch.matmul(w, repr_), mask.amax(-1, keepdim=True)


class MMoE(nn.Module):
    """Multi-gate mixture of experts: shared experts, one softmax gate and tower per task."""

    def __init__(self, in_dim: int, n_tasks: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList([_mlp([in_dim, cfg.expert_dim]) for _ in range(cfg.n_experts)])
        self.gates = nn.ModuleList([nn.Linear(in_dim, cfg.n_experts) for _ in range(n_tasks)])
        self.towers = nn.ModuleList([_mlp([cfg.expert_dim, *cfg.tower_dims]) for _ in range(n_tasks)])
        self.out = nn.ModuleList([nn.Linear(cfg.tower_dims[-1], 1) for _ in range(n_tasks)])

    def forward(self, x: Tensor) -> Tensor:
        e = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, H]
        logits = []
        for gate, tower, out in zip(self.gates, self.towers, self.out, strict=True):
            g = torch.softmax(gate(x), dim=-1).unsqueeze(-1)
            logits.append(out(tower((g * e).sum(1))))
        return torch.cat(logits, dim=-1)


class PLE(nn.Module):
    """Progressive layered extraction (one CGC level): shared plus task-specific experts."""

    def __init__(self, in_dim: int, n_tasks: int, cfg: ModelConfig) -> None:
        super().__init__()
        n_shared = max(1, cfg.n_experts // 2)
        n_own = max(1, cfg.n_experts - n_shared)
        self.shared = nn.ModuleList([_mlp([in_dim, cfg.expert_dim]) for _ in range(n_shared)])
        self.own = nn.ModuleList(
            [nn.ModuleList([_mlp([in_dim, cfg.expert_dim]) for _ in range(n_own)]) for _ in range(n_tasks)]
        )
        self.gates = nn.ModuleList([nn.Linear(in_dim, n_shared + n_own) for _ in range(n_tasks)])
        self.towers = nn.ModuleList([_mlp([cfg.expert_dim, *cfg.tower_dims]) for _ in range(n_tasks)])
        self.out = nn.ModuleList([nn.Linear(cfg.tower_dims[-1], 1) for _ in range(n_tasks)])

    def forward(self, x: Tensor) -> Tensor:
        shared = [expert(x) for expert in self.shared]
        logits = []
        for own, gate, tower, out in zip(self.own, self.gates, self.towers, self.out, strict=True):
            e = torch.stack([expert(x) for expert in own.children()] + shared, dim=1)
            g = torch.softmax(gate(x), dim=-1).unsqueeze(-1)
            logits.append(out(tower((g * e).sum(1))))
        return torch.cat(logits, dim=-1)


class ResFlow(nn.Module):
    """ResFlow: residual links from task k-1 to task k in every layer and on the logit.

    h_k^l = f_k^l(h_k^{l-1}) + h_{k-1}^l and z_k = g_k(h_k^L) + z_{k-1}.
    """

    def __init__(self, in_dim: int, n_tasks: int, cfg: ModelConfig) -> None:
        super().__init__()
        dims = [in_dim, cfg.expert_dim, *cfg.tower_dims]
        self.layers = nn.ModuleList(
            [nn.ModuleList([nn.Linear(a, b) for a, b in itertools.pairwise(dims)]) for _ in range(n_tasks)]
        )
        self.out = nn.ModuleList([nn.Linear(dims[-1], 1) for _ in range(n_tasks)])

    def forward(self, x: Tensor) -> Tensor:
        prev_hidden: list[Tensor] = []
        prev_logit: Tensor | None = None
        logits = []
        for layers, out in zip(self.layers, self.out, strict=True):
            h = x
            hidden: list[Tensor] = []
            for depth, layer in enumerate(layers.children()):
                h = torch.relu(layer(h))
                if prev_hidden:
                    h = h + prev_hidden[depth]
                hidden.append(h)
            z = out(h)
            if prev_logit is not None:
                z = z + prev_logit
            logits.append(z)
            prev_hidden, prev_logit = hidden, z
        return torch.cat(logits, dim=-1)


HEADS: dict[str, type[nn.Module]] = {"mmoe": MMoE, "ple": PLE, "resflow": ResFlow}


def esmm_probs(logits: Tensor, parents: tuple[int, ...], order: tuple[int, ...]) -> Tensor:
    """ESMM over a task tree: p_t = σ(z_t) · p_parent(t) for tasks with a parent, σ(z_t) otherwise.

    `parents` holds each task's parent index (-1: none) and `order` visits parents before their
    children (`SchemaSpec.task_parents` / `task_order`); columns stay in declared task order. The
    product runs over the whole chain, so a child's probability never exceeds its parent's and the
    conditional towers are trained over all impressions (CTCVR-style), not only the parent's positives.
    """
    p = torch.sigmoid(logits)
    if all(q < 0 for q in parents):
        return p
    cols: list[Tensor | None] = [None] * len(parents)
    for t in order:
        col = p[:, t : t + 1]
        parent_col = cols[parents[t]] if parents[t] >= 0 else None
        cols[t] = col if parent_col is None else parent_col * col
    return torch.cat([c for c in cols if c is not None], dim=-1)


class Scorer(nn.Module):
    """The exact search unit's value projection + feature interaction + task heads, on pooled dense inputs.

    This is the exported part: its inputs are the schema's `scorer_inputs` (`input_names`), its
    output the task probabilities in declared task order. The side inputs, when the schema has
    them, follow the base inputs positionally: `side_ids` [B, n_ids] int64 (codes already offset
    into one table), then `side_values` [B, n_values] float32 (already normalized).
    """

    def __init__(self, cfg: ModelConfig, spec: SchemaSpec) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_tasks = len(spec.tasks)
        self.input_names: tuple[str, ...] = spec.scorer_inputs
        self.task_parents: tuple[int, ...] = spec.task_parents()
        self.task_order: tuple[int, ...] = spec.task_order()
        self.n_side_ids = spec.side.n_ids
        self.n_side_values = spec.side.n_values
        self.attention = TargetAttention(
            cfg.attn_dim, cfg.repr_dim, cfg.n_heads, spec.n_actions, spec.time_gap_buckets
        )
        self.weekday_emb = SmallEmbedding(spec.weekday_buckets, cfg.weekday_dim)
        n_dense = spec.n_history_features
        self.dense_norm = nn.BatchNorm1d(n_dense)
        # one table for every categorical side feature: each feature's codes sit at its own offset
        self.side_emb: nn.Embedding | None = None
        if self.n_side_ids:
            self.side_emb = nn.Embedding(spec.side.table_rows, cfg.side_dim)
            nn.init.normal_(self.side_emb.weight, std=0.05)
        n_fields = self.n_side_ids + self.n_side_values
        self.numeric_emb: NumericEmbedding | None = None
        n_interaction_inputs = 0
        if cfg.side_interactions and n_fields > 1:
            if self.n_side_values:
                self.numeric_emb = NumericEmbedding(self.n_side_values, cfg.numeric_buckets, cfg.side_dim)
            n_interaction_inputs = self.n_side_values * cfg.side_dim + n_fields * (n_fields - 1) // 2
        self.side_interactions = n_interaction_inputs > 0
        left, right = pair_indices(n_fields if self.side_interactions else 0)
        self.pair_left: Tensor
        self.pair_right: Tensor
        self.register_buffer("pair_left", left, persistent=False)  # constants, not weights: not in checkpoints
        self.register_buffer("pair_right", right, persistent=False)
        in_dim = (
            cfg.repr_dim * 5 + cfg.user_dim + n_dense + cfg.weekday_dim + spec.n_cross_features
            + self.n_side_ids * cfg.side_dim + self.n_side_values + n_interaction_inputs
        )
        self.heads = HEADS[cfg.heads](in_dim, self.n_tasks, cfg)

    def forward(
        self,
        cand_repr: Tensor,
        cand_cross: Tensor,
        long_pooled: Tensor,
        long_attended: Tensor,
        short_pooled: Tensor,
        short_attended: Tensor,
        user_repr: Tensor,
        user_dense: Tensor,
        weekday: Tensor,
        *side: Tensor,
    ) -> Tensor:
        expected = int(self.n_side_ids > 0) + int(self.n_side_values > 0)
        if len(side) != expected:
            raise TypeError(f"the scorer takes {list(self.input_names)}: {len(side)} side inputs given, not {expected}")
        long_interest = self.attention.project(long_pooled, long_attended)
        short_interest = self.attention.project(short_pooled, short_attended)
        parts = [
            cand_repr,
            long_interest,
            short_interest,
            cand_repr * long_interest,
            cand_repr * short_interest,
            cand_cross,
            user_repr,
            self.dense_norm(user_dense),
            self.weekday_emb(weekday),
        ]
        fields: list[Tensor] = []
        if self.side_emb is not None:
            side_ids = side[0]
            id_fields = self.side_emb(side_ids)  # [B, n_ids, side_dim]
            parts.append(id_fields.reshape(side_ids.shape[0], self.n_side_ids * self.cfg.side_dim))
            fields.append(id_fields)
        if self.n_side_values:
            side_values = side[-1]
            parts.append(side_values)
            if self.numeric_emb is not None:
                value_fields = self.numeric_emb(side_values)  # [B, n_values, side_dim]
                parts.append(value_fields.reshape(side_values.shape[0], self.n_side_values * self.cfg.side_dim))
                fields.append(value_fields)
        if self.side_interactions:
            parts.append(pairwise_dots(torch.cat(fields, dim=1), self.pair_left, self.pair_right))
        logits = self.heads(torch.cat(parts, dim=-1))
        if not self.cfg.esmm:
            return torch.sigmoid(logits)
        return esmm_probs(logits, self.task_parents, self.task_order)


@dataclass
class Batch:
    """Training/evaluation inputs as dense indices (right-aligned histories, newest last)."""

    user: Tensor  # [B]
    item: Tensor  # [B]
    category: Tensor  # [B]
    cand_cross: Tensor  # [B, C] schema.cross_features of the candidate against the history
    hist_item: Tensor  # [B, L]
    hist_category: Tensor  # [B, L]
    hist_action: Tensor  # [B, L]
    hist_gap: Tensor  # [B, L]
    hist_mask: Tensor  # [B, L] float
    user_dense: Tensor  # [B, D]
    weekday: Tensor  # [B]
    side_ids: Tensor | None = None  # [B, n_ids] int64, offsets applied; when the schema has categorical side features
    side_values: Tensor | None = None  # [B, n_values] float32, normalized; when it has numeric ones


class RankingModel(nn.Module):
    """Tables + GSU + Scorer. `forward(batch)` gives task probabilities [B, T]."""

    def __init__(self, cfg: ModelConfig, spec: SchemaSpec, n_users: int, n_items: int, n_categories: int) -> None:
        super().__init__()
        self.cfg = cfg
        sparse = cfg.sparse_embeddings
        # DARE: attention tables (retrieval metric) and representation tables are separate.
        self.attn_item = nn.Embedding(n_items, cfg.attn_dim, sparse=sparse)
        self.attn_category = nn.Embedding(n_categories, cfg.attn_dim, sparse=sparse)
        self.repr_item = nn.Embedding(n_items, cfg.repr_dim, sparse=sparse)
        self.repr_category = nn.Embedding(n_categories, cfg.repr_dim, sparse=sparse)
        self.repr_user = nn.Embedding(n_users, cfg.user_dim, sparse=sparse)
        for table in (self.attn_item, self.attn_category, self.repr_item, self.repr_category, self.repr_user):
            nn.init.normal_(table.weight, std=0.05)
        # TWIN key/query projections; linear without bias, so keys of (item + category) rows
        # decompose into precomputable per-item and per-category parts.
        self.key_proj = nn.Linear(cfg.attn_dim, cfg.attn_dim, bias=False)
        self.query_proj = nn.Linear(cfg.attn_dim, cfg.attn_dim, bias=False)
        self.scorer = Scorer(cfg, spec)

    def embedding_tables(self) -> dict[str, nn.Embedding]:
        return {
            "attn_item": self.attn_item,
            "attn_category": self.attn_category,
            "repr_item": self.repr_item,
            "repr_category": self.repr_category,
            "repr_user": self.repr_user,
        }

    def keys(self, item: Tensor, category: Tensor) -> Tensor:
        key: Tensor = self.key_proj(self.attn_item(item)) + self.key_proj(self.attn_category(category))
        return key

    def queries(self, item: Tensor, category: Tensor) -> Tensor:
        query: Tensor = self.query_proj(self.attn_item(item)) + self.query_proj(self.attn_category(category))
        return query

    def reprs(self, item: Tensor, category: Tensor) -> Tensor:
        rep: Tensor = self.repr_item(item) + self.repr_category(category)
        return rep

    def gsu_scores(self, key: Tensor, query: Tensor, action: Tensor, gap: Tensor) -> Tensor:
        """The GSU relevance of every behaviour [B, L]: ESU logits summed over heads."""
        return self.scorer.attention.logits(key, query, action, gap).sum(-1)

    def scorer_inputs(self, batch: Batch) -> dict[str, Tensor]:
        """Gather and retrieve: the exact inputs the exported scorer receives.

        The GSU scores all L behaviours without gradients; only the candidate, the k retrieved
        and the S most recent behaviours are embedded again with gradients (TWIN trains the
        shared metric through the ESU), in one lookup per table, which keeps the autograd graph
        at B x (1 + k + S) rather than B x L.
        """
        cfg = self.cfg
        b, length = batch.hist_item.shape
        s = min(cfg.short_length, length)
        if cfg.use_retrieval:
            k = min(cfg.retrieval_k, length)
            with torch.no_grad():
                query = self.queries(batch.item, batch.category)
                hist_key = self.keys(batch.hist_item, batch.hist_category)
                relevance = self.gsu_scores(hist_key, query, batch.hist_action, batch.hist_gap)
                relevance = relevance.masked_fill(batch.hist_mask == 0, float("-inf"))
                top = torch.topk(relevance, k, dim=1).indices  # [B, k]
            pick = torch.cat([top, torch.arange(length - s, length).expand(b, s)], dim=1)
        else:  # DIN-short: recent behaviours only
            k = 0
            pick = torch.arange(length - s, length).expand(b, s)

        def take(t: Tensor) -> Tensor:
            return torch.gather(t, 1, pick)

        # one lookup per table for [candidate | retrieved | recent]
        item = torch.cat([batch.item[:, None], take(batch.hist_item)], dim=1)
        category = torch.cat([batch.category[:, None], take(batch.hist_category)], dim=1)
        attn_item, attn_category = self.attn_item(item), self.attn_category(category)
        key = self.key_proj(attn_item) + self.key_proj(attn_category)
        repr_ = self.repr_item(item) + self.repr_category(category)
        mask = take(batch.hist_mask)
        folded_key, folded_repr = self.scorer.attention.behaviours(
            key[:, 1:], repr_[:, 1:], take(batch.hist_action), take(batch.hist_gap)
        )
        query = self.query_proj(attn_item[:, 0]) + self.query_proj(attn_category[:, 0])
        n_heads = cfg.n_heads
        if k:
            long_pooled, long_attended = attention_pool(folded_key[:, :k], folded_repr[:, :k], mask[:, :k], query,
                                                        n_heads)
        else:  # DIN-short: nothing retrieved
            long_pooled = folded_repr.new_zeros(b, n_heads, cfg.repr_dim)
            long_attended = mask.new_zeros(b, 1)
        short_pooled, short_attended = attention_pool(folded_key[:, k:], folded_repr[:, k:], mask[:, k:], query,
                                                      n_heads)
        out = {
            "cand_repr": repr_[:, 0],
            "cand_cross": batch.cand_cross,
            "long_pooled": long_pooled,
            "long_attended": long_attended,
            "short_pooled": short_pooled,
            "short_attended": short_attended,
        }
        out |= {
            "user_repr": self.repr_user(batch.user),
            "user_dense": batch.user_dense,
            "weekday": batch.weekday,
        }
        for name, value in (("side_ids", batch.side_ids), ("side_values", batch.side_values)):
            if name in self.scorer.input_names:
                if value is None:
                    raise ValueError(f"the schema has side features but the batch has no {name}")
                out[name] = value
        return out

    def forward(self, batch: Batch) -> Tensor:
        inputs = self.scorer_inputs(batch)
        return self.scorer(*(inputs[name] for name in self.scorer.input_names))  # type: ignore[no-any-return]

    @torch.no_grad()
    def precomputed_tables(self) -> dict[str, Tensor]:
        """The tables a bundle ships: TWIN-precomputed keys/queries and DARE representations."""
        att = self.scorer.attention
        event_bias, event_repr = att.event_tables()
        tables = {
            "item_key": self.key_proj(self.attn_item.weight),
            "category_key": self.key_proj(self.attn_category.weight),
            "item_query": self.query_proj(self.attn_item.weight),
            "category_query": self.query_proj(self.attn_category.weight),
            "item_repr": self.repr_item.weight,
            "category_repr": self.repr_category.weight,
            "user_repr": self.repr_user.weight,
            # GSU bias, summed over heads (the service folds it into an extra key column)
            "gsu_action_bias": att.action_bias.weight.sum(-1),
            "gsu_gap_bias": att.gap_bias.weight.sum(-1),
            # the ESU's per-behaviour event parts by code action * n_gaps + gap (TargetAttention.behaviours)
            "event_key_bias": event_bias,
            "event_repr": event_repr,
        }
        return {name: t.detach().clone() for name, t in tables.items()}
