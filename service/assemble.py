"""Build the scorer's inputs for one request: gather from memory-mapped tables, retrieve, pool.

This is the online twin of `RankingModel.scorer_inputs` (models/model.py): the same tables, the
same GSU metric, the same derived features (`feature_store.schema`), the same target-attention
pooling, in numpy and numba, without torch. The GSU's per-behaviour bias is folded into one
extra key column, so retrieval is a plain inner-product top-k over [L, A + 1] keys:

    s_j = k_j·q/√d_h + b_act[a_j] + b_gap[g_j] = [k_j/√d_h, b_j] · [q, 1]

The history's rows are built once per distinct (item, category, event); retrieval searches
those, and the pooling kernel reads each candidate's retrieved and recent rows from them in place.

A schema with side features adds `side_ids` and `side_values` (`SchemaSpec.scorer_inputs`): the
user's codes and values (the store's profile tail) broadcast, each candidate's (the store's item
rows), then the request context's broadcast; codes offset into the one side embedding table. A
user without a tail and items the store does not hold get the encoded defaults of their group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from feature_store.clusters import key_fingerprint
from feature_store.codecs import Sequence, SequenceClusters, decode_side
from feature_store.schema import SchemaSpec, history_features, weekday
from feature_store.spec import SideFeatures
from service.retrieval import RetrievalContext, Retriever
from service.retrieval.base import DistinctKeys

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
BOOL = npt.NDArray[np.bool_]

DEFAULT_SPEC = SchemaSpec()  # the built-in click/cart/fav/buy schema: no side features


@dataclass(frozen=True)
class RetrievalSettings:
    """The bundle's retrieval settings (manifest "retrieval")."""

    k: int
    head_dim: int
    short_length: int
    use_retrieval: bool
    time_gap_buckets: int

    @classmethod
    def from_manifest(cls, retrieval: dict[str, object], time_gap_buckets: int) -> RetrievalSettings:
        return cls(
            k=int(retrieval["k"]),  # type: ignore[call-overload]
            head_dim=int(retrieval["head_dim"]),  # type: ignore[call-overload]
            short_length=int(retrieval["short_length"]),  # type: ignore[call-overload]
            use_retrieval=bool(retrieval["use_retrieval"]),
            time_gap_buckets=time_gap_buckets,
        )


@dataclass(frozen=True)
class Tables:
    """The bundle's memory-mapped tables (see export/bundle.py TABLE_NAMES)."""

    item_key: F32
    category_key: F32
    item_query: F32
    category_query: F32
    item_repr: F32
    category_repr: F32
    user_repr: F32
    gsu_action_bias: F32
    gsu_gap_bias: F32
    event_key_bias: F32
    event_repr: F32

    @classmethod
    def from_dict(cls, tables: dict[str, F32]) -> Tables:
        return cls(**{name: tables[name] for name in cls.__dataclass_fields__})

    @cached_property
    def key_fingerprint(self) -> bytes:
        """Identity of the GSU key and bias tables (twin_v2 checks a stored clustering against it)."""
        return key_fingerprint(self.item_key, self.category_key, self.gsu_action_bias, self.gsu_gap_bias)

    def clamp_rows(self, item: I64, category: I64) -> tuple[I64, I64]:
        """Indices past a table's end (ids newer than the bundle's vocabulary) become OOV 0."""
        item = np.where((item >= 0) & (item < self.item_key.shape[0]), item, 0)
        category = np.where((category >= 0) & (category < self.category_key.shape[0]), category, 0)
        return item, category


def _retrieve(
    retriever: Retriever, queries: F32, keys: DistinctKeys, k: int, key_category: I64, query_category: I64,
    user_index: int, clusters: SequenceClusters | None = None, tables: Tables | None = None,
) -> tuple[F32, I64]:
    """`retriever.search` over every behaviour's key, with the categories (sim_hard) and clusters
    (twin_v2) when it reads them; strategies that read neither get the distinct keys as they are."""
    if not retriever.uses_context:  # exact, faiss, numpy, eta: queries and keys are all they need
        return retriever.search_distinct(queries, keys, k)
    fingerprint = tables.key_fingerprint if clusters is not None and tables is not None else None
    context = RetrievalContext(key_category=key_category, query_category=query_category, user_index=user_index,
                               clusters=clusters, key_fingerprint=fingerprint)
    return retriever.search(queries, keys.expanded(), k, context)


