"""Per-user behaviour clustering for the `twin_v2` retrieval strategy (TWIN-V2, CIKM 2024).

A behaviour's GSU score is key·q/√d_h + b_act[action] + b_gap[gap bucket] (`service.assemble`
folds the bias into an extra key column), and the bias carries most of the score's variance. So
each user's behaviours are first partitioned by that bias, as the serving path computes it at the
clustering time (the user's newest event by default: same action and gap-bucket bias, same part),
and each part is clustered by its GSU keys (the bundle's `item_key[item] + category_key[category]`)
with faiss k-means, size-capped: about `sqrt(L)` events per cluster, every cluster larger than
`max_size` events split again by k-means (hierarchically), and as a last resort (one key
repeated more than `max_size` times) cut into chunks of consecutive events. Every cluster is
homogeneous in bias at the clustering time, so at serving the centroid of its augmented keys
ranks it by bias first. The result, one cluster id per event, is stored beside the sequence
(`feature_store.codecs`, key `rs:<ver>:{u<user>}:clu`) with a fingerprint of the four tables it
depends on (`key_fingerprint`) and each cluster's centroid (mean augmented key at the clustering
time); at serving `service.retrieval.TwinV2Retriever` scores the clusters and searches the
members of the best ones. The streaming consumer gives each new event the id of its nearest
centroid (`nearest_centroid`), so fresh behaviour is clustered without clustering again.

faiss is imported lazily (it is in the serving install); numpy otherwise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_store.codecs import FINGERPRINT_SIZE, MAX_CLUSTERS, encode_clusters
from feature_store.schema import time_gap_bucket

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

_SAMPLE_ROWS = 4096


def key_fingerprint(item_key: npt.NDArray[Any], category_key: npt.NDArray[Any],
                    *bias_tables: npt.NDArray[Any]) -> bytes:
    """8 bytes identifying a bundle's GSU tables: shapes, dtypes and a strided sample of rows.

    A clustering depends on the key tables and on the bias tables (`gsu_action_bias`,
    `gsu_gap_bias`, passed after them), so the stored fingerprint and the serving bundle's
    (`service.assemble.Tables.key_fingerprint`) cover all four. Cheap on memory-mapped
    million-row tables (at most ~8,000 rows per table are read). A clustering is valid for
    exactly the tables it was computed with; a retrained bundle changes the sampled rows.
    """
    h = hashlib.blake2b(digest_size=FINGERPRINT_SIZE)
    for table in (item_key, category_key, *bias_tables):
        h.update(f"{table.dtype.str}{tuple(table.shape)}".encode())
        n = table.shape[0]
        if n:
            step = max(1, n // _SAMPLE_ROWS)
            h.update(np.ascontiguousarray(table[::step]).tobytes())
            h.update(np.ascontiguousarray(table[n - 1]).tobytes())
    return h.digest()


def history_keys(item_key: npt.NDArray[Any], category_key: npt.NDArray[Any], item: I64, category: I64) -> F32:
    """GSU keys [L, A] of a history as `service.assemble` gathers them (out-of-table ids read row 0)."""
    item = np.where((item >= 0) & (item < item_key.shape[0]), item, 0)
    category = np.where((category >= 0) & (category < category_key.shape[0]), category, 0)
    out: F32 = np.asarray(item_key[item] + category_key[category], dtype=np.float32)
    return out


def history_bias(action_bias: npt.NDArray[Any], gap_bias: npt.NDArray[Any], action: I64, timestamp: I64,
                 now: int) -> F32:
    """Per-behaviour GSU bias [L] at time `now`, the float32 `service.assemble` puts in the last key column.

    b_act[action] + b_gap[time_gap_bucket(now - timestamp)], with as many gap buckets as `gap_bias`
    has rows (out-of-table actions read row 0).
    """
    action = np.where((action >= 0) & (action < action_bias.shape[0]), action, 0)
    gap = time_gap_bucket(now - np.asarray(timestamp, dtype=np.int64), int(gap_bias.shape[0]))
    out: F32 = np.asarray(action_bias[action] + gap_bias[gap], dtype=np.float32)
    return out


@dataclass(frozen=True)
class ClusterParams:
    """How a history is clustered.

    target_size: events per cluster (default round(sqrt(L)), at least 16); max_size: the cap on
    a cluster's events (default 2 * target_size); niter: k-means iterations; seed: k-means seed
    (same keys and seed: same clustering); min_events: shorter histories are not clustered
    (exact search over them is cheap).
    """

    target_size: int | None = None
    max_size: int | None = None
    niter: int = 12
    seed: int = 0
    min_events: int = 256

    def __post_init__(self) -> None:
        if self.target_size is not None and self.target_size < 1:
            raise ValueError(f"target_size must be >= 1, got {self.target_size}")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {self.max_size}")
        if self.niter < 1:
            raise ValueError(f"niter must be >= 1, got {self.niter}")

    def sizes(self, n_events: int) -> tuple[int, int]:
        """(target, cap) events per cluster for a history of n_events."""
        target = self.target_size or max(16, round(math.sqrt(n_events)))
        cap = self.max_size or 2 * target
        # never more clusters than the u16 ids can name
        floor = -(-n_events // (MAX_CLUSTERS - 1))
        return max(target, floor), max(cap, target, floor)


def _kmeans(points: F32, weights: npt.NDArray[np.float32], n: int, niter: int, seed: int) -> I64:
    """Assignment of each point to one of n weighted k-means centroids (faiss)."""
    import faiss

    if points.shape[0] <= n:
        return np.arange(points.shape[0], dtype=np.int64)
    d = points.shape[1]
    clus = faiss.Clustering(d, n)
    clus.niter = niter
    clus.seed = seed
    clus.min_points_per_centroid = 1  # no warnings for small histories
    clus.max_points_per_centroid = 1 << 30  # no subsampling: the assignment must cover every point
    index = faiss.IndexFlatL2(d)
    clus.train(points, index, weights)
    _, assign = index.search(points, 1)
    return np.asarray(assign[:, 0], dtype=np.int64)


def cluster_keys(keys: F32, params: ClusterParams | None = None) -> tuple[I32, int]:
    """(cluster id per key [L] int32, number of clusters) of one history's keys [L, d].

    Every key gets a cluster, no cluster has more than the cap's events, and the result depends
    only on the keys and the seed. Identical keys (a repeated behaviour) are clustered once, with
    their count as k-means weight.
    """
    p = params or ClusterParams()
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n_events = keys.shape[0]
    if n_events == 0:
        return np.zeros(0, dtype=np.int32), 0
    target, cap = p.sizes(n_events)
    distinct, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    weights = counts.astype(np.float32)
    n_first = max(1, -(-n_events // target))
    d_assign = _kmeans(distinct, weights, n_first, p.niter, p.seed)
    # hierarchical split of clusters over the cap (by events), a few levels deep
    for level in range(8):
        sizes = np.bincount(d_assign, weights=counts)
        big = np.flatnonzero(sizes > cap)
        if big.size == 0:
            break
        next_id = int(d_assign.max()) + 1
        for c in big.tolist():
            members = np.flatnonzero(d_assign == c)
            if members.shape[0] < 2:
                continue  # one key repeated: chunked below
            parts = max(2, -(-int(sizes[c]) // target))
            sub = _kmeans(distinct[members], weights[members], parts, p.niter, p.seed + 1 + level)
            if np.unique(sub).shape[0] < 2:
                continue
            d_assign[members] = np.where(sub == 0, c, next_id + sub - 1)
            next_id += int(sub.max())
    assign = d_assign[inverse]
    # last resort: cut what is still over the cap into runs of consecutive events
    sizes = np.bincount(assign)
    next_id = int(assign.max()) + 1
    for c in np.flatnonzero(sizes > cap).tolist():
        rows = np.flatnonzero(assign == c)
        for start in range(cap, rows.shape[0], cap):
            assign[rows[start : start + cap]] = next_id
            next_id += 1
    # compact ids 0..C-1, numbered by first appearance in the history (deterministic)
    _, first, compact = np.unique(assign, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    out = rank[compact.reshape(-1)].astype(np.int32)
    n_clusters = int(first.shape[0])
    if n_clusters > MAX_CLUSTERS:
        raise ValueError(f"{n_clusters} clusters exceed {MAX_CLUSTERS}; raise target_size")
    return out, n_clusters


def cluster_parts(keys: F32, part: npt.NDArray[Any], params: ClusterParams | None = None) -> tuple[I32, int]:
    """`cluster_keys` within each part (events with equal `part` [L] values, e.g. equal bias).

    No cluster mixes parts; the target and cap sizes are those of the whole history, so a part
    smaller than the target is one cluster. Ids 0..C-1, numbered by first appearance.
    """
    p = params or ClusterParams()
    n_events = keys.shape[0]
    if n_events == 0:
        return np.zeros(0, dtype=np.int32), 0
    target, cap = p.sizes(n_events)
    inner = ClusterParams(target_size=target, max_size=cap, niter=p.niter, seed=p.seed, min_events=0)
    _, part_of = np.unique(part, return_inverse=True)
    part_of = part_of.reshape(-1)
    order = np.argsort(part_of, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(part_of[order]) != 0, True])
    assign = np.empty(n_events, dtype=np.int64)
    next_id = 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        rows = order[a:b]  # ascending: a part's events in history order
        if rows.shape[0] <= target:
            assign[rows] = next_id
            next_id += 1
            continue
        sub, n_sub = cluster_keys(np.ascontiguousarray(keys[rows]), inner)
        assign[rows] = sub + next_id
        next_id += n_sub
    _, first, compact = np.unique(assign, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    n_clusters = int(first.shape[0])
    if n_clusters > MAX_CLUSTERS:
        raise ValueError(f"{n_clusters} clusters exceed {MAX_CLUSTERS}; raise target_size")
    return rank[compact.reshape(-1)].astype(np.int32), n_clusters


class UserClusterer:
    """Clusters histories with one bundle's GSU tables (the ingest side of `twin_v2`).

    Events are partitioned by their GSU bias at the clustering time (`history_bias`), then
    clustered by key within each part (`cluster_parts`). `fingerprint` covers the four tables.
    """

    def __init__(self, item_key: npt.NDArray[Any], category_key: npt.NDArray[Any], action_bias: npt.NDArray[Any],
                 gap_bias: npt.NDArray[Any], params: ClusterParams | None = None) -> None:
        self.item_key = item_key
        self.category_key = category_key
        self.action_bias = action_bias
        self.gap_bias = gap_bias
        self.params = params or ClusterParams()
        self.fingerprint = key_fingerprint(item_key, category_key, action_bias, gap_bias)

    @classmethod
    def from_tables(cls, tables: Any, params: ClusterParams | None = None) -> UserClusterer:
        """From anything with `item_key`, `category_key`, `gsu_action_bias`, `gsu_gap_bias` (e.g. `Tables`)."""
        return cls(tables.item_key, tables.category_key, tables.gsu_action_bias, tables.gsu_gap_bias, params)

    def cluster(self, item: I64, category: I64, action: I64, timestamp: I64, now: int | None = None,
                ) -> tuple[I32, int] | None:
        """(cluster ids, number of clusters) of a history (dense indices), None when too short.

        `now`: the clustering time the gap buckets are taken at (default: the newest event's time).
        """
        result = self._cluster(item, category, action, timestamp, now)
        return None if result is None else (result[0], result[1])

    def _cluster(self, item: I64, category: I64, action: I64, timestamp: I64, now: int | None,
                 ) -> tuple[I32, int, F32, F32] | None:
        """(ids, number of clusters, keys, bias at the clustering time), None when too short."""
        if item.shape[0] < self.params.min_events:
            return None
        at = int(np.max(timestamp)) if now is None else int(now)
        bias = history_bias(self.action_bias, self.gap_bias, action, timestamp, at)
        keys = history_keys(self.item_key, self.category_key, item, category)
        assign, n_clusters = cluster_parts(keys, bias, self.params)
        return assign, n_clusters, keys, bias

    def encode(self, item: I64, category: I64, action: I64, timestamp: I64, now: int | None = None) -> bytes | None:
        """The stored cluster value of a history, centroids included (None when it is too short to cluster)."""
        result = self._cluster(item, category, action, timestamp, now)
        if result is None:
            return None
        assign, n_clusters, keys, bias = result
        means = centroids(np.column_stack([keys, bias]), assign, n_clusters)
        return encode_clusters(assign, n_clusters, self.fingerprint, means)

    def event_vectors(self, item: I64, category: I64, action: I64) -> F32:
        """Augmented keys [n, D] of new events: their GSU keys, and the bias of an event as old as
        the clustering time (gap 0), the frame the stored centroids were computed in."""
        zero_gap = np.zeros(action.shape[0], dtype=np.int64)
        bias = history_bias(self.action_bias, self.gap_bias, action, zero_gap, 0)
        return np.column_stack([history_keys(self.item_key, self.category_key, item, category), bias])


def centroids(vectors: F32, assign: I32, n_clusters: int) -> F32:
    """Mean of each cluster's rows [n_clusters, D] (float64 sums, float32 result)."""
    sums = np.zeros((n_clusters, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, assign, vectors)
    counts = np.bincount(assign, minlength=n_clusters).astype(np.float64)
    out: F32 = (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)
    return out


def nearest_centroid(means: npt.NDArray[Any], vectors: npt.NDArray[Any],
                     norms: npt.NDArray[np.float64] | None = None) -> I32:
    """Index of the nearest (L2, in float64) row of `means` [C, D] for each row of `vectors` [n, D];
    ties go to the lowest index. `norms`: the rows' squared norms, when the caller keeps them. A
    new event joins the cluster whose members it is most like, keys and bias together (the
    serving search splits a cluster by the current bias anyway)."""
    m = np.asarray(means, dtype=np.float64)
    sq = (m * m).sum(axis=1) if norms is None else norms
    out: I32 = np.argmin(sq[None, :] - 2.0 * (np.asarray(vectors, dtype=np.float64) @ m.T), axis=1).astype(np.int32)
    return out
