"""Per-request history kernels of the scorer's input assembly (numba).

`attention_pool` is `models.model.attention_pool` (TWIN's target attention up to the value
projection) over behaviour rows read in place: each candidate's retrieved rows are indices into
the history's distinct rows, so no [B, k, A + H] or [B, k, R] block is gathered, and the work is
a few thousand FMAs per candidate instead of ONNX Runtime's per-candidate GEMM calls. Float32
throughout; it differs from the torch form only in summation order (the export parity tests
bound the end-to-end difference).

`cross_features` is `feature_store.schema.cross_features` (the numpy definition the offline
sample builder uses) computed with one hash pass over the history instead of a sort: the same
float64 arithmetic, rounded to float32 at the same point, so the values are bit-identical
(tests/unit/test_assembly_kernels.py checks them against the numpy definition).

`history_rows` builds the history's scorer rows and GSU keys once per distinct (item, category,
event) in one pass, bit-identical to the numpy gathers it replaced (tests/unit/test_export.py);
`candidate_rows` the candidates' query and representation rows, bit-identical to numpy's
gathers and sums (tests/unit/test_assembly_kernels.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.retrieval.kernels.grouped import _EMPTY, _GOLDEN, _U29
from service.retrieval.kernels.topk_ip import _jit

# the pooling's dot products and sums may be reordered (vectorized): the result is still the same on
# every call for the same inputs, and the export parity tolerance (1e-5) bounds the difference
_REASSOCIATE = {"contract", "reassoc"}


@_jit(inline="always")
def _slot(item: int, mask: Any) -> Any:
    h = np.uint64(item) * _GOLDEN
    return (h ^ (h >> _U29)) & mask


@_jit()
def cross_features(hist_item: Any, hist_action: Any, hist_ts: Any, cand_item: Any, request_ts: int,
                   n_actions: int, out: Any) -> None:
    """out [B, n_actions + 2] float32 (zeroed here): each candidate's counts per action on its exact item
    (log1p), 1 if any, and log1p(hours since the latest event on it) / 10; item 0 (unknown) never matches.

    A table of the history's distinct items (open addressing) holds each item's counts and newest
    timestamp; candidates then look themselves up. Actions outside [0, n_actions) count for the
    "any" and newest-event columns only, as in the numpy definition.
    """
    n_hist = hist_item.shape[0]
    out[:, :] = 0.0
    if n_hist == 0:
        return
    size = 1
    while size < 2 * n_hist:
        size *= 2
    mask = np.uint64(size - 1)
    slot_item = np.full(size, _EMPTY, np.int64)
    counts = np.zeros((size, n_actions), np.int64)
    newest = np.empty(size, np.int64)
    for j in range(n_hist):
        item = hist_item[j]
        s = _slot(item, mask)
        while slot_item[s] != item and slot_item[s] != _EMPTY:
            s = (s + np.uint64(1)) & mask
        if slot_item[s] == _EMPTY:
            slot_item[s] = item
            newest[s] = hist_ts[j]
        elif hist_ts[j] > newest[s]:
            newest[s] = hist_ts[j]
        a = hist_action[j]
        if 0 <= a < n_actions:
            counts[s, a] += 1
    for b in range(cand_item.shape[0]):
        item = cand_item[b]
        if item == 0:
            continue
        s = _slot(item, mask)
        while slot_item[s] != item and slot_item[s] != _EMPTY:
            s = (s + np.uint64(1)) & mask
        if slot_item[s] == _EMPTY:
            continue
        for a in range(n_actions):
            c = counts[s, a]
            if c:
                out[b, a] = math.log1p(float(c))
        out[b, n_actions] = 1.0
        hours = max(request_ts - newest[s], 0) / 3600.0
        out[b, n_actions + 1] = math.log1p(hours) / 10.0


@_jit()
def attention_logits(key: Any, rows: Any, query: Any, n_heads: int, logits: Any, attended: Any) -> None:
    """The target attention's logits, shifted by their max: logits[b, h, j] = key[g_j] · q̃_bh - max_j (...).

    key [D, A + H] (A attention columns, then one bias column per head) are the folded behaviour
    rows; rows [N, K] holds each candidate's rows (N = B, or N = 1: the same rows for every
    candidate), -1 for padding, whose logit is -inf; query [B, A]; q̃_bh is head h's part of
    query b scaled by 1/√(A / H). logits [B, H, K]; attended [B, 1] is 1 when any row is real.
    The candidate's rows are copied transposed ([A + H, K], once when they are shared), so the
    dot products run across the slots: each logit's own operations stay in the scalar order
    (bit-identical results) while the slots fill the vector lanes. The exponentials are left to
    numpy, whose exp is vectorized (a scalar expf per weight cost more than the rest of the pooling).
    """
    n_cand, a_dim = query.shape
    n_slots = rows.shape[1]
    n_cols = key.shape[1]
    dh = a_dim // n_heads
    scale = np.float32(1.0 / math.sqrt(dh))
    qs = np.empty(a_dim, np.float32)
    key_t = np.empty((n_cols, n_slots), np.float32)
    shared = rows.shape[0] == 1
    n_real = 0
    for b in range(n_cand):
        r = rows[0] if shared else rows[b]
        if b == 0 or not shared:
            n_real = 0
            for j in range(n_slots):
                g = r[j]
                if g >= 0:
                    n_real += 1
                    for c in range(n_cols):
                        key_t[c, j] = key[g, c]
                else:  # padding (its logit is -inf): no row to read, an empty history has none
                    for c in range(n_cols):
                        key_t[c, j] = 0.0
        for c in range(a_dim):
            qs[c] = query[b, c] * scale
        for h in range(n_heads):
            out = logits[b, h]
            out[:] = 0.0
            for c in range(h * dh, (h + 1) * dh):
                q = qs[c]
                for j in range(n_slots):
                    out[j] += key_t[c, j] * q
            top = np.float32(-np.inf)
            for j in range(n_slots):
                if r[j] < 0:
                    out[j] = -np.inf
                else:
                    out[j] += key_t[a_dim + h, j]
                    top = max(top, out[j])
            if n_real:
                for j in range(n_slots):
                    out[j] -= top
        attended[b, 0] = 1.0 if n_real else 0.0


@_jit(fastmath=_REASSOCIATE)
def attention_sum(rep: Any, rows: Any, weights: Any, pooled: Any) -> None:
    """pooled[b, h] = Σ_j weights[b, h, j] rep[g_j] / Σ_j weights[b, h, j] (0 where no row is real).

    rep [D, R] are the folded representation rows, rows [N, K] as in `attention_logits`, weights
    [B, H, K] the exponentials of its logits (0 for padding), pooled [B, H, R]. One head at a time,
    summed straight into its output row: the compiler keeps that row in registers across the
    slots (a third faster than all heads per slot through a scratch array).
    """
    n_cand, n_heads, n_slots = weights.shape
    r_dim = rep.shape[1]
    for b in range(n_cand):
        r = rows[0] if rows.shape[0] == 1 else rows[b]
        out = pooled[b]
        out[:, :] = 0.0
        for h in range(n_heads):
            total = np.float32(0.0)
            for j in range(n_slots):
                total += weights[b, h, j]
            if total <= 0:
                continue
            inv = np.float32(1.0) / total
            for j in range(n_slots):
                g = r[j]
                if g < 0:
                    continue
                w = weights[b, h, j] * inv
                for c in range(r_dim):
                    out[h, c] += w * rep[g, c]


@_jit(inline="always")
def _mix(h: Any, word: Any) -> Any:
    h = (h ^ np.uint64(word)) * _GOLDEN
    return h ^ (h >> _U29)


@_jit()
def _gap_bucket(gap_seconds: int, n_buckets: int) -> Any:
    """`feature_store.schema.time_gap_bucket` of one gap, in integers: the largest b < n_buckets with
    2^b - 1 <= hours, i.e. 3600 (2^b - 1) <= seconds. The float form is exact at every boundary (there
    1 + hours is a power of two) and a second off a boundary moves it by 1/3600, so the two agree for
    every gap between u32 timestamps (further out float64 can no longer tell a second from none)."""
    bucket = 0
    while bucket + 1 < n_buckets and 3600 * ((1 << (bucket + 1)) - 1) <= gap_seconds:
        bucket += 1
    return bucket


@_jit()
def history_rows(item: Any, category: Any, action: Any, timestamp: Any, request_ts: int, n_buckets: int,
                 item_key: Any, item_repr: Any, category_key: Any, category_repr: Any, event_key_bias: Any,
                 event_repr: Any, gsu_action_bias: Any, gsu_gap_bias: Any, key_scale: Any,
                 item_out: Any, category_out: Any, group: Any, first: Any, key: Any, rep: Any, gsu_keys: Any) -> Any:
    """Every behaviour's scorer rows, built once per distinct (item, category, event) in one pass.

    The history's items and categories clamped to the tables (an id past a table's end is the OOV
    row 0: `item_out`, `category_out`), each behaviour's event code (action x n_buckets + its time-gap
    bucket at `request_ts`), the distinct triples (`group` [L]: each behaviour's, ids in order of
    first appearance; `first`: each triple's first behaviour), and per triple g, in the model's
    float order: key[g] = [item_key + category_key, event_key_bias], rep[g] = item_repr +
    category_repr + event_repr, and, when `gsu_keys` has rows, the GSU key [key[g, :A] x key_scale,
    gsu_action_bias[action] + gsu_gap_bias[gap]]. Returns the number of triples, or -1 - j when
    behaviour j's action has no row in the tables (a store written with another schema).
    """
    n = item.shape[0]
    n_items, n_categories = item_key.shape[0], category_key.shape[0]
    n_actions = gsu_action_bias.shape[0]
    a_dim, n_heads = item_key.shape[1], event_key_bias.shape[1]
    event = np.empty(n, np.int64)
    for j in range(n):
        it, cat, act = item[j], category[j], action[j]
        item_out[j] = it if 0 <= it < n_items else 0
        category_out[j] = cat if 0 <= cat < n_categories else 0
        if not 0 <= act < n_actions:
            return -1 - j
        event[j] = act * n_buckets + _gap_bucket(max(request_ts - timestamp[j], 0), n_buckets)
    size = 1
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    table = np.full(size, _EMPTY, np.int64)
    n_triples = 0
    for j in range(n):
        it, cat, ev = item_out[j], category_out[j], event[j]
        s = _mix(_mix(_mix(np.uint64(3), it), cat), ev) & mask
        while True:
            g = table[s]
            if g == _EMPTY:
                table[s] = n_triples
                group[j] = n_triples
                first[n_triples] = j
                n_triples += 1
                break
            f = first[g]
            if item_out[f] == it and category_out[f] == cat and event[f] == ev:
                group[j] = g
                break
            s = (s + np.uint64(1)) & mask
    with_gsu = gsu_keys.shape[0] > 0
    for g in range(n_triples):  # independent iterations: the cold table reads overlap
        f = first[g]
        it, cat, ev = item_out[f], category_out[f], event[f]
        for c in range(a_dim):
            key[g, c] = item_key[it, c] + category_key[cat, c]
        for h in range(n_heads):
            key[g, a_dim + h] = event_key_bias[ev, h]
        for c in range(rep.shape[1]):
            rep[g, c] = (item_repr[it, c] + category_repr[cat, c]) + event_repr[ev, c]
        if with_gsu:
            for c in range(a_dim):
                gsu_keys[g, c] = key[g, c] * key_scale
            gsu_keys[g, a_dim] = gsu_action_bias[action[f]] + gsu_gap_bias[ev - action[f] * n_buckets]
    return n_triples


@_jit()
def candidate_rows(cand_item: Any, cand_category: Any, item_query: Any, category_query: Any, item_repr: Any,
                   category_repr: Any, query: Any, rep: Any) -> None:
    """query[b] = item_query[i_b] + category_query[c_b] and rep[b] = item_repr[i_b] + category_repr[c_b],
    in one pass over the candidates (ids already clamped to the tables): the numpy gathers and sums,
    bit for bit, without their four [B, W] temporaries (0.07-0.12 ms where they took 0.18-0.32)."""
    for b in range(cand_item.shape[0]):
        it, cat = cand_item[b], cand_category[b]
        for c in range(query.shape[1]):
            query[b, c] = item_query[it, c] + category_query[cat, c]
        for c in range(rep.shape[1]):
            rep[b, c] = item_repr[it, c] + category_repr[cat, c]