@dataclass(frozen=True)
class HistoryRows:
    """Every behaviour's scorer rows, stored once per distinct (item, category, event).

    `key` [D, A + H] and `rep` [D, R] are the distinct rows; `group` [L] is the distinct row of
    every behaviour and `first` [D] the first behaviour of each distinct row (the identity when no
    behaviour repeats). `gsu_keys` [D, A + 1] are the distinct rows' GSU keys (no rows when the
    bundle retrieves nothing); `item` and `category` [L] the history's ids clamped to the tables.
    """

    key: F32
    rep: F32
    group: I64
    first: I64
    gsu_keys: F32
    item: I64
    category: I64


def _history_rows(tables: Tables, settings: RetrievalSettings, history: Sequence, request_ts: int) -> HistoryRows:
    """Every behaviour's scorer rows and GSU keys, once per distinct triple (`kernels.history.history_rows`).

    A row is the item row plus the category row, with the behaviour's event (action and time-gap
    bucket) folded in as `TargetAttention.behaviours` does: the event's per-head bias as H extra
    key columns, its embedding added to the representation, in the model's float order (so the
    rows are bit-identical to its). The GSU key folds the GSU's per-behaviour bias into one extra
    column: [k/√d_h, b_act[a] + b_gap[g]]. Lifelong histories repeat the same (item, category,
    event) many times (60-80% of a 10,000-event synthetic history), so one pass finds the distinct
    triples and reads the million-row tables once per triple; retrieval searches the distinct keys
    (`DistinctKeys`) without expanding them.
    """
    from service.retrieval.kernels import history as kernels  # loads (or compiles) on first use

    length = len(history)
    a_dim, n_heads = tables.item_key.shape[1], tables.event_key_bias.shape[1]
    item = np.empty(length, dtype=np.int64)
    category = np.empty(length, dtype=np.int64)
    group = np.empty(length, dtype=np.int64)
    first = np.empty(length, dtype=np.int64)
    key = np.empty((length, a_dim + n_heads), dtype=np.float32)
    rep = np.empty((length, tables.item_repr.shape[1]), dtype=np.float32)
    gsu_keys = np.empty((length if settings.use_retrieval else 0, a_dim + 1), dtype=np.float32)
    n_distinct = int(kernels.history_rows(
        np.ascontiguousarray(history.item, dtype=np.int64), np.ascontiguousarray(history.category, dtype=np.int64),
        np.ascontiguousarray(history.action, dtype=np.int64), np.ascontiguousarray(history.timestamp, dtype=np.int64),
        int(request_ts), settings.time_gap_buckets, tables.item_key, tables.item_repr, tables.category_key,
        tables.category_repr, tables.event_key_bias, tables.event_repr, tables.gsu_action_bias, tables.gsu_gap_bias,
        np.float32(1.0 / math.sqrt(settings.head_dim)), item, category, group, first, key, rep, gsu_keys,
    ))
    if n_distinct < 0:
        j = -1 - n_distinct
        raise IndexError(f"behaviour {j} has action code {int(history.action[j])}, which the bundle's "
                         f"{tables.gsu_action_bias.shape[0]} actions do not have: the store holds another schema")
    return HistoryRows(key[:n_distinct], rep[:n_distinct], group, first[:n_distinct],
                       gsu_keys[:n_distinct], item, category)


def _candidate_rows(tables: Tables, cand_item: I64, cand_category: I64) -> tuple[F32, F32]:
    """Each candidate's attention query and representation (item row + category row; ids clamped)."""
    from service.retrieval.kernels import history as kernels  # loads (or compiles) on first use

    n_cand = cand_item.shape[0]
    query = np.empty((n_cand, tables.item_query.shape[1]), dtype=np.float32)
    rep = np.empty((n_cand, tables.item_repr.shape[1]), dtype=np.float32)
    kernels.candidate_rows(np.ascontiguousarray(cand_item, dtype=np.int64),
                           np.ascontiguousarray(cand_category, dtype=np.int64), tables.item_query,
                           tables.category_query, tables.item_repr, tables.category_repr, query, rep)
    return query, rep


def _cross_features(hist_item: I64, hist_action: npt.NDArray[np.integer], hist_ts: npt.NDArray[np.integer],
                    cand_item: I64, request_ts: int, n_actions: int) -> F32:
    """`feature_store.schema.cross_features`, bit for bit, by the numba kernel (one hash pass, no sort)."""
    from service.retrieval.kernels import history as kernels  # loads (or compiles) on first use

    out = np.empty((cand_item.shape[0], n_actions + 2), dtype=np.float32)
    kernels.cross_features(np.ascontiguousarray(hist_item, dtype=np.int64),
                           np.ascontiguousarray(hist_action, dtype=np.int64),
                           np.ascontiguousarray(hist_ts, dtype=np.int64),
                           np.ascontiguousarray(cand_item, dtype=np.int64), int(request_ts), n_actions, out)
    return out


