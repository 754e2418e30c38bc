"""twin_v2 behaviour clusters through a real server: ingest with clustering, read back in the same
fetch as the sequence, kept aligned by appends that trim the sequence, and ranked with."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from feature_store import keys
from feature_store.clusters import ClusterParams, UserClusterer, history_bias
from feature_store.codecs import Sequence, decode_cluster_header
from feature_store.redis_store import create_store
from feature_store.schema import SchemaSpec
from feature_store.store import OnlineStore, trim_slack
from ingest.bulk import ingest_log, schema_from_log
from service.retrieval import RetrievalContext, TwinV2Retriever, check_against_reference, fallback_counts
from tests.integration.conftest import Backend, assert_same_sequence, expected_sequence, make_events

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _clusterer(n_items: int, n_categories: int) -> UserClusterer:
    rng = np.random.default_rng(3)
    item_key = rng.standard_normal((n_items, 8)).astype(np.float32)
    category_key = rng.standard_normal((n_categories, 8)).astype(np.float32)
    action_bias = rng.standard_normal(4).astype(np.float32) * 0.05
    gap_bias = rng.standard_normal(16).astype(np.float32) * 0.05
    return UserClusterer(item_key, category_key, action_bias, gap_bias, ClusterParams(min_events=100, seed=1))


async def test_ingest_clusters_read_back_in_one_fetch(store: OnlineStore) -> None:
    events = make_events(n_users=6, min_events=50, max_events=400, seed=5)
    schema = schema_from_log(events, SchemaSpec(max_sequence_length=300))
    clusterer = _clusterer(schema.items.size, schema.categories.size)
    stats = await ingest_log(store, events, schema, "clu", batch_users=4, activate=True, clusterer=clusterer)
    users, offsets = events.user_offsets()
    lengths = np.minimum(np.diff(offsets), 300)
    assert stats.clustered == int((lengths >= 100).sum()) > 0
    meta = await store.get_meta("clu")
    assert meta is not None and meta.info["clusters"]["fingerprint"] == clusterer.fingerprint.hex()

    for user, length in zip(users.tolist(), lengths.tolist(), strict=True):
        got = await store.fetch(user, [], version="clu")
        want = expected_sequence(events, schema, user, 300)
        assert_same_sequence(got.sequence, want)
        if length < 100:
            assert got.sequence.clusters is None
            continue
        clusters = got.sequence.clusters
        assert clusters is not None and clusters.fingerprint == clusterer.fingerprint
        expect = clusterer.cluster(want.item, want.category, want.action, want.timestamp)
        assert expect is not None
        np.testing.assert_array_equal(clusters.assignment, expect[0])
        assert clusters.n_clusters == expect[1]
        # clustered at the user's newest event: each cluster has one GSU bias at that time
        bias = history_bias(clusterer.action_bias, clusterer.gap_bias, want.action, want.timestamp,
                            int(want.timestamp.max()))
        for c in range(clusters.n_clusters):
            assert np.unique(bias[clusters.assignment == c]).shape[0] == 1
        # a shorter read gets the ids of the newest events only
        short = await store.fetch(user, [], max_sequence_length=40, version="clu")
        assert short.sequence.clusters is not None
        np.testing.assert_array_equal(short.sequence.clusters.assignment, expect[0][-40:])

    # the same version loaded again without a clusterer: the old clusterings described the old
    # sequences and must not steer a search of the new ones
    await ingest_log(store, events, schema, "clu", batch_users=4, activate=True)
    for user in users.tolist():
        assert (await store.fetch(user, [], version="clu")).sequence.clusters is None
        assert await store.client.exists(keys.clusters_key("clu", user)) == 0


async def test_appends_keep_clusters_aligned(store: OnlineStore) -> None:
    events = make_events(n_users=1, min_events=300, max_events=300, seed=9)
    schema = schema_from_log(events, SchemaSpec(max_sequence_length=300))
    clusterer = _clusterer(schema.items.size, schema.categories.size)
    await ingest_log(store, events, schema, "app", activate=True, clusterer=clusterer)
    user = int(events.user_offsets()[0][0])
    before = await store.fetch(user, [], version="app")
    assert before.sequence.clusters is not None
    ids = before.sequence.clusters.assignment.copy()

    # 20 new events at the cap, in two appends: the first 10 stay within the cap's slack (18 at 300),
    # nothing is dropped and a read of the newest 300 sees the clusters shifted by 10; the next 10
    # pass it, and the 20 oldest records and their cluster ids are dropped
    assert trim_slack(300) == 18
    new = Sequence(np.arange(1, 21), np.ones(20, dtype=np.int64), np.zeros(20, dtype=np.int64),
                   np.arange(20, dtype=np.int64) + int(events.timestamp.max()) + 1)
    assert await store.append_events(user, new.before(int(new.timestamp[10])), cap=300,
                                     version="app") == 310
    within = await store.fetch(user, [], max_sequence_length=300, version="app")
    assert within.sequence.clusters is not None
    np.testing.assert_array_equal(within.sequence.clusters.assignment[:290], ids[10:])
    assert (within.sequence.clusters.assignment[290:] == -1).all()
    assert await store.append_events(user, new.last(10), cap=300, version="app") == 300
    after = await store.fetch(user, [], version="app")
    assert len(after.sequence) == 300 and after.sequence.clusters is not None
    np.testing.assert_array_equal(after.sequence.clusters.assignment[:280], ids[20:])
    assert (after.sequence.clusters.assignment[280:] == -1).all()  # appended after the clustering
    raw = await store.client.get(keys.clusters_key("app", user))  # type: ignore[attr-defined]
    assert len(raw) == decode_cluster_header(raw).ids_offset + 2 * 280  # centroids kept, 20 ids dropped

    # the retriever searches the clustered events by cluster and the appended ones always
    rng = np.random.default_rng(0)
    keys_aug = rng.standard_normal((300, 9)).astype(np.float32)
    queries = rng.standard_normal((12, 9)).astype(np.float32)
    retriever = TwinV2Retriever(n_probe=10_000, exact_below=0)
    context = RetrievalContext(clusters=after.sequence.clusters, key_fingerprint=clusterer.fingerprint)
    scores, idx = retriever.search(queries, keys_aug, 16, context)
    assert check_against_reference(queries, keys_aug, 16, scores, idx) == []


async def test_stale_clustering_falls_back_to_exact(store: OnlineStore) -> None:
    events = make_events(n_users=1, min_events=200, max_events=200, seed=2)
    schema = schema_from_log(events, SchemaSpec(max_sequence_length=300))
    clusterer = _clusterer(schema.items.size, schema.categories.size)
    await ingest_log(store, events, schema, "st", activate=True, clusterer=clusterer)
    user = int(events.user_offsets()[0][0])
    got = await store.fetch(user, [], version="st")
    assert got.sequence.clusters is not None
    rng = np.random.default_rng(1)
    keys_aug = rng.standard_normal((200, 9)).astype(np.float32)
    queries = rng.standard_normal((5, 9)).astype(np.float32)
    before = fallback_counts().get(("twin_v2", "stale"), 0)
    stale = RetrievalContext(clusters=got.sequence.clusters, key_fingerprint=b"\x00" * 8)
    scores, idx = TwinV2Retriever(exact_below=0).search(queries, keys_aug, 8, stale)
    assert fallback_counts()[("twin_v2", "stale")] == before + 1
    assert check_against_reference(queries, keys_aug, 8, scores, idx) == []


async def test_unreadable_clusters_cost_only_the_clusters(valkey_backend: Backend) -> None:
    """A cluster value this server cannot read (truncated, or a newer format) drops the clusters,
    not the fetch: profile, history and items still come back, and twin_v2 falls back to exact."""
    events = make_events(n_users=1, min_events=200, max_events=200, seed=4)
    schema = schema_from_log(events, SchemaSpec(max_sequence_length=300))
    clusterer = _clusterer(schema.items.size, schema.categories.size)
    user = int(events.user_offsets()[0][0])
    items = [int(i) for i in events.item_id[:5]]
    async with create_store(valkey_backend.store_config()) as store:
        await ingest_log(store, events, schema, "bad", activate=True, clusterer=clusterer)
        raw = redis.Redis.from_url(str(valkey_backend.config.url))
        try:
            raw.set(keys.clusters_key("bad", user), b"RSC9" + bytes(40))
        finally:
            raw.close()
        got = await store.fetch(user, items, version="bad")
    assert got.sequence.clusters is None
    assert_same_sequence(got.sequence, expected_sequence(events, schema, user, 300))
    assert got.user_index and all(got.item_index > 0)


async def test_recluster_covers_streamed_events_and_skips_a_sequence_that_changed(store: OnlineStore) -> None:
    from feature_store.codecs import encode_sequence
    from feature_store.redis_store import RedisOnlineStore
    from feature_store.store import UserAppend
    from ingest.recluster import _WRITE_IF_UNCHANGED, recluster

    assert isinstance(store, RedisOnlineStore)
    events = make_events(n_users=6, min_events=150, max_events=300, seed=9)
    schema = schema_from_log(events, SchemaSpec(max_sequence_length=300))
    clusterer = _clusterer(schema.items.size, schema.categories.size)
    await ingest_log(store, events, schema, "rc", activate=True, clusterer=clusterer)
    users = [int(u) for u in np.unique(events.user_id)]
    # streamed events: appended without cluster ids
    t = int(events.timestamp.max()) + 10
    appends = [UserAppend(u, encode_sequence([1, 2], [1, 1], [0, 3], [t, t + 1]), [b"s%d-1" % u, b"s%d-2" % u])
               for u in users[:4]]
    await store.append_events_once(appends, cap=300)
    before = {u: (await store.fetch(u, [], version="rc")).sequence for u in users}
    for u in users[:4]:
        clusters = before[u].clusters
        assert clusters is not None and int((clusters.assignment == -1).sum()) == 2

    stats = await recluster(store, clusterer, "rc", batch_users=2)
    assert (stats.users, stats.reclustered, stats.fresh, stats.changed) == (6, 4, 2, 0)
    for u in users:
        seq = (await store.fetch(u, [], version="rc")).sequence
        assert_same_sequence(seq, before[u])
        want = clusterer.cluster(seq.item, seq.category, seq.action, seq.timestamp)
        assert want is not None and seq.clusters is not None
        np.testing.assert_array_equal(seq.clusters.assignment, want[0])  # every event clustered
    again = await recluster(store, clusterer, "rc")
    assert (again.reclustered, again.fresh) == (0, 6)

    # a clustering computed before an append is not written over the changed sequence
    user = users[0]
    raw = await store.client.get(keys.sequence_key("rc", user))
    await store.append_events_once([UserAppend(user, encode_sequence([3], [1], [0], [t + 5]), [b"late"])], cap=300)
    written = await store.execute("write", [("EVAL", _WRITE_IF_UNCHANGED, 2, keys.sequence_key("rc", user),
                                             keys.clusters_key("rc", user), len(raw), raw[:12], b"stale")])
    assert written == [0]
    assert await store.client.get(keys.clusters_key("rc", user)) != b"stale"

    # a damaged history (not whole records) is counted and left as it is; the run goes on
    damaged = users[1]
    await store.client.append(keys.sequence_key("rc", damaged), b"x")
    partial = await recluster(store, clusterer, "rc", all_users=True)
    assert (partial.users, partial.unreadable, partial.reclustered + partial.changed) == (6, 1, 5)


async def test_consumer_gives_streamed_events_their_nearest_centroid(store: OnlineStore, backend: Backend) -> None:
    """`rankserve consume --cluster-bundle`: a clustered user's streamed events get the id of their
    nearest stored centroid, in the same script as the append, trimmed in step with the sequence;
    a clustering made with other tables, or one that stopped covering the history, gets none."""
    from feature_store import events as ev
    from feature_store.clusters import nearest_centroid
    from feature_store.codecs import decode_centroids
    from feature_store.redis_store import RedisOnlineStore
    from ingest.stream import ConsumerConfig, StreamConsumer
    from tests.integration.test_event_stream import SHARDS, drain, new_events, sync_client

    assert isinstance(store, RedisOnlineStore)
    events = make_events(n_users=4, min_events=200, max_events=260, seed=11)
    schema = schema_from_log(events, SchemaSpec(max_sequence_length=300))
    clusterer = _clusterer(schema.items.size, schema.categories.size)
    await ingest_log(store, events, schema, "nc", activate=True, clusterer=clusterer)
    users = [int(u) for u in np.unique(events.user_id)]
    clustered, stale, uncovered = users[:2], users[2], users[3]
    ingest_ids = {u: (await store.fetch(u, [], version="nc")).sequence for u in users}
    other = _clusterer(schema.items.size + 1, schema.categories.size)  # other tables: another fingerprint
    seq = ingest_ids[stale]
    value = other.encode(seq.item, seq.category, seq.action, seq.timestamp)
    await store.execute("stale", [("SET", keys.clusters_key("nc", stale), value)])
    t0 = int(events.timestamp.max()) + 100
    await store.append_events(uncovered, Sequence(np.array([1]), np.array([1]), np.array([0]), np.array([t0 - 1])),
                              cap=300, version="nc")  # an append without an id: the clustering no longer covers

    items = [int(i) for i in np.unique(events.item_id)[:9]]
    per_user = 60  # 260 + 60 > 300: the oldest records and their ids are trimmed
    sent = new_events(users, items, per_user=per_user, t0=t0, tag="nc")
    producer = ev.EventProducer(sync_client(backend), shards=SHARDS)
    producer.send(sent)
    producer.send(sent[:10])  # redelivered: neither the events nor their ids go in twice
    consumer = StreamConsumer(store, ConsumerConfig(shards=SHARDS, batch=50), clusterer=clusterer)
    done = await drain(consumer)
    assert (done.appended, done.duplicates) == (len(sent), 10)

    for user in clustered:
        got = (await store.fetch(user, [], version="nc")).sequence
        raw = await store.execute("read", [("GET", keys.clusters_key("nc", user))])
        header = decode_cluster_header(raw[0])
        means = decode_centroids(header, raw[0][20:])
        assert got.clusters is not None and (got.clusters.assignment >= 0).all()  # every event has an id
        new = got.last(per_user)
        want = nearest_centroid(means, clusterer.event_vectors(new.item, new.category, new.action))
        np.testing.assert_array_equal(got.clusters.assignment[-per_user:], want)
        before = ingest_ids[user]
        assert before.clusters is not None
        kept = len(got) - per_user  # the ingest's ids of the events the trim kept
        np.testing.assert_array_equal(got.clusters.assignment[:kept], before.clusters.assignment[-kept:])
        assert len(np.unique(want)) > 1  # the events went to several clusters, not one default
    for user in (stale, uncovered):
        got = (await store.fetch(user, [], version="nc")).sequence
        assert got.clusters is not None and (got.clusters.assignment[-per_user:] == -1).all()

    count = consumer.metrics.cluster_ids.labels
    assert count("assigned")._value.get() == 2 * per_user
    assert count("stale")._value.get() == per_user
    assert count("changed")._value.get() == per_user  # offered for the uncovered user, refused by the script
    assert count("no_clustering")._value.get() == 0


async def test_read_prefixes_reads_the_head_of_each_value(store: OnlineStore) -> None:
    from feature_store.redis_store import RedisOnlineStore

    assert isinstance(store, RedisOnlineStore)
    names = [keys.clusters_key("pre", u) for u in range(5000)]  # past one script call's keys on a single node
    await store.execute("write", [("SET", k, b"%05d" % n * 5) for n, k in enumerate(names) if n % 3])
    got = await store.read_prefixes("read", names, 7)
    assert got == [b"" if n % 3 == 0 else (b"%05d" % n * 5)[:7] for n in range(5000)]
    assert await store.read_prefixes("read", [], 7) == []
