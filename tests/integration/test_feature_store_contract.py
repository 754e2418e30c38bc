"""The online-store contract, run against every backend (embedded Valkey, redis-server, Cluster)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import redis

from feature_store import keys
from feature_store.codecs import SEQ_RECORD_SIZE, Sequence, decode_sequence
from feature_store.errors import FeatureStoreUnavailable, VersionConflict, VersionNotFound
from feature_store.redis_store import RedisOnlineStore, create_store
from feature_store.schema import FeatureSchema, SchemaSpec
from feature_store.store import STATUS_COMPLETE, STATUS_INGESTING, OnlineStore, trim_slack
from ingest.bulk import ingest_log, schema_from_log
from models.data.events import EventLog
from tests.integration.conftest import Backend, assert_same_sequence, expected_sequence, make_events

CAP = 100  # the schema's stored cap in these tests (some users have more events)


def small_schema(events: EventLog) -> FeatureSchema:
    return schema_from_log(events, SchemaSpec(max_sequence_length=CAP))


async def ingested(
    store: OnlineStore, version: str = "v1", activate: bool = True, **kw: Any
) -> tuple[EventLog, FeatureSchema]:
    events = make_events(**kw)
    schema = small_schema(events)
    await ingest_log(store, events, schema, version, batch_users=5, activate=activate)
    return events, schema


def snapshot(backend: Backend) -> dict[bytes, Any]:
    """Every key on every node -> value (strings) or sorted members (sets); meta minus timestamps."""
    out: dict[bytes, Any] = {}
    for port in backend.ports:
        client = redis.Redis(port=port)
        try:
            for key in client.scan_iter(count=1000):
                kind = client.type(key)
                if kind == b"set":
                    out[key] = sorted(client.smembers(key))
                elif key.startswith(b"rs:meta:") and not key.endswith(b":schema"):
                    doc = __import__("json").loads(client.get(key))
                    doc.pop("created"), doc.pop("updated")
                    out[key] = doc
                else:
                    out[key] = client.get(key)
        finally:
            client.close()
    return out


async def test_fetch_hits_misses_and_input_order(store: OnlineStore) -> None:
    events, schema = await ingested(store)
    user = int(events.user_id[0])
    items, cats = events.item_catalogue()
    unknown = 999_999_999
    request = [int(items[3]), unknown, int(items[1]), int(items[3]), int(items[2])]
    result = await store.fetch(user, request)
    assert result.version == "v1"
    assert result.user_index == int(schema.users.lookup([user])[0])
    np.testing.assert_array_equal(result.found, [True, False, True, True, True])
    want_items = schema.items.lookup(request)
    want_cats = schema.categories.lookup(np.array([cats[3], 0, cats[1], cats[3], cats[2]]))
    want_items[1] = want_cats[1] = 0
    np.testing.assert_array_equal(result.item_index, want_items)
    np.testing.assert_array_equal(result.category_index, want_cats)
    assert result.item_index.dtype == np.int64 and result.found.dtype == np.bool_
    assert_same_sequence(result.sequence, expected_sequence(events, schema, user, CAP))

    # Unknown user: explicit miss, empty sequence; items still answered.
    missing = await store.fetch(123_456_789, request[:2])
    assert missing.user_index is None and not missing.user_found and len(missing.sequence) == 0
    np.testing.assert_array_equal(missing.found, [True, False])

    # Numpy ids, no items.
    again = await store.fetch(user, np.asarray(request, dtype=np.int64))
    np.testing.assert_array_equal(again.item_index, result.item_index)
    empty = await store.fetch(user, [])
    assert empty.item_index.shape == (0,) and empty.found.shape == (0,)
    no_sequence = await store.fetch(user, request, max_sequence_length=0)
    assert len(no_sequence.sequence) == 0 and no_sequence.user_index == result.user_index
    np.testing.assert_array_equal(no_sequence.category_index, result.category_index)


async def test_item_cache_serves_repeats_and_keeps_misses_explicit(store: OnlineStore) -> None:
    events, schema = await ingested(store)
    items, _ = events.item_catalogue()
    request = [int(items[0]), 424_242, int(items[5])]
    first = await store.fetch(int(events.user_id[0]), request)
    second = await store.fetch(int(events.user_id[0]), request)  # served from the cache
    for r in (first, second):
        np.testing.assert_array_equal(r.found, [True, False, True])
        np.testing.assert_array_equal(r.item_index, schema.items.lookup(request) * np.array([1, 0, 1]))
    # the plain counts the service turns into metrics: 3 misses, then 3 hits ("known absent" included)
    counts = store.fetch_counts()
    assert (counts.item_cache_misses, counts.item_cache_hits) == (3, 3)
    assert (counts.unknown_items, counts.unknown_users) == (2, 0)
    await store.fetch(123_456_789, request[:1])
    after = store.fetch_counts()
    assert (after.unknown_users, after.unknown_items, after.item_cache_hits) == (1, 2, 4)


async def test_an_invalidation_during_a_fetch_keeps_its_values_out_of_the_cache(
    backend: Backend, store: OnlineStore
) -> None:
    """The follower of the item change log drops an item while a fetch of it waits for Redis:
    the value that fetch read may predate the change, so it is served once and not cached."""
    if backend.name == "cluster":
        pytest.skip("CLIENT PAUSE holds one node's clients; the cache's bookkeeping is the same in a Cluster")
    events, _ = await ingested(store)
    items, _ = events.item_catalogue()
    item = int(items[0])
    async with create_store(backend.store_config(read_timeout_s=5.0, request_timeout_s=10.0)) as server:
        assert isinstance(server, RedisOnlineStore)
        user = int(events.user_id[0])
        await server.fetch(user, [])  # connected, the active version known
        version = await server.active_version()
        assert version is not None
        redis.Redis(port=backend.ports[0]).execute_command("CLIENT", "PAUSE", 500, "ALL")
        in_flight = asyncio.create_task(server.fetch(user, [item]))
        await asyncio.sleep(0.1)
        assert not in_flight.done()  # its reply waits for the pause to end
        server._item_cache(version).invalidate([item])  # what reading the change log does
        assert (await in_flight).found.tolist() == [True]
        misses = server.fetch_counts().item_cache_misses
        await server.fetch(user, [item])
        assert server.fetch_counts().item_cache_misses == misses + 1  # read again, not served from the cache


async def test_sequence_caps(store: OnlineStore) -> None:
    events, schema = await ingested(store, min_events=CAP + 20, max_events=CAP + 80, n_users=3)
    user = int(events.user_id[0])
    stored = await store.fetch(user, [])
    assert len(stored.sequence) == CAP  # ingest keeps the newest CAP events
    assert_same_sequence(stored.sequence, expected_sequence(events, schema, user, CAP))
    for n in (1, 7, CAP - 1):
        r = await store.fetch(user, [], max_sequence_length=n)
        assert_same_sequence(r.sequence, expected_sequence(events, schema, user, n))
    assert len((await store.fetch(user, [], max_sequence_length=0)).sequence) == 0
    assert len((await store.fetch(user, [], max_sequence_length=10 * CAP)).sequence) == CAP


async def test_append_keeps_cap_atomically_under_concurrency(store: OnlineStore) -> None:
    await ingested(store)
    user, tasks, per_task = 55, 16, 25

    def batch(task: int, k: int) -> Sequence:
        # item = task*1000 + running number, so order and completeness are checkable.
        item = np.array([task * 1000 + k], dtype=np.int64)
        return Sequence(item, np.array([task]), np.array([k % 4]), np.array([1_700_000_000 + k]))

    async def appender(task: int, cap: int) -> None:
        for k in range(per_task):
            await store.append_events(user, batch(task, k), cap=cap)

    # No trimming: nothing may be lost or torn.
    await asyncio.gather(*(appender(t, 10_000) for t in range(tasks)))
    full = (await store.fetch(user, [])).sequence
    assert len(full) == tasks * per_task
    for t in range(tasks):
        mine = full.item[full.item // 1000 == t] % 1000
        np.testing.assert_array_equal(mine, np.arange(per_task))

    # Trimming: the length never exceeds the cap plus its slack, records stay whole, each task's
    # order is kept, and a read of the newest cap events gets the newest cap.
    cap = 40
    bound = cap + trim_slack(cap)
    other = 56
    await asyncio.gather(*(appender(t, cap) for t in range(tasks)))  # user 55 already full: trims
    seq = (await store.fetch(user, [])).sequence
    assert cap <= len(seq) <= bound
    newest = (await store.fetch(user, [], max_sequence_length=cap)).sequence
    assert_same_sequence(newest, seq.last(cap))
    assert np.isin(seq.item // 1000, np.arange(tasks)).all() and np.isin(seq.item % 1000, np.arange(per_task)).all()
    for t in range(tasks):
        mine = seq.item[seq.item // 1000 == t] % 1000
        assert (np.diff(mine) > 0).all()
    lengths = await asyncio.gather(*(store.append_events(other, batch(t, 0), cap=cap) for t in range(cap + 10)))
    # the script is atomic: the appends ran one after the other, each seeing one stored length
    serial, length = [], 0
    for _ in range(cap + 10):
        length += 1
        length = cap if length > bound else length
        serial.append(length)
    assert sorted(lengths) == sorted(serial) and max(lengths) == bound


async def test_version_switch_is_atomic_for_readers(backend: Backend, store: OnlineStore) -> None:
    # v1 and v2 hold different histories for the same users (v2: timestamps shifted by a day).
    ev1, schema = await ingested(store, "v1", seed=1)
    ev2 = EventLog(ev1.user_id, ev1.item_id, ev1.category_id, ev1.action, ev1.timestamp + 86_400)
    await ingest_log(store, ev2, schema, "v2", batch_users=5)
    user = int(ev1.user_id[-1])
    want = {"v1": expected_sequence(ev1, schema, user, CAP), "v2": expected_sequence(ev2, schema, user, CAP)}
    reader = create_store(backend.store_config(active_refresh_interval_s=0.001))
    seen: set[str] = set()
    stop = asyncio.Event()

    async def read_loop() -> None:
        while not stop.is_set():
            r = await reader.fetch(user, [])
            seen.add(r.version)
            assert_same_sequence(r.sequence, want[r.version])  # never a mix of the two

    async def switch_loop() -> None:
        for k in range(30):
            await store.activate("v2" if k % 2 == 0 else "v1")
            await asyncio.sleep(0.005)
        stop.set()

    try:
        await asyncio.gather(read_loop(), switch_loop())
    finally:
        await reader.aclose()
    assert seen == {"v1", "v2"}


async def test_drop_version(backend: Backend, store: OnlineStore) -> None:
    events, _ = await ingested(store, "v1")
    await ingested(store, "v2", activate=False)
    assert await store.list_versions() == ["v1", "v2"]
    with pytest.raises(VersionConflict):
        await store.drop_version("v1")  # active
    assert await store.get_schema("v2") is not None  # recorded by the ingest, beside the meta
    removed = await store.drop_version("v2", batch=7)
    assert removed == 2 * len(np.unique(events.user_id)) + len(np.unique(events.item_id))
    assert await store.list_versions() == ["v1"]
    assert await store.get_meta("v2") is None and await store.get_schema("v2") is None
    leftovers = [k for k in snapshot(backend) if k.startswith((b"rs:v2:", keys.meta_key("v2")))]
    assert leftovers == []
    r = await store.fetch(int(events.user_id[0]), [int(events.item_id[0])], version="v2")
    assert r.user_index is None and not r.found.any()
    assert (await store.fetch(int(events.user_id[0]), [])).user_index is not None  # v1 untouched


async def test_reingest_is_idempotent(backend: Backend, store: OnlineStore) -> None:
    events = make_events(seed=3)
    schema = small_schema(events)
    await ingest_log(store, events, schema, "v1", batch_users=4, activate=True)
    first = snapshot(backend)
    await ingest_log(store, events, schema, "v1", batch_users=4, activate=True)
    assert snapshot(backend) == first
    with pytest.raises(VersionConflict):  # same version name, different schema
        await ingest_log(store, events, schema_from_log(events, SchemaSpec(max_sequence_length=5)), "v1")


async def test_resume_after_interruption(backend: Backend, store: OnlineStore, monkeypatch: pytest.MonkeyPatch) -> None:
    events = make_events(n_users=23, seed=4)
    schema = small_schema(events)
    await ingest_log(store, events, schema, "clean", batch_users=5)
    real_write = store.write_users
    calls = {"n": 0}

    async def flaky_write(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise FeatureStoreUnavailable("injected: connection lost")
        await real_write(*args, **kwargs)

    monkeypatch.setattr(store, "write_users", flaky_write)
    with pytest.raises(FeatureStoreUnavailable):
        await ingest_log(store, events, schema, "v1", batch_users=5, activate=True)
    meta = await store.get_meta("v1")
    assert meta is not None and meta.status == STATUS_INGESTING and meta.checkpoint["next_user"] == 10
    with pytest.raises(VersionConflict):
        await store.activate("v1")  # incomplete versions cannot go live

    stats = await ingest_log(store, events, schema, "v1", batch_users=5, resume=True, activate=True)
    assert stats.resumed_from_user == 10 and stats.users == 13 and stats.batches == 3 and stats.items == 0
    meta = await store.get_meta("v1")
    assert meta is not None and meta.status == STATUS_COMPLETE and await store.active_version(refresh=True) == "v1"
    assert meta.counts["users"] == 23 and meta.counts["events"] == sum(
        min(int(n), CAP) for n in np.diff(events.user_offsets()[1])
    )
    snap = snapshot(backend)
    clean = {k.replace(b"rs:clean:", b"rs:v1:"): v for k, v in snap.items() if k.startswith(b"rs:clean:")}
    resumed = {k: v for k, v in snap.items() if k.startswith(b"rs:v1:")}
    assert resumed == clean


async def test_ttl_policy(backend: Backend, store: OnlineStore) -> None:
    events = make_events(n_users=3)
    schema = small_schema(events)
    await ingest_log(store, events, schema, "v1", ttl_seconds=300, activate=True)
    user = int(events.user_id[0])
    client = (
        redis.RedisCluster(host="127.0.0.1", port=backend.ports[0])
        if backend.name == "cluster"
        else redis.Redis(port=backend.ports[0])
    )
    try:
        for key in (keys.profile_key("v1", user), keys.sequence_key("v1", user)):
            assert 0 < client.ttl(key) <= 300
        assert client.ttl(keys.item_key("v1", int(events.item_id[0]))) == -1  # items never expire
        assert client.ttl(keys.ACTIVE_KEY) == -1
        # Appends keep (and with ttl_seconds refresh) the user's TTL.
        one = Sequence(np.array([1]), np.array([1]), np.array([1]), np.array([1_800_000_000]))
        await store.append_events(user, one, ttl_seconds=600)
        assert 300 < client.ttl(keys.sequence_key("v1", user)) <= 600
    finally:
        client.close()


async def test_active_pointer_health_and_schema_hash(store: OnlineStore) -> None:
    with pytest.raises(VersionNotFound):
        await store.fetch(1, [1])
    health = await store.health()
    assert not health.ok and health.active_version is None and health.latency_ms is not None
    assert await store.active_schema_hash() is None
    assert await store.ping() >= 0
    _, schema = await ingested(store, "v1", activate=False)
    with pytest.raises(VersionNotFound):
        await store.activate("nope")
    await store.activate("v1")
    health = await store.health()
    assert health.ok and health.active_version == "v1" and health.schema_hash == schema.hash
    assert await store.active_schema_hash() == schema.hash


async def test_sequence_value_layout_is_the_codec(backend: Backend, store: OnlineStore) -> None:
    """The stored bytes are exactly 12-byte records, oldest first (what other readers rely on)."""
    events, schema = await ingested(store, n_users=2)
    user = int(events.user_id[0])
    client = (
        redis.RedisCluster(host="127.0.0.1", port=backend.ports[0])
        if backend.name == "cluster"
        else redis.Redis(port=backend.ports[0])
    )
    try:
        raw = client.get(keys.sequence_key("v1", user))
    finally:
        client.close()
    assert raw is not None and len(raw) % SEQ_RECORD_SIZE == 0
    assert_same_sequence(decode_sequence(raw), expected_sequence(events, schema, user, CAP))