def _attention_pool(rows: HistoryRows, slots: I64, query: F32) -> tuple[F32, F32]:
    """`models.model.attention_pool` over the rows `slots` [B or 1, K] (-1: padding) of `rows`: [B, H, R], [B, 1]."""
    from service.retrieval.kernels import history as kernels  # loads (or compiles) on first use

    n_cand = query.shape[0]
    n_heads = rows.key.shape[1] - query.shape[1]  # the folded keys' extra columns: one bias per head
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    weights = np.empty((n_cand, n_heads, slots.shape[1]), dtype=np.float32)
    attended = np.empty((n_cand, 1), dtype=np.float32)
    kernels.attention_logits(rows.key, slots, query, n_heads, weights, attended)
    np.exp(weights, out=weights)  # softmax numerators (padding: exp(-inf) = 0)
    pooled = np.empty((n_cand, n_heads, rows.rep.shape[1]), dtype=np.float32)
    kernels.attention_sum(rows.rep, slots, weights, pooled)
    return pooled, attended


def _broadcast(row: npt.NDArray[np.generic], n: int) -> npt.NDArray[np.generic]:
    """`n` copies of `row` along a new first axis, as one contiguous array (ORT wants contiguous)."""
    return np.ascontiguousarray(np.broadcast_to(row, (n, *row.shape)))


# -- side features ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SideRows:
    """One request's side features for one model, as fetched and encoded, before assembly.

    `user_tail`: the store's user side bytes (`FetchResult.user_side`; empty: no profile, the
    defaults). `item_rows`: the store's item side rows [n, W] (`FetchResult.item_side`; None: all
    defaults), with `item_found` [n] (False: the item is unknown to the store, its row is not data).
    `context`: the request context encoded with the model's schema (`encode_context`; None: the
    defaults).
    """

    user_tail: bytes = b""
    item_rows: U8 | None = None
    item_found: BOOL | None = None
    context: tuple[I64, F32] | None = None

    def rows(self, lo: int, hi: int) -> SideRows:
        """The same request restricted to candidates [lo, hi) (shadow steps score slices)."""
        return SideRows(
            self.user_tail,
            self.item_rows[lo:hi] if self.item_rows is not None else None,
            self.item_found[lo:hi] if self.item_found is not None else None,
            self.context,
        )


def side_inputs(side: SideFeatures, rows: SideRows | None, n_cand: int) -> dict[str, npt.NDArray[np.generic]]:
    """`side_ids` [B, n_ids] int64 (offsets applied) and `side_values` [B, n_values] float32, as present.

    Columns in the scorer's order: user, item, context (categorical for ids, numeric for values).
    Store tails are `feature_store.codecs` side tails (per-feature codes, then normalized values);
    a tail whose width is not the schema's raises `CodecError` (a store written with another
    schema, which the registry's schema-hash check keeps from serving). Whole-array numpy only:
    no per-candidate Python. Everything derived from the schema (`side.default_rows`, the offsets)
    is computed once per schema object, not per request.
    """
    rows = rows or SideRows()
    (u_ids, u_vals), (i_ids, i_vals), (c_ids, c_vals) = side.default_rows
    n_ui, n_uv = int(u_ids.shape[0]), int(u_vals.shape[0])
    n_ii, n_iv = int(i_ids.shape[0]), int(i_vals.shape[0])
    if rows.user_tail and (n_ui or n_uv):  # b"": no profile (or one without a tail): the defaults
        u_ids, u_vals = decode_side(rows.user_tail, n_ui, n_uv)
    item_ids: npt.NDArray[np.int64] | None = None
    item_vals: F32 | None = None
    # rows of width 0: the store found none of the candidates (or holds no item tails): the defaults
    if rows.item_rows is not None and rows.item_rows.shape[1] and (n_ii or n_iv):
        item_ids, item_vals = decode_side(rows.item_rows, n_ii, n_iv)
        if rows.item_found is not None and not rows.item_found.all():
            missing = ~rows.item_found
            item_ids = np.where(missing[:, None], i_ids[None, :], item_ids)
            item_vals = np.where(missing[:, None], i_vals[None, :], item_vals)
    if rows.context is not None:
        c_ids, c_vals = rows.context
    out: dict[str, npt.NDArray[np.generic]] = {}
    if side.n_ids:
        ids = np.empty((n_cand, side.n_ids), dtype=np.int64)
        ids[:, :n_ui] = u_ids
        ids[:, n_ui : n_ui + n_ii] = i_ids if item_ids is None else item_ids
        ids[:, n_ui + n_ii :] = c_ids
        ids += side.id_offsets
        out["side_ids"] = ids
    if side.n_values:
        values = np.empty((n_cand, side.n_values), dtype=np.float32)
        values[:, :n_uv] = u_vals
        values[:, n_uv : n_uv + n_iv] = i_vals if item_vals is None else item_vals
        values[:, n_uv + n_iv :] = c_vals
        out["side_values"] = values
    return out


