"""twin_v2: ingest-time behaviour clustering, the stored value's codec, the cluster retriever, its
fallbacks and metric, and ranking through the core with it.

Random data with a fresh seed per run (printed in failures; RETRIEVAL_TEST_SEED replays one).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_store import keys
from feature_store.clusters import (
    ClusterParams,
    UserClusterer,
    cluster_keys,
    cluster_parts,
    history_bias,
    history_keys,
    key_fingerprint,
    nearest_centroid,
)
from feature_store.codecs import (
    CLUSTER_HEADER_SIZE,
    ClusterHeader,
    CodecError,
    Sequence,
    SequenceClusters,
    align_clusters,
    cluster_stamp,
    decode_centroids,
    decode_cluster_header,
    decode_clusters,
    encode_clusters,
)
from service import retrieval
from service.retrieval import (
    RetrievalContext,
    TwinV2Retriever,
    check_against_reference,
    fallback_counts,
    make_retriever,
    parse_strategy,
    recall_at_k,
)

SEED = int(os.environ.get("RETRIEVAL_TEST_SEED", int(np.random.SeedSequence().entropy) % 2**32))  # type: ignore[arg-type]
FP = b"12345678"


def clustered_history(case: int, n_keys: int, n_distinct: int, n_modes: int = 12, dim: int = 16
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Keys [L, dim] from n_distinct rows around n_modes centres (with repeats), and queries near them."""
    rng = np.random.default_rng([SEED, case])
    centres = rng.standard_normal((n_modes, dim)).astype(np.float32) * 2
    pool = centres[rng.integers(0, n_modes, n_distinct)] + rng.standard_normal((n_distinct, dim)).astype(np.float32)
    keys_ = np.ascontiguousarray(pool[rng.integers(0, n_distinct, n_keys)])
    queries = pool[rng.integers(0, n_distinct, 64)] + rng.standard_normal((64, dim)).astype(np.float32)
    return keys_, queries.astype(np.float32)


