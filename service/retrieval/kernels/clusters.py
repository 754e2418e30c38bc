"""Cluster-probing top-k (`twin_v2`): each query scores the clusters, then searches the best ones.

`probe_topk` gets the keys grouped by cluster (columns of `keys_t` [d, N] in cluster order,
cluster c at offsets[c] .. offsets[c + 1]; the last segment, index C, holds the keys no cluster
covers and is always searched). Per query: cluster scores centroid·q + bias (bias = ln(size),
-inf for an empty cluster), the clusters in descending score until `n_probe` are taken and
together hold at least `min_rows` behaviours (`cover`), then the exact top-k over their keys
with the selection helpers of the exact kernel, so order and tie-breaking (lower `ids` first)
are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from service.retrieval.kernels.topk_ip import _emit_topk, _encode, _jit, _segment_scores

_TILE = 16  # queries per parallel work item


@_jit()
def group_by_cluster(keys: Any, cluster: Any, weight: Any, n_clusters: int, order: Any, offsets: Any, cover: Any,
                     centroids: Any) -> None:
    """Counting sort of the keys by cluster (stable) and each cluster's weighted mean key.

    cluster[g] in 0..n_clusters (n_clusters: not clustered), weight[g] = behaviours behind key g.
    Writes order [G] (key indices, cluster by cluster), offsets [C + 2], cover [C + 1] (behaviours
    per cluster) and centroids [C, d] (0 for an empty cluster).
    """
    n, d = keys.shape
    offsets[:] = 0
    cover[:] = 0
    sums = np.zeros((n_clusters + 1, d), np.float64)
    for g in range(n):
        c = cluster[g]
        offsets[c + 1] += 1
        w = weight[g]
        cover[c] += w
        for j in range(d):
            sums[c, j] += w * keys[g, j]
    for c in range(n_clusters + 1):
        offsets[c + 1] += offsets[c]
    fill = offsets[:-1].copy()
    for g in range(n):
        c = cluster[g]
        order[fill[c]] = g
        fill[c] += 1
    for c in range(n_clusters):
        inv = 1.0 / cover[c] if cover[c] > 0 else 0.0
        for j in range(d):
            centroids[c, j] = sums[c, j] * inv


@_jit()
def split_by_last_column(keys: Any, cluster: Any, n_clusters: int, limit: int, out: Any) -> int:
    """Split each cluster by the value of the keys' last column (the per-behaviour bias of `service.assemble`).

    cluster[g] in 0..n_clusters (n_clusters: not clustered). Writes out[g]: the id of (cluster, last
    column value) in 0..m-1, numbered by first appearance, and m for the keys no cluster covers;
    returns m, or -1 (out unspecified) when there would be more than `limit` parts.
    """
    n, d = keys.shape
    head = np.full(n_clusters, -1, np.int64)  # per cluster: a linked list of its parts
    value = np.empty(max(limit, 1), np.float32)
    nxt = np.empty(max(limit, 1), np.int64)
    m = 0
    for g in range(n):
        c = cluster[g]
        if c >= n_clusters:
            out[g] = -1
            continue
        v = keys[g, d - 1]
        s = head[c]
        while s >= 0 and value[s] != v:
            s = nxt[s]
        if s < 0:
            if m >= limit:
                return -1
            s = m
            value[s] = v
            nxt[s] = head[c]
            head[c] = s
            m += 1
        out[g] = s
    for g in range(n):
        if out[g] < 0:
            out[g] = m
    return m


@_jit(parallel=True)
def probe_topk(queries: Any, keys_t: Any, ids: Any, offsets: Any, centroids_t: Any, bias: Any, cover: Any,
               n_probe: int, min_rows: int, k: int, out_s: Any, out_i: Any) -> None:
    """Top-k per query over the tail and the best clusters; centroids_t [d, C], bias [C] (-inf: empty)."""
    n_queries, d = queries.shape
    n_clusters = centroids_t.shape[1]
    n_cols = keys_t.shape[1]
    longest = 1
    for c in range(n_clusters + 1):
        longest = max(longest, offsets[c + 1] - offsets[c])
    n_tiles = (n_queries + _TILE - 1) // _TILE
    for tile in prange(n_tiles):
        buf = np.empty(max(n_cols, 1), np.uint64)
        scores = np.empty(longest, np.float32)
        sbits = scores.view(np.uint32)
        cscore = np.empty(n_clusters, np.float32)
        tmp = np.empty(k, np.float32)
        tmp_bits = tmp.view(np.uint32)
        sort_tmp = np.empty(min(k, 128), np.uint64)
        for q in range(tile * _TILE, min(n_queries, (tile + 1) * _TILE)):
            cscore[:] = bias
            for j in range(d):
                a = queries[q, j]
                row = centroids_t[j]
                for c in range(n_clusters):
                    cscore[c] += a * row[c]
            m = 0
            covered = cover[n_clusters]
            probed = 0
            first = True  # the tail segment first, then clusters best first (picked by a max scan)
            while True:
                if first:
                    c = n_clusters
                    first = False
                else:
                    if probed >= n_probe and covered >= min_rows:
                        break
                    c = 0
                    best = cscore[0]
                    for t in range(1, n_clusters):
                        if cscore[t] > best:
                            best = cscore[t]
                            c = t
                    if best == -np.inf:
                        break
                    cscore[c] = -np.inf
                    covered += cover[c]
                    probed += 1
                s0 = offsets[c]
                n = offsets[c + 1] - s0
                if n == 0:
                    continue
                _segment_scores(queries, q, keys_t, s0, n, scores)
                for i in range(n):
                    buf[m + i] = _encode(sbits, i, ids[s0 + i])
                m += n
            _emit_topk(buf, m, k, sort_tmp, tmp, tmp_bits, out_s, out_i, q)
