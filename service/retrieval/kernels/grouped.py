"""Kernels over groups of keys: duplicate removal for exact top-k, and per-query key segments (SIM hard search).

* `unique_rows` + `group_members`: lifelong histories repeat behaviours (the same item, action and
  time-gap bucket give bit-identical GSU keys; 60-80% of a 10,000-event synthetic history), so
  the exact top-k can run over the unique keys and expand each chosen key to its behaviours
  (`expand_topk`), with exactly the result of a search over all keys (same scores, ties by lower
  index): see `service.retrieval.ExactRetriever`.
* `segment_topk`: each query searches only its own contiguous segment of the keys (the history
  sorted by category), for `sim_hard`.

The selection helpers (`_encode`, `_select`, `_sort`, `_decode`) are those of the exact kernel
(`service.retrieval.kernels.topk_ip`), so order and tie-breaking are identical. numba's on-disk cache does
not notice changes in another module: after editing those helpers, clear `__pycache__` here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from service.retrieval.kernels.topk_ip import _decode, _emit_topk, _encode, _jit, _segment_scores, _select, _sort

_EMPTY = np.int64(-1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U29 = np.uint64(29)
_U32 = np.uint64(32)
_TILE = 16  # queries per parallel work item


@_jit()
def unique_rows(bits: Any, group: Any, first: Any) -> int:
    """Bit-identical rows of `bits` [L, d] (uint32 view of float32 keys).

    Writes group[j] = id of row j's distinct value (ids in order of first appearance) and
    first[g] = the lowest row index of group g; returns the number of groups. Open addressing on
    a 64-bit hash of the row, rows compared word by word on a hash match, so it is exact.
    """
    n, d = bits.shape
    size = 1
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    table = np.full(size, _EMPTY, np.int64)  # slot -> group id
    hashes = np.empty(n, np.uint64)
    n_groups = 0
    # hash a few words only (the first ones and the last, which holds the behaviour bias in the
    # service's keys): a serial multiply chain over all d words cost 4x more, and rows that agree
    # on these words but not on the rest are resolved by the full comparison below
    n_hashed = min(d, 4)
    for j in range(n):
        h = np.uint64(d)
        for c in range(n_hashed):
            h = (h ^ np.uint64(bits[j, c])) * _GOLDEN
            h ^= h >> _U29
        h = (h ^ np.uint64(bits[j, d - 1])) * _GOLDEN
        h ^= h >> _U29
        hashes[j] = h
        slot = h & mask
        while True:
            g = table[slot]
            if g == _EMPTY:
                table[slot] = n_groups
                group[j] = n_groups
                first[n_groups] = j
                n_groups += 1
                break
            f = first[g]
            if hashes[f] == h:
                same = True
                for c in range(d):
                    if bits[f, c] != bits[j, c]:
                        same = False
                        break
                if same:
                    group[j] = g
                    break
            slot = (slot + np.uint64(1)) & mask
    return n_groups


@_jit()
def group_members(group: Any, n_groups: int, offsets: Any, members: Any) -> None:
    """CSR of the groups: members[offsets[g]:offsets[g + 1]] = rows of group g, ascending."""
    n = group.shape[0]
    offsets[:] = 0
    for j in range(n):
        offsets[group[j] + 1] += 1
    for g in range(n_groups):
        offsets[g + 1] += offsets[g]
    fill = offsets[:n_groups].copy()
    for j in range(n):
        g = group[j]
        members[fill[g]] = j
        fill[g] += 1


@_jit()  # serial: a query's expansion is cheaper than waking a second thread for a parallel region
def expand_topk(u_scores: Any, u_idx: Any, offsets: Any, members: Any, k: int, out_s: Any, out_i: Any) -> None:
    """Top-k behaviours from the top-k' distinct keys of each query (`ExactRetriever` with dedup).

    u_scores/u_idx [B, k'] are the exact top-k' over the distinct keys (descending, ties by
    group id = by first row). Walking them in order, each group adds its first k rows (later rows
    of a group can never beat them: same score, higher index) until k rows are collected and the
    next group scores strictly lower; a final select + sort by (score, row) then orders the rows
    exactly as a search over all keys would, interleaving rows of equal-scoring groups by index.
    """
    n_queries, kk = u_idx.shape
    n_tiles = (n_queries + _TILE - 1) // _TILE
    for tile in range(n_tiles):
        # scratch once per tile of queries: allocating it per query cost as much as the expansion
        buf = np.empty(k * (kk + 1), np.uint64)
        tmp = np.empty(k, np.float32)
        sort_tmp = np.empty(min(k, 128), np.uint64)
        for q in range(tile * _TILE, min(n_queries, (tile + 1) * _TILE)):
            _expand_one(u_scores, u_idx, offsets, members, k, out_s, out_i, q, buf, tmp, sort_tmp)


@_jit(inline="always")
def _expand_one(u_scores: Any, u_idx: Any, offsets: Any, members: Any, k: int, out_s: Any, out_i: Any, q: int,
                buf: Any, tmp: Any, sort_tmp: Any) -> None:
    """Expand query q (see `expand_topk`) using the caller's scratch buffers."""
    kk = u_idx.shape[1]
    tmp_bits = tmp.view(np.uint32)
    bits = u_scores[q].view(np.uint32)
    m = 0
    tied = False
    for a in range(kk):
        g = u_idx[q, a]
        if g < 0:
            break
        if a > 0 and u_scores[q, a] == u_scores[q, a - 1]:
            tied = True
        elif m >= k:
            break
        lo = offsets[g]
        hi = min(offsets[g + 1], lo + k)
        for t in range(lo, hi):
            buf[m] = _encode(bits, a, members[t])
            m += 1
    if tied:  # rows of equal-scoring groups interleave by index: select and sort them
        if m > k:
            _select(buf, m, k)
            m = k
        _sort(buf, m, sort_tmp)
    else:  # groups strictly descending, rows ascending inside each: already in order
        m = min(m, k)
    for a in range(m):
        out_i[q, a] = _decode(buf[a], tmp_bits, a)
        out_s[q, a] = tmp[a]
    for a in range(m, k):
        out_s[q, a] = -np.inf
        out_i[q, a] = -1


@_jit(parallel=True)
def segment_topk(queries: Any, keys_t: Any, rows: Any, seg_start: Any, seg_len: Any, k: int, out_s: Any,
                 out_i: Any) -> None:
    """Exact top-k of each query over its own segment of the keys (`sim_hard`).

    keys_t [d, L] are the keys transposed, columns in segment order (the history grouped by
    category), so scoring a segment is d unit-stride passes that vectorize; rows[j] is the
    original index of column j, used for the result and for ties (lower original index first).
    Query q searches columns seg_start[q] .. seg_start[q] + seg_len[q] - 1; seg_len[q] < 0 skips
    the query (its output rows are left untouched: the caller fills them another way).
    """
    n_queries = queries.shape[0]
    longest = 1
    for q in range(n_queries):
        longest = max(longest, seg_len[q])
    n_tiles = (n_queries + _TILE - 1) // _TILE
    for tile in prange(n_tiles):
        buf = np.empty(longest, np.uint64)
        scores = np.empty(longest, np.float32)
        sbits = scores.view(np.uint32)
        tmp = np.empty(k, np.float32)
        tmp_bits = tmp.view(np.uint32)
        sort_tmp = np.empty(min(k, 128), np.uint64)
        for q in range(tile * _TILE, min(n_queries, (tile + 1) * _TILE)):
            n = seg_len[q]
            if n < 0:
                continue
            s0 = seg_start[q]
            _segment_scores(queries, q, keys_t, s0, n, scores)
            for j in range(n):
                buf[j] = _encode(sbits, j, rows[s0 + j])
            _emit_topk(buf, n, k, sort_tmp, tmp, tmp_bits, out_s, out_i, q)