def augment(keys_: np.ndarray, queries: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The bias column of service.assemble: keys get a per-behaviour bias, queries a 1."""
    rng = np.random.default_rng([SEED, seed])
    bias = rng.standard_normal((keys_.shape[0], 1)).astype(np.float32) * 0.1
    return (np.concatenate([keys_ / 4, bias], 1).astype(np.float32),
            np.concatenate([queries, np.ones((queries.shape[0], 1), np.float32)], 1))


# -- clustering ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_keys", "n_distinct", "params"), [
    (10_000, 2_500, ClusterParams()),
    (3_000, 3_000, ClusterParams(target_size=40, max_size=60)),
    (2_000, 1, ClusterParams()),  # one behaviour repeated: only chunking can cap it
    (500, 7, ClusterParams(target_size=10)),
    (1, 1, ClusterParams()),
])
def test_clusters_cover_every_event_with_capped_sizes(n_keys: int, n_distinct: int, params: ClusterParams) -> None:
    keys_, _ = clustered_history(1, n_keys, n_distinct)
    assign, n_clusters = cluster_keys(keys_, params)
    _, cap = params.sizes(n_keys)
    assert assign.shape == (n_keys,) and assign.dtype == np.int32
    assert assign.min() == 0 and assign.max() == n_clusters - 1
    sizes = np.bincount(assign)
    assert (sizes > 0).all() and sizes.max() <= cap, f"seed {SEED}: sizes up to {sizes.max()}, cap {cap}"
    assert n_clusters >= -(-n_keys // cap)
    # identical keys share a cluster unless the cap forced a split
    if n_distinct > 1 and n_keys >= 1000:
        first: dict[bytes, set[int]] = {}
        for row, c in zip(map(bytes, keys_), assign.tolist(), strict=True):
            first.setdefault(row, set()).add(c)
        assert np.mean([len(v) == 1 for v in first.values()]) > 0.95


def test_clustering_is_deterministic_with_a_seed_and_numbered_by_first_appearance() -> None:
    keys_, _ = clustered_history(2, 4_000, 1_200)
    a1, c1 = cluster_keys(keys_, ClusterParams(seed=7))
    a2, c2 = cluster_keys(keys_.copy(), ClusterParams(seed=7))
    assert c1 == c2 and np.array_equal(a1, a2)
    _, first = np.unique(a1, return_index=True)
    assert np.all(np.diff(first) > 0)  # cluster c first appears before cluster c + 1
    assert cluster_keys(np.zeros((0, 4), np.float32)) [1] == 0


def test_clusters_group_similar_keys() -> None:
    """Well-separated modes: k-means keeps each cluster inside one mode."""
    rng = np.random.default_rng([SEED, 3])
    centres = rng.standard_normal((5, 8)).astype(np.float32) * 50
    mode = rng.integers(0, 5, 2_000)
    keys_ = (centres[mode] + rng.standard_normal((2_000, 8)).astype(np.float32)).astype(np.float32)
    assign, n = cluster_keys(keys_, ClusterParams(target_size=100))
    for c in range(n):
        assert np.unique(mode[assign == c]).shape[0] == 1


def _bias_tables(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([SEED, seed])
    return rng.standard_normal(4).astype(np.float32) * 0.05, rng.standard_normal(16).astype(np.float32) * 0.05


def test_user_clusterer_uses_the_bundle_tables_and_skips_short_histories() -> None:
    rng = np.random.default_rng([SEED, 4])
    item_key = rng.standard_normal((50, 4)).astype(np.float32)
    cat_key = rng.standard_normal((6, 4)).astype(np.float32)
    act_bias, gap_bias = _bias_tables(4)
    clusterer = UserClusterer(item_key, cat_key, act_bias, gap_bias, ClusterParams(min_events=100))
    zeros = np.zeros(10, np.int64)
    assert clusterer.encode(np.arange(10), zeros, zeros, zeros) is None
    item = rng.integers(0, 60, 400)  # ids past the table read row 0, as in service.assemble
    cat = rng.integers(0, 6, 400)
    action = rng.integers(0, 4, 400)
    ts = np.sort(rng.integers(1_600_000_000, 1_700_000_000, 400))
    np.testing.assert_array_equal(history_keys(item_key, cat_key, item, cat)[item >= 50],
                                  (item_key[0] + cat_key[cat[item >= 50]]))
    raw = clusterer.encode(item, cat, action, ts)
    assert raw is not None
    ids, n, fp = decode_clusters(raw)
    assert fp == key_fingerprint(item_key, cat_key, act_bias, gap_bias) == clusterer.fingerprint
    assert ids.shape == (400,) and ids.max() == n - 1
    # every cluster is homogeneous in the bias the serving path computes at the clustering time
    # (default: the newest event), the float32 of service.assemble's last key column
    from feature_store.schema import time_gap_bucket

    for now in (None, int(ts.max()) + 86_400):
        at = int(ts.max()) if now is None else now
        bias = act_bias[action] + gap_bias[time_gap_bucket(at - ts, 16)]
        np.testing.assert_array_equal(history_bias(act_bias, gap_bias, action, ts, at), bias)
        got = clusterer.cluster(item, cat, action, ts, now)
        assert got is not None
        for c in range(got[1]):
            assert np.unique(bias[got[0] == c]).shape[0] == 1


@pytest.mark.parametrize(("n_keys", "n_parts", "params"), [
    (10_000, 40, ClusterParams()), (3_000, 3, ClusterParams(target_size=40, max_size=60)), (500, 500, ClusterParams()),
    (2_000, 1, ClusterParams()),
])
def test_cluster_parts_never_mix_parts_and_cap_sizes(n_keys: int, n_parts: int, params: ClusterParams) -> None:
    rng = np.random.default_rng([SEED, 12])
    keys_, _ = clustered_history(12, n_keys, max(1, n_keys // 4))
    part = rng.integers(0, n_parts, n_keys).astype(np.float32) * 0.01  # bias-like values
    assign, n = cluster_parts(keys_, part, params)
    target, cap = params.sizes(n_keys)
    sizes = np.bincount(assign, minlength=n)
    assert assign.shape == (n_keys,) and n == assign.max() + 1 and (sizes > 0).all() and sizes.max() <= cap
    first = np.unique(assign, return_index=True)[1]
    assert (np.diff(first) > 0).all()  # numbered by first appearance
    for c in range(n):
        assert np.unique(part[assign == c]).shape[0] == 1
    for p in np.unique(part):  # a part no larger than the target is one cluster
        rows = part == p
        if rows.sum() <= target:
            assert np.unique(assign[rows]).shape[0] == 1
    a2, n2 = cluster_parts(keys_.copy(), part.copy(), params)
    assert n2 == n and np.array_equal(a2, assign)
    empty, n_empty = cluster_parts(np.zeros((0, 4), np.float32), np.zeros(0))
    assert empty.shape == (0,) and n_empty == 0


def test_key_fingerprint_changes_with_the_tables() -> None:
    rng = np.random.default_rng([SEED, 5])
    item_key = rng.standard_normal((10_000, 4)).astype(np.float32)
    cat_key = rng.standard_normal((6, 4)).astype(np.float32)
    act_bias, gap_bias = _bias_tables(5)
    fp = key_fingerprint(item_key, cat_key, act_bias, gap_bias)
    assert len(fp) == 8 and fp == key_fingerprint(item_key.copy(), cat_key.copy(), act_bias.copy(), gap_bias.copy())
    other = item_key.copy()
    other[::2] += 1e-3  # a retrained table changes its rows
    assert key_fingerprint(other, cat_key, act_bias, gap_bias) != fp
    assert key_fingerprint(item_key[:-1], cat_key, act_bias, gap_bias) != fp
    assert key_fingerprint(item_key, cat_key, act_bias, gap_bias + 1e-3) != fp  # the clustering depends on the biases
    assert key_fingerprint(item_key, cat_key) != fp


# -- codec and key -------------------------------------------------------------------------------------


def test_cluster_value_exact_bytes_and_roundtrip() -> None:
    raw = encode_clusters([0, 2, 1, 2], 3, FP)
    assert raw == b"RSC1" + FP + b"\x03\x00\x00\x00" + b"\x00\x00\x02\x00\x01\x00\x02\x00"
    ids, n, fp = decode_clusters(raw)
    assert ids.tolist() == [0, 2, 1, 2] and n == 3 and fp == FP
    for bad in ([0, 3], [-1]):
        with pytest.raises(CodecError):
            encode_clusters(bad, 3, FP)
    with pytest.raises(CodecError):
        encode_clusters([0], 0, FP)
    with pytest.raises(CodecError):
        encode_clusters([0], 1, b"short")
    with pytest.raises(CodecError):
        decode_clusters(b"XXXX" + bytes(12))
    with pytest.raises(CodecError):
        decode_clusters(raw + b"\x00")


def test_cluster_value_with_centroids_exact_bytes_and_roundtrip() -> None:
    means = np.array([[1.0, -2.0], [0.5, 0.25], [3.0, 4.0]], dtype=np.float32)
    raw = encode_clusters([0, 2, 1, 2], 3, FP, means)
    stamp = cluster_stamp(means)
    assert raw == (b"RSC2" + FP + b"\x03\x00\x02\x00" + stamp + means.astype("<f4").tobytes()
                   + b"\x00\x00\x02\x00\x01\x00\x02\x00")
    header = decode_cluster_header(raw[:CLUSTER_HEADER_SIZE])  # the header alone is enough
    assert header == ClusterHeader(FP, 3, 2, stamp, CLUSTER_HEADER_SIZE + 3 * 2 * 4)
    np.testing.assert_array_equal(decode_centroids(header, raw[CLUSTER_HEADER_SIZE:]), means)
    ids, n, fp = decode_clusters(raw)
    assert ids.tolist() == [0, 2, 1, 2] and n == 3 and fp == FP
    assert decode_cluster_header(encode_clusters([0], 1, FP)).width == 0  # the old format has no centroids
    assert cluster_stamp(means + 1e-6) != stamp
    with pytest.raises(CodecError):
        encode_clusters([0, 1], 2, FP, means)  # 3 centroids for 2 clusters
    with pytest.raises(CodecError):
        decode_centroids(header, raw[CLUSTER_HEADER_SIZE : CLUSTER_HEADER_SIZE + 8])  # truncated
    with pytest.raises(CodecError):
        decode_clusters(raw[: CLUSTER_HEADER_SIZE + 4])  # cut inside the centroids


def test_nearest_centroid_matches_brute_force_and_clusterer_centroids_are_member_means() -> None:
    rng = np.random.default_rng([SEED, 31])
    means = rng.standard_normal((37, 9)).astype(np.float32)
    vectors = rng.standard_normal((200, 9)).astype(np.float32)
    want = np.argmin(((vectors[:, None, :].astype(np.float64) - means[None].astype(np.float64)) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest_centroid(means, vectors), want)
    np.testing.assert_array_equal(nearest_centroid(means, means), np.arange(37))  # each centroid is its own nearest
    tied = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    assert nearest_centroid(tied, np.zeros((1, 2), dtype=np.float32)).tolist() == [0]  # a tie: the lowest id

    item_key = rng.standard_normal((60, 8)).astype(np.float32)
    cat_key = rng.standard_normal((7, 8)).astype(np.float32)
    act_bias, gap_bias = _bias_tables(5)
    clusterer = UserClusterer(item_key, cat_key, act_bias, gap_bias, ClusterParams(min_events=10, seed=1))
    n = 400
    item, category = rng.integers(0, 60, n), rng.integers(0, 7, n)
    action, ts = rng.integers(0, 4, n), np.sort(rng.integers(0, 10 * 86_400, n))
    value = clusterer.encode(item, category, action, ts)
    assert value is not None
    header = decode_cluster_header(value)
    ids, n_clusters, _ = decode_clusters(value)
    stored = decode_centroids(header, value[CLUSTER_HEADER_SIZE:])
    augmented = np.column_stack([history_keys(item_key, cat_key, item, category),
                                 history_bias(act_bias, gap_bias, action, ts, int(ts.max()))])
    assert header.width == augmented.shape[1] == 9 and n_clusters == stored.shape[0]
    for c in range(n_clusters):
        np.testing.assert_allclose(stored[c], augmented[ids == c].mean(axis=0), rtol=1e-5, atol=1e-6)
    # a new event is keyed like an event at the clustering time: its key, and the bias of gap 0
    vec = clusterer.event_vectors(item[:5], category[:5], action[:5])
    np.testing.assert_array_equal(vec[:, :8], augmented[:5, :8])
    np.testing.assert_allclose(vec[:, 8], act_bias[action[:5]] + gap_bias[0], rtol=1e-6)


def test_clusters_key_exact_bytes() -> None:
    assert keys.clusters_key("v1", 42) == b"rs:v1:{u42}:clu"


def test_align_clusters_with_the_newest_events() -> None:
    raw = encode_clusters([0, 1, 2, 0, 1], 3, FP)  # covers the 5 oldest of the stored events
    full = align_clusters(raw, stored_events=7, fetched_events=7)
    assert full is not None and full.assignment.tolist() == [0, 1, 2, 0, 1, -1, -1]
    newest = align_clusters(raw, stored_events=7, fetched_events=3)
    assert newest is not None and newest.assignment.tolist() == [1, -1, -1]  # stored positions 4..6
    none_covered = align_clusters(raw, stored_events=7, fetched_events=2)
    assert none_covered is not None and none_covered.assignment.tolist() == [-1, -1]
    assert align_clusters(None, 7, 7) is None
    assert align_clusters(raw, stored_events=4, fetched_events=4) is None  # longer than the sequence


def test_sequence_slices_carry_their_clusters() -> None:
    n = 6
    seq = Sequence(np.arange(n), np.arange(n), np.zeros(n, np.int64), np.arange(n) * 10)
    seq = seq.with_clusters(SequenceClusters(np.array([0, 0, 1, 1, 2, -1], np.int32), 3, FP))
    assert seq.before(35).clusters.assignment.tolist() == [0, 0, 1, 1]  # type: ignore[union-attr]
    assert seq.last(2).clusters.assignment.tolist() == [2, -1]  # type: ignore[union-attr]
    assert seq.before(1000).clusters is seq.clusters
    with pytest.raises(CodecError):
        seq.with_clusters(SequenceClusters(np.zeros(2, np.int32), 1, FP))


# -- retriever -----------------------------------------------------------------------------------------


def _context(assign: np.ndarray, n: int, fp: bytes | None = FP) -> RetrievalContext:
    return RetrievalContext(clusters=SequenceClusters(assign.astype(np.int32), n, FP), key_fingerprint=fp)


@pytest.mark.parametrize(("n_keys", "n_distinct", "k", "dedup"), [
    (10_000, 2_500, 64, True), (3_000, 3_000, 64, True), (2_000, 500, 64, False), (1_500, 40, 300, True),
])
def test_probing_every_cluster_is_exact(n_keys: int, n_distinct: int, k: int, dedup: bool) -> None:
    keys_, queries = clustered_history(6, n_keys, n_distinct)
    assign, n = cluster_keys(keys_)
    keys_aug, q = augment(keys_, queries)
    twin = TwinV2Retriever(n_probe=n, exact_below=0, dedup=dedup)
    s, i = twin.search(q, keys_aug, k, _context(assign, n))
    assert check_against_reference(q, keys_aug, k, s, i) == [], f"seed {SEED}"
    assert recall_at_k(q, keys_aug, k, i) == 1.0
    # the scores of exact, up to float32 summation order
    es, _ = make_retriever("exact").search(q, keys_aug, k)
    np.testing.assert_allclose(s, es, rtol=1e-5, atol=1e-5)


def test_few_probes_are_approximate_with_exact_scores_and_never_padding() -> None:
    keys_, queries = clustered_history(7, 10_000, 2_500)
    assign, n = cluster_keys(keys_)
    keys_aug, q = augment(keys_, queries)
    recalls = []
    for n_probe in (1, 4, 16):
        s, i = TwinV2Retriever(n_probe=n_probe, exact_below=0).search(q, keys_aug, 64, _context(assign, n))
        assert (i >= 0).all()  # L >= k: every slot is a behaviour (service.assemble relies on it)
        np.testing.assert_allclose(s, np.take_along_axis(q @ keys_aug.T, i, 1), rtol=1e-5, atol=1e-5)
        assert (np.diff(s, axis=1) <= 0).all()
        recalls.append(recall_at_k(q, keys_aug, 64, i))
    assert recalls == sorted(recalls) and recalls[-1] > 0.9, f"seed {SEED}: {recalls}"


def test_events_after_the_clustering_are_always_searched() -> None:
    keys_, queries = clustered_history(8, 3_000, 800)
    assign, n = cluster_keys(keys_[:2_000])
    keys_aug, q = augment(keys_, queries)
    keys_aug[2_500] = q[0] * 10  # a new behaviour, the best match of query 0
    full = np.concatenate([assign, np.full(1_000, -1, np.int32)])
    _, i = TwinV2Retriever(n_probe=1, exact_below=0).search(q, keys_aug, 8, _context(full, n))
    assert i[0, 0] == 2_500


def biased_history(case: int, n_keys: int = 10_000, shift_s: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A history whose GSU scores are dominated by the per-behaviour bias, as in the bench bundle.

    Returns the augmented keys [L, 17] and queries [64, 17] at a request `shift_s` seconds after the
    clustering time (the newest event plus 6 h), the ingest clustering (bias parts at the newest
    event, `UserClusterer`'s) and the key-only clustering of the first twin_v2 (`cluster_keys`).
    """
    from feature_store.schema import time_gap_bucket

    rng = np.random.default_rng([SEED, case])
    raw, queries = clustered_history(case, n_keys, n_keys // 4)
    act_bias, gap_bias = _bias_tables(case)
    action = rng.choice(4, n_keys, p=[0.94, 0.02, 0.02, 0.02])
    ts = np.sort(rng.integers(1_700_000_000 - 150 * 86_400, 1_700_000_000, n_keys))  # 150 days, as the bench's
    assign, n = cluster_parts(raw, history_bias(act_bias, gap_bias, action, ts, int(ts.max())))
    key_only, n_key_only = cluster_keys(raw)
    at = int(ts.max()) + 6 * 3600 + shift_s
    keys_aug = np.empty((n_keys, 17), np.float32)
    keys_aug[:, :16] = raw * 0.0002  # key term std ~0.1 of the bias's (0.05 on the bench bundle)
    keys_aug[:, 16] = act_bias[action] + gap_bias[time_gap_bucket(at - ts, 16)]
    q = np.ones((queries.shape[0], 17), np.float32)
    q[:, :16] = queries
    return keys_aug, q, np.stack([assign, np.full(n_keys, n)]), np.stack([key_only, np.full(n_keys, n_key_only)])


@pytest.mark.parametrize("shift_days", [0, 1, 7])
def test_bias_aware_clusters_reach_high_recall(shift_days: int) -> None:
    """Bias-dominated scores (the bench bundle's regime): clusters made of one bias part find the
    top-k in few probes, also days after the clustering; key-only clusters do not."""
    keys_aug, q, (assign, n), (key_only, n_key_only) = biased_history(13, shift_s=shift_days * 86_400)
    n, n_key_only = int(n[0]), int(n_key_only[0])
    got = {}
    for name, (a, c, n_probe, split) in {"bias_p32": (assign, n, 32, True), "bias_p8": (assign, n, 8, True),
                                         "bias_p8_nosplit": (assign, n, 8, False),
                                         "keys_p8": (key_only, n_key_only, 8, True)}.items():
        twin = TwinV2Retriever(n_probe=n_probe, exact_below=0, split_bias=split)
        s, i = twin.search(q, keys_aug, 64, _context(a, c))
        np.testing.assert_allclose(s, np.take_along_axis(q @ keys_aug.T, i, 1), rtol=1e-5, atol=1e-6)
        got[name] = recall_at_k(q, keys_aug, 64, i)
    assert got["bias_p32"] >= 0.95, f"seed {SEED}: {got}"
    # the failure mode of key-only clusters: below the bias-aware ones at the same probes, and far
    # below a full search. (An absolute bound of 0.7 failed on some draws: over 120 draws key-only
    # reached up to 0.74 while staying >= 0.04 below bias_p8 and >= 0.26 below bias_p32.)
    assert got["keys_p8"] < got["bias_p8"], f"seed {SEED}: {got}"
    assert got["keys_p8"] < got["bias_p32"] - 0.2, f"seed {SEED}: {got}"
    # (split vs no split at n_probe 8 is not compared: which one wins depends on the draw, e.g. seed
    # 3938135616 at 1 day: 0.89 split vs 0.94 not; the bench measures both on the standard workload)


def test_probing_every_stored_cluster_is_exact_when_parts_split() -> None:
    keys_aug, q, (assign, n), _ = biased_history(14, 3_000, shift_s=30 * 86_400)  # buckets drifted
    n_stored = int(n[0])
    s, i = TwinV2Retriever(n_probe=n_stored, exact_below=0).search(q, keys_aug, 64, _context(assign, n_stored))
    assert check_against_reference(q, keys_aug, 64, s, i) == [], f"seed {SEED}"
    assert recall_at_k(q, keys_aug, 64, i) == 1.0


def test_split_by_last_column() -> None:
    from service.retrieval.kernels.clusters import split_by_last_column

    keys_ = np.zeros((8, 3), np.float32)
    keys_[:, 2] = [0.5, 0.5, 0.25, 0.5, 0.25, 0.75, 0.5, 0.5]
    cluster = np.array([0, 0, 0, 1, 1, 1, 2, 3])  # 3: not clustered (n_clusters = 3)
    out = np.empty(8, np.int64)
    assert split_by_last_column(keys_, cluster, 3, 100, out) == 6
    assert out.tolist() == [0, 0, 1, 2, 3, 4, 5, 6]
    assert split_by_last_column(keys_, cluster, 3, 5, out) == -1  # over the limit: no split


def test_short_histories_pad_like_exact() -> None:
    keys_, queries = clustered_history(9, 20, 20)
    keys_aug, q = augment(keys_, queries)
    assign = np.arange(20) % 3
    s, i = TwinV2Retriever(n_probe=1, exact_below=0).search(q, keys_aug, 64, _context(assign, 3))
    assert check_against_reference(q, keys_aug, 64, s, i) == []  # too few behaviours: all of them, then padding
    s, i = TwinV2Retriever().search(q[:0], keys_aug, 8, _context(assign, 3))
    assert s.shape == (0, 8)
    s, i = TwinV2Retriever().search(q, keys_aug[:0], 8, RetrievalContext())
    assert (i == -1).all()


@pytest.mark.parametrize(("reason", "context", "n_keys"), [
    ("missing", RetrievalContext(), 2_000),
    ("stale", "stale", 2_000),
    ("misaligned", "misaligned", 2_000),
    ("missing", "unassigned", 2_000),
    ("short", RetrievalContext(), 500),
])
def test_fallbacks_are_exact_and_counted(reason: str, context: Any, n_keys: int) -> None:
    keys_, queries = clustered_history(10, n_keys, 600)
    keys_aug, q = augment(keys_, queries)
    assign = np.zeros(n_keys, np.int32)
    if context == "stale":
        context = _context(assign, 1, fp=b"otherfp!")
    elif context == "misaligned":
        context = _context(assign[:-1], 1)
    elif context == "unassigned":
        context = _context(assign - 1, 1)
    before = fallback_counts().get(("twin_v2", reason), 0)
    _, i = TwinV2Retriever().search(q, keys_aug, 16, context)
    assert fallback_counts()[("twin_v2", reason)] == before + 1
    _, ei = make_retriever("exact").search(q, keys_aug, 16)
    np.testing.assert_array_equal(i, ei)
    before = fallback_counts().get(("twin_v2", "missing"), 0)
    TwinV2Retriever().search(q, keys_aug, 16)  # no context at all
    assert fallback_counts()[("twin_v2", "missing")] == before + 1


def test_fallback_metric_is_exported() -> None:
    from service.observability.metrics import Metrics

    retrieval.count_fallback("twin_v2", "stale")
    text = Metrics().exposition().decode()
    assert 'rankserve_retrieval_fallback_total{reason="stale",strategy="twin_v2"}' in text


def test_registry_and_options() -> None:
    assert "twin_v2" in retrieval.available_retrievers()
    twin = make_retriever("twin_v2:n_probe=4,min_keys=256,size_bias=0.5,exact_below=0,split_bias=false")
    assert isinstance(twin, TwinV2Retriever) and twin.uses_context
    assert (twin.n_probe, twin.min_keys, twin.size_bias, twin.exact_below, twin.split_bias) == (4, 256, 0.5, 0, False)
    default = make_retriever("twin_v2")
    assert (default.size_bias, default.split_bias) == (0.0, True)  # type: ignore[attr-defined]
    assert parse_strategy("twin_v2:n_probe=2") == ("twin_v2", {"n_probe": 2})
    with pytest.raises(ValueError, match="n_probe"):
        make_retriever("twin_v2:n_probe=0")


# -- through the serving path --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import write_bundle
    from tests.helpers import tiny_model, tiny_schema

    root = tmp_path_factory.mktemp("twin")
    schema = tiny_schema()
    schema.save(root / "schema")
    write_bundle(tiny_model(schema), root / "schema", {}, root / "models", "tiny")
    return root / "models"


class _Store:
    """The one OnlineStore call the core makes, answering with a fixed clustered history."""

    def __init__(self, sequence: Sequence) -> None:
        self.sequence = sequence

    async def fetch(self, user_id: int, item_ids: Any, *args: Any, **kwargs: Any) -> Any:
        from feature_store.store import FetchResult

        n = len(item_ids)
        items = np.arange(n, dtype=np.int64) % 300
        return FetchResult("v", 3, self.sequence, items, items % 12, np.ones(n, dtype=bool))


def test_core_ranks_with_twin_v2(model_dir: Path) -> None:
    """RankingService with a twin_v2 retriever and a clustered history: probing every cluster ranks
    exactly as exact does; a stale clustering falls back (counted) and still ranks."""
    from service.core import RankingService
    from service.observability.metrics import Metrics
    from service.registry import ModelRegistry
    from service.settings import Settings
    from service.types import RankRequest

    rng = np.random.default_rng([SEED, 11])
    n = 1_500
    ts = np.sort(rng.integers(1_600_000_000, 1_700_000_000, n))
    item, cat = rng.integers(0, 300, n), rng.integers(0, 12, n)
    history = Sequence(item, cat, rng.integers(0, 4, n), ts)

    def rank(strategy: str, sequence: Sequence) -> list[int]:
        settings = Settings(model_dir=model_dir, scorer_threads=1, poll_interval_s=0, retrieval_strategy=strategy)
        registry = ModelRegistry(settings, lambda: make_retriever(strategy))
        model = registry.load_version()
        service = RankingService(settings, registry, _Store(sequence), Metrics())  # type: ignore[arg-type]
        try:
            req = RankRequest(user_id=5, candidates=list(range(100, 160)), top_n=20, request_time=1_700_000_001)
            resp = asyncio.run(service.rank(req))
        finally:
            service.close()
        assert getattr(model.retriever, "name", None) == strategy.split(":")[0]
        return [r.item_id for r in resp.items]

    from service.assemble import Tables  # the bundle's own tables give the serving fingerprint

    registry_settings = Settings(model_dir=model_dir, scorer_threads=1, poll_interval_s=0)
    tables: Tables = ModelRegistry(registry_settings, lambda: make_retriever("exact")).load_version().tables
    clusterer = UserClusterer.from_tables(tables, ClusterParams(target_size=30))
    assert clusterer.fingerprint == tables.key_fingerprint
    result = clusterer.cluster(item, cat, history.action, ts)
    assert result is not None
    assign, n_clusters = result
    clustered = history.with_clusters(SequenceClusters(assign, n_clusters, clusterer.fingerprint))
    exact = rank("exact", history)
    assert rank(f"twin_v2:n_probe={n_clusters},exact_below=0", clustered) == exact
    before = fallback_counts().get(("twin_v2", "stale"), 0)
    stale = history.with_clusters(SequenceClusters(assign, n_clusters, b"\x00" * 8))
    assert rank("twin_v2:exact_below=0", stale) == exact
    assert fallback_counts()[("twin_v2", "stale")] == before + 1
    approx = rank("twin_v2:n_probe=2,exact_below=0", clustered)
    assert len(approx) == 20