# -- the scorer's inputs --------------------------------------------------------------------------------


def scorer_inputs(
    tables: Tables,
    settings: RetrievalSettings,
    retriever: Retriever,
    history: Sequence,
    user_index: int,
    cand_item: I64,
    cand_category: I64,
    request_ts: int,
    *,
    spec: SchemaSpec = DEFAULT_SPEC,
    side: SideRows | None = None,
    lap: Callable[[str], None] | None = None,
) -> dict[str, npt.NDArray[np.generic]]:
    """Inputs for scoring `cand_item` for one user; `history` holds only events before `request_ts`.

    `spec` is the bundle's schema (its actions size the derived features; its side features add
    `side_ids` / `side_values`, from `side` or, without it, the defaults). The result holds exactly
    `spec.scorer_inputs`. `lap(part)`, when given, is called as each part ends (a benchmark's timer).
    """
    lap = lap or _no_lap
    n_cand = int(cand_item.shape[0])
    cand_item, cand_category = tables.clamp_rows(cand_item, cand_category)
    length = len(history)
    # gather the history's rows once: candidates retrieve overlapping behaviours, and indexing a
    # cache-resident [D, R] array is far cheaper than B*k random reads of the million-row tables
    rows = _history_rows(tables, settings, history, request_ts)
    lap("history rows")
    query, cand_repr = _candidate_rows(tables, cand_item, cand_category)  # [B, A], [B, R]
    lap("candidate rows")
    a_dim = query.shape[1]
    if settings.use_retrieval and length:
        queries_aug = np.ones((n_cand, a_dim + 1), dtype=np.float32)
        queries_aug[:, :a_dim] = query
        _, idx = _retrieve(retriever, queries_aug, DistinctKeys(rows.gsu_keys, rows.group, rows.first), settings.k,
                           rows.category, cand_category, user_index, history.clusters, tables)
        # each slot's distinct row, -1 for padding: a history shorter than k, or a strategy that pads
        # (sim_hard with fallback=pad); np.take alone would read -1 as the last behaviour
        retrieved = np.take(rows.group, idx) if idx.min(initial=0) >= 0 else np.where(idx >= 0, rows.group[idx], -1)
        lap("retrieval")
        long_pooled, long_attended = _attention_pool(rows, retrieved, query)
    else:  # no long-term retrieval (DIN-short bundles) or an empty history: nothing attended
        long_pooled, long_attended = _attention_pool(rows, np.full((1, 1), -1, dtype=np.int64), query)
    lap("pooling, retrieved rows")

    # the most recent behaviours, identical for every candidate
    s = min(settings.short_length, length)
    recent = rows.group[length - s : length].reshape(1, s) if s else np.full((1, 1), -1, dtype=np.int64)
    short_pooled, short_attended = _attention_pool(rows, np.ascontiguousarray(recent), query)
    lap("pooling, recent rows")
    n_actions = spec.n_actions
    cand_cross = _cross_features(rows.item, history.action, history.timestamp, cand_item, request_ts, n_actions)
    lap("cross features")

    user_row = user_index if 0 <= user_index < tables.user_repr.shape[0] else 0
    inputs: dict[str, npt.NDArray[np.generic]] = {
        "cand_repr": cand_repr,
        "cand_cross": cand_cross,
        "long_pooled": long_pooled,
        "long_attended": long_attended,
        "short_pooled": short_pooled,
        "short_attended": short_attended,
        "user_repr": _broadcast(np.asarray(tables.user_repr[user_row], dtype=np.float32), n_cand),
        "user_dense": _broadcast(history_features(history.action, n_actions), n_cand),
        "weekday": np.full(n_cand, int(weekday(request_ts)), dtype=np.int64),
    }
    if spec.side.n_ids or spec.side.n_values:
        inputs.update(side_inputs(spec.side, side, n_cand))
    lap("user features, side features")
    return inputs


def _no_lap(part: str) -> None:
    """`scorer_inputs`' lap when no one times it."""
