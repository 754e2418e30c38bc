"""The event log and `rankserve consume`, against every backend (embedded Valkey, redis-server, Cluster).

Events go in through `EventProducer` (packed entries) or plain one-event XADDs, a `StreamConsumer`
steps until the streams are drained, and the users' sequences are read back from the store.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from feature_store import events as ev
from feature_store.errors import FeatureStoreError
from feature_store.redis_store import RedisOnlineStore
from feature_store.store import OnlineStore
from ingest.stream import ConsumerConfig, StepResult, StreamConsumer
from tests.integration.conftest import Backend
from tests.integration.test_feature_store_contract import CAP, ingested

pytestmark = pytest.mark.asyncio(loop_scope="function")

SHARDS = 4


def sync_client(backend: Backend) -> Any:
    if backend.name == "cluster":
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in backend.ports], socket_timeout=5)
    return redis.Redis(port=backend.ports[0], socket_timeout=5)


async def drain(consumer: StreamConsumer, rounds: int = 200) -> StepResult:
    """Step until a step reads nothing (after at least one that did, or `rounds` steps)."""
    total = StepResult()
    for _ in range(rounds):
        step = await consumer.step()
        total.read += step.read
        total.appended += step.appended
        total.duplicates += step.duplicates
        total.dead_letters += step.dead_letters
        if step.read == 0 and total.read:
            break
    return total


def consumer(store: OnlineStore, **overrides: Any) -> StreamConsumer:
    assert isinstance(store, RedisOnlineStore)
    return StreamConsumer(store, ConsumerConfig(**({"shards": SHARDS, "batch": 50} | overrides)))


def new_events(users: list[int], items: list[int], per_user: int, t0: int, tag: str) -> list[ev.StreamEvent]:
    """per_user events of each user, interleaved across users, strictly increasing in time per user."""
    out = []
    for k in range(per_user):
        for n, user in enumerate(users):
            out.append(ev.StreamEvent(f"{tag}-{user}-{k}", user, items[(k + n) % len(items)], "buy", t0 + k))
    return out


async def test_streamed_events_are_appended_in_order_once(store: OnlineStore, backend: Backend) -> None:
    events, schema = await ingested(store)
    users = [int(u) for u in np.unique(events.user_id)[:5]]
    items = [int(i) for i in np.unique(events.item_id)[:7]]
    before = {u: await store.fetch(u, [], max_sequence_length=CAP) for u in users}
    sent = new_events(users, items, per_user=30, t0=1_800_000_000, tag="a")
    producer = ev.EventProducer(sync_client(backend), shards=SHARDS)
    producer.send(sent)
    producer.send(sent[:40])  # a producer's retry: the same ids again

    c = consumer(store)
    done = await drain(c)
    assert (done.read, done.appended, done.duplicates, done.dead_letters) == (len(sent) + 40, len(sent), 40, 0)

    buy = schema.spec.actions.index("buy")
    for user in users:
        got = (await store.fetch(user, [], max_sequence_length=CAP)).sequence
        mine = [e for e in sent if e.user_id == user]
        old = before[user].sequence
        keep = min(CAP, len(old) + len(mine))
        # the newest events are the streamed ones, in the order sent, with the store's item rows
        tail = slice(keep - len(mine), keep)
        np.testing.assert_array_equal(got.timestamp[tail], [e.timestamp for e in mine])
        np.testing.assert_array_equal(got.action[tail], buy)
        np.testing.assert_array_equal(got.item[tail], schema.items.lookup(np.array([e.item_id for e in mine])))
        np.testing.assert_array_equal(got.category[tail], schema.categories.lookup(
            np.array([events.category_id[np.flatnonzero(events.item_id == e.item_id)[0]] for e in mine])))
        # what was there before is kept (up to the cap), oldest dropped first
        np.testing.assert_array_equal(got.timestamp[: keep - len(mine)], old.timestamp[len(old) - (keep - len(mine)):])
    await c.close()


async def test_items_are_resolved_right_when_the_item_cache_fills(
        store: OnlineStore, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that fills the consumer's item cache clears it; the items of that batch that were
    cached before still get their stored rows, not the unknown item's."""
    monkeypatch.setattr("ingest.stream._ITEM_CACHE_MAX", 8)
    events, schema = await ingested(store)
    users = [int(u) for u in np.unique(events.user_id)[:3]]
    items = [int(i) for i in np.unique(events.item_id)[:12]]
    producer = ev.EventProducer(sync_client(backend), shards=SHARDS)
    c = consumer(store)
    sent = []
    # the first batch caches items 0-5; the second holds three of them and six new ones (6 + 6 > 8)
    for tag, batch_items, t0 in (("a", items[:6], 1_800_000_000), ("b", items[3:12], 1_800_000_100)):
        batch = [ev.StreamEvent(f"{tag}-{user}-{k}", user, item, "buy", t0 + k)
                 for user in users for k, item in enumerate(batch_items)]
        producer.send(batch)
        done = await drain(c)
        assert (done.appended, done.dead_letters) == (len(batch), 0)
        sent += batch
    for user in users:
        mine = [e for e in sent if e.user_id == user]
        got = (await store.fetch(user, [], max_sequence_length=CAP)).sequence
        np.testing.assert_array_equal(got.item[-len(mine):], schema.items.lookup(np.array([e.item_id for e in mine])))
    await c.close()


async def test_an_idle_consumer_waits_in_a_blocking_read(store: OnlineStore, backend: Backend) -> None:
    """A consumer on one node reads new entries in XREADGROUP BLOCK (no polling: an empty read
    waits) and what arrives meanwhile is read and appended; a Cluster's consumer polls. Redis
    serves the blocked read after the first XADD of the producer's pipeline, and the rest of that
    burst joins the same batch instead of a step of its own."""
    events, _ = await ingested(store)
    users = [int(u) for u in np.unique(events.user_id)[:4]]
    items = [int(i) for i in np.unique(events.item_id)[:3]]
    sent = new_events(users, items, per_user=5, t0=1_800_000_000, tag="w")
    c = consumer(store)
    await c.rebalance(force=True)
    first = await c.step()
    assert first.read == 0 and not first.waited  # the first empty read does not wait

    async def produce_soon() -> None:
        await asyncio.sleep(0.05)
        await asyncio.to_thread(ev.EventProducer(sync_client(backend), shards=SHARDS).send, sent)

    producing = asyncio.create_task(produce_soon())
    total = StepResult()
    deadline = time.monotonic() + 60  # a bound on the loop, not a timing goal: it ends when all is read
    while time.monotonic() < deadline:
        step = await c.step()
        assert step.waited == (backend.name != "cluster")
        if backend.name == "cluster" and not step.read:
            await asyncio.sleep(0.01)  # a Cluster's consumer polls: give the producer its turn
        if step.read and not total.read and backend.name != "cluster":
            assert step.read == len(sent)  # the whole burst in the step that woke
        total.read += step.read
        total.appended += step.appended
        if producing.done() and total.read == len(sent) and step.read == 0:
            break
    await producing
    assert (total.read, total.appended) == (len(sent), len(sent))
    await c.close()


async def test_a_user_with_more_events_than_one_script_call_takes(store: OnlineStore) -> None:
    """2 x APPEND_ONCE_CHUNK + 500 events of one user span several script calls beside another
    user's; a repeat in a later call than its first copy (within the newest 1,024 ids) is still
    skipped, the user's events keep their order, and the counts add up per user."""
    from feature_store.codecs import encode_sequence
    from feature_store.redis_store import APPEND_ONCE_CHUNK
    from feature_store.store import UserAppend

    assert isinstance(store, RedisOnlineStore)
    events, _ = await ingested(store)
    big, small = (int(u) for u in np.unique(events.user_id)[:2])
    n = 2 * APPEND_ONCE_CHUNK + 500
    times = np.arange(1_800_000_000, 1_800_000_000 + n)
    ids = [b"big-%d" % k for k in range(n)]
    ids[-1] = ids[APPEND_ONCE_CHUNK + 500]  # the last event repeats one from the second call
    appends = [UserAppend(small, encode_sequence([1], [1], [0], [times[0]]), [b"small-0"]),
               UserAppend(big, encode_sequence(np.ones(n, np.int64), np.ones(n, np.int64), np.zeros(n, np.int64),
                                               times), ids)]
    counts = await store.append_events_once(appends, cap=n)
    assert [(c.appended, c.duplicates) for c in counts] == [(1, 0), (n - 1, 1)]
    got = (await store.fetch(big, [], max_sequence_length=n)).sequence
    np.testing.assert_array_equal(got.timestamp[-(n - 1):], times[:-1])


async def test_a_burst_is_cut_into_short_script_calls(store: OnlineStore) -> None:
    """A script call holds Redis while it runs, so a burst of many users goes as several calls of
    at most APPEND_ONCE_USERS entries and APPEND_ONCE_CHUNK events; all of it is applied."""
    from feature_store.codecs import encode_sequence
    from feature_store.redis_store import APPEND_ONCE_CHUNK, APPEND_ONCE_USERS
    from feature_store.store import UserAppend

    assert isinstance(store, RedisOnlineStore)
    events, _ = await ingested(store)
    users = [int(u) for u in np.unique(events.user_id)] + list(range(5_000_000, 5_000_040))  # and new users
    n_long = APPEND_ONCE_CHUNK + 100
    appends = [UserAppend(u, encode_sequence([2], [1], [1], [1_800_000_000]), [b"burst-%d" % u]) for u in users]
    appends.append(UserAppend(users[0], encode_sequence(np.ones(n_long, np.int64), np.ones(n_long, np.int64),
                                                        np.zeros(n_long, np.int64), 1_800_000_001 + np.arange(n_long)),
                              [b"long-%d" % k for k in range(n_long)]))
    version = await store.active_version()
    assert version is not None
    encoded = store.encode_appends(appends, version, cap=2 * n_long)
    per_call = [Counter(owners) for owners in encoded.owners]
    assert len(users) > APPEND_ONCE_USERS and len(encoded.commands) > 1
    assert all(len(owners) <= APPEND_ONCE_USERS for owners in encoded.owners)
    events_per_call = [sum(1 if k < len(users) else 0 for k in owners) for owners in encoded.owners]
    assert sum(events_per_call) == len(users)
    assert sum(calls[len(users)] for calls in per_call) == 2  # the long entry: two chunks, in consecutive calls
    long_calls = [i for i, calls in enumerate(per_call) if calls[len(users)]]
    assert long_calls[1] == long_calls[0] + 1
    counts = await store.apply_appends(encoded)
    assert [c.appended for c in counts] == [1] * len(users) + [n_long]
    got = (await store.fetch(users[0], [], max_sequence_length=n_long)).sequence
    np.testing.assert_array_equal(got.timestamp, 1_800_000_001 + np.arange(n_long))


async def test_appends_without_events_send_nothing(store: OnlineStore) -> None:
    """Appends of no events make no script call; each still gets its (zero) counts, and beside
    appends with events they change nothing."""
    from feature_store.codecs import encode_sequence
    from feature_store.store import AppendCounts, UserAppend

    assert isinstance(store, RedisOnlineStore)
    await ingested(store)
    version = await store.active_version()
    assert version is not None
    empty = [UserAppend(6_500_000, b"", []), UserAppend(6_500_001, b"", [])]
    for appends in ([], empty):
        encoded = store.encode_appends(appends, version, cap=CAP)
        assert encoded.commands == [] and encoded.owners == [] and encoded.call_users == []
        assert await store.apply_appends(encoded) == [AppendCounts(0, 0, 0)] * len(appends)
    mixed = [empty[0], UserAppend(6_500_002, encode_sequence([4], [1], [0], [1_800_000_000]), [b"m-1"]), empty[1]]
    encoded = store.encode_appends(mixed, version, cap=CAP)
    assert encoded.owners == [[1]]
    assert [c.appended for c in await store.apply_appends(encoded)] == [0, 1, 0]


async def test_a_user_in_two_appends_of_one_batch_keeps_their_order(store: OnlineStore) -> None:
    """Two entries of one user in calls that could be in flight together: the later call waits."""
    from feature_store.codecs import encode_sequence
    from feature_store.redis_store import APPEND_ONCE_USERS
    from feature_store.store import UserAppend

    assert isinstance(store, RedisOnlineStore)
    await ingested(store)
    user, others = 6_000_000, list(range(6_000_001, 6_000_001 + APPEND_ONCE_USERS + 4))

    def one(u: int, t: int) -> UserAppend:
        return UserAppend(u, encode_sequence([3], [1], [0], [t]), [b"%d-%d" % (u, t)])

    appends = [one(user, 1_800_000_001)] + [one(u, 1_800_000_000) for u in others] + [one(user, 1_800_000_002)]
    encoded = store.encode_appends(appends, (await store.active_version()) or "", cap=CAP)
    assert user in encoded.call_users[0] and user in encoded.call_users[-1]  # the first and the last call
    await store.apply_appends(encoded)
    got = (await store.fetch(user, [], max_sequence_length=CAP)).sequence
    assert got.timestamp.tolist() == [1_800_000_001, 1_800_000_002]


@pytest.mark.parametrize("in_flight", [1, 4])
async def test_script_calls_in_flight_are_bounded(
    store: OnlineStore, backend: Backend, in_flight: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`apply_appends(in_flight=N)` keeps at most N calls in flight on a single node, and does
    keep N in flight for a burst of more calls than that."""
    from feature_store.codecs import encode_sequence
    from feature_store.store import UserAppend

    if backend.name == "cluster":
        pytest.skip("a Cluster sends one pipeline per node")
    assert isinstance(store, RedisOnlineStore)
    await ingested(store)
    version = await store.active_version()
    assert version is not None
    appends = [UserAppend(u, encode_sequence([5], [1], [0], [1_800_000_000]), [b"f%d" % u])
               for u in range(8_000_000, 8_000_200)]
    encoded = store.encode_appends(appends, version, cap=CAP)
    assert len(encoded.commands) > 4
    target, name = (store._lean, "execute") if store._lean else (store, "_execute")
    send = getattr(target, name)
    now = most = 0

    async def counted(commands: list[tuple[Any, ...]]) -> list[Any]:
        nonlocal now, most
        now += 1
        most = max(most, now)
        try:
            return await send(commands)
        finally:
            now -= 1

    monkeypatch.setattr(target, name, counted)
    counts = await store.apply_appends(encoded, in_flight=in_flight)
    assert [c.appended for c in counts] == [1] * len(appends)
    assert most == in_flight


async def test_a_consumer_sends_calls_one_at_a_time_when_it_keeps_up_and_several_when_behind(
    store: OnlineStore, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caught up (every shard's read took all there was), a batch's script calls go one at a
    time, so a serving fetch waits for one short call at most; with a backlog (a read took as
    many entries as it asks for), APPEND_CALLS_IN_FLIGHT at once."""
    from feature_store.redis_store import APPEND_CALLS_IN_FLIGHT

    assert isinstance(store, RedisOnlineStore)
    events, _ = await ingested(store)
    items = [int(i) for i in np.unique(events.item_id)[:5]]
    apply = store.apply_appends
    in_flight: list[int] = []

    async def recorded(encoded: Any, **options: Any) -> Any:
        in_flight.append(options["in_flight"])
        return await apply(encoded, **options)

    monkeypatch.setattr(store, "apply_appends", recorded)
    producer = ev.EventProducer(sync_client(backend), shards=SHARDS)
    c = consumer(store, batch=1000)
    producer.send(new_events(list(range(9_000_000, 9_000_040)), items, per_user=1, t0=1_800_000_000, tag="k"))
    assert (await drain(c)).appended == 40
    assert in_flight == [1]
    await c.close()  # gives its shards back

    in_flight.clear()
    client = sync_client(backend)
    pipe = client.pipeline(transaction=False)
    for event in new_events(list(range(9_000_000, 9_000_400)), items, per_user=1, t0=1_800_000_100, tag="b"):
        pipe.xadd(ev.stream_key(ev.shard_of(str(event.user_id), SHARDS)),  # one event an entry: 100 a shard
                  {"id": event.event_id, "u": str(event.user_id), "i": str(event.item_id), "a": event.action,
                   "t": str(event.timestamp)})
    pipe.execute()
    behind = consumer(store, batch=50, name="behind")  # reads of 50 entries a shard: a backlog
    assert (await drain(behind)).appended == 400
    assert in_flight[0] == APPEND_CALLS_IN_FLIGHT
    await behind.close()


@pytest.mark.parametrize("lean_reads", [False, True])
async def test_appends_leave_connections_for_a_blocking_read(
    store: OnlineStore, backend: Backend, lean_reads: bool
) -> None:
    """A consumer applies a batch while its next blocking read holds a connection of the same
    pool: with a pool of four, the calls in flight must leave the read its connection."""
    from feature_store.codecs import encode_sequence
    from feature_store.redis_store import create_store
    from feature_store.store import UserAppend

    if backend.name == "cluster":
        pytest.skip("a Cluster sends one pipeline per node")
    await ingested(store)
    # read timeouts well above the read's 200 ms block: on a loaded machine its reply comes late
    small = create_store(backend.store_config(pool_size=4, lean_reads=lean_reads, read_timeout_s=5.0,
                                              request_timeout_s=10.0))
    assert isinstance(small, RedisOnlineStore)
    try:
        appends = [UserAppend(u, encode_sequence([5], [1], [0], [1_800_000_000]), [b"%d" % u])
                   for u in range(7_000_000, 7_000_100)]
        blocking = asyncio.ensure_future(small.execute(
            "read events", [("XREAD", "BLOCK", 200, "STREAMS", "rs:test:none", "$")], retry=False))
        await asyncio.sleep(0.02)  # the read holds its connection
        counts = await small.append_events_once(appends, cap=CAP)
        assert [c.appended for c in counts] == [1] * len(appends)
        await blocking
    finally:
        await small.aclose()


async def test_malformed_entries_go_to_dead_letters_and_the_rest_is_applied(
    store: OnlineStore, backend: Backend
) -> None:
    events, _ = await ingested(store)
    user = int(events.user_id[0])
    client = sync_client(backend)
    shard_key = ev.stream_key(ev.shard_of(str(user), SHARDS))
    bad: list[tuple[dict[str, str], str]] = [
        ({"u": str(user), "i": "5", "a": "buy", "t": "1"}, "'id' is missing"),
        ({"id": "x1", "u": str(user), "i": "5", "a": "teleport", "t": "1"}, "action 'teleport'"),
        ({"id": "x2", "u": "alice", "i": "5", "a": "buy", "t": "1"}, "not an integer"),
        ({"id": "x3", "u": str(user), "i": "5", "a": "buy", "t": "soon"}, "t must be integer"),
        ({"id": "x4", "u": str(user), "i": "5", "a": "buy", "t": str(1 << 40)}, "t must be in"),
        ({"id": "", "u": str(user), "i": "5", "a": "buy", "t": "1"}, "id must have"),
    ]
    for fields, _ in bad:
        client.xadd(shard_key, fields)
    good = ev.StreamEvent("ok-1", user, int(events.item_id[0]), "click", 1_800_000_000)
    ev.EventProducer(client, shards=SHARDS).send([good])

    c = consumer(store)
    done = await drain(c)
    assert (done.appended, done.dead_letters) == (1, len(bad))
    letters = client.xrange(ev.DEAD_LETTER_KEY)
    reasons = [dict(fields)[b"reason"].decode() for _, fields in letters]
    for (_, expected), reason in zip(bad, reasons, strict=True):
        assert expected in reason, reason
    assert dict(letters[0][1])[b"shard"] == str(ev.shard_of(str(user), SHARDS)).encode()
    got = (await store.fetch(user, [], max_sequence_length=CAP)).sequence
    assert int(got.timestamp[-1]) == good.timestamp
    # every entry acknowledged: nothing pending in the group
    assert client.xpending(shard_key, ev.GROUP)["pending"] == 0
    await c.close()


async def test_a_packed_entrys_bad_events_are_dead_letters_and_its_good_ones_are_applied_in_order(
    store: OnlineStore, backend: Backend
) -> None:
    events, _ = await ingested(store)
    user = int(events.user_id[0])
    item = int(events.item_id[0])
    client = sync_client(backend)
    shard = ev.shard_of(str(user), SHARDS)
    rows: list[list[object]] = [
        ["p-1", user, item, "click", 1_800_000_001],
        ["p-2", user, item, "teleport", 1_800_000_002],
        ["p-3", str(user), str(item), "buy", 1_800_000_003],  # ids as integer text read as integers
        ["p-4", user, item, "buy", "soon"],
        ["p-1", user, item, "click", 1_800_000_001],  # a repeat inside the entry: appended once
        ["p-5", user, item, "fav", 1_800_000_005],
    ]
    entry = client.xadd(ev.stream_key(shard), {ev.FIELD_EVENTS: orjson.dumps(rows)})
    broken = client.xadd(ev.stream_key(shard), {ev.FIELD_EVENTS: b"[[\"p-6\","})

    c = consumer(store)
    done = await drain(c)
    assert (done.read, done.appended, done.duplicates, done.dead_letters) == (7, 3, 1, 3)
    got = (await store.fetch(user, [], max_sequence_length=CAP)).sequence
    np.testing.assert_array_equal(got.timestamp[-3:], [1_800_000_001, 1_800_000_003, 1_800_000_005])
    letters = [dict(fields) for _, fields in client.xrange(ev.DEAD_LETTER_KEY)]
    assert [(f[b"entry"], f.get(b"index")) for f in letters] == [(entry, b"1"), (entry, b"3"), (broken, None)]
    assert orjson.loads(letters[0][b"f.e"]) == rows[1] and b"action 'teleport'" in letters[0][b"reason"]
    assert orjson.loads(letters[1][b"f.e"]) == rows[3] and b"t must be integer" in letters[1][b"reason"]
    assert letters[2][b"f.e"] == b'[["p-6",' and letters[2][b"reason"] == b"e is not a JSON array of events"
    assert client.xpending(ev.stream_key(shard), ev.GROUP)["pending"] == 0
    await c.close()


async def test_entries_the_decoder_cannot_read_are_dead_letters_and_the_consumer_carries_on(
    store: OnlineStore, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poison entry must not stop its shard: JSON nested past both parsers' limits, and an
    entry the decoder fails on for a reason of its own, each become one dead letter."""
    events, _ = await ingested(store)
    user = int(events.user_id[0])
    client = sync_client(backend)
    shard_key = ev.stream_key(ev.shard_of(str(user), SHARDS))
    deep = client.xadd(shard_key, {ev.FIELD_EVENTS: b"[" * 1100 + b"]" * 1100})
    poison = client.xadd(shard_key, {ev.FIELD_EVENTS: b'[["p-1",1,2,"click",5]]', "poison": "1"})
    good = ev.StreamEvent("ok-1", user, int(events.item_id[0]), "click", 1_800_000_000)
    ev.EventProducer(client, shards=SHARDS).send([good])
    decode_into = ev.EntryDecoder.decode_into

    def failing_on_poison(self: ev.EntryDecoder, fields: Any, out: list[ev.DecodedEvent]) -> list[ev.EventError]:
        errors = decode_into(self, fields, out)  # its event is decoded first, then dropped with the entry
        if b"poison" in fields:
            raise KeyError("a decoder bug")
        return errors

    monkeypatch.setattr(ev.EntryDecoder, "decode_into", failing_on_poison)
    c = consumer(store)
    done = await drain(c)
    assert (done.appended, done.dead_letters) == (1, 2)
    letters = {entry: dict(fields) for entry, fields in
               ((dict(f)[b"entry"], f) for _, f in client.xrange(ev.DEAD_LETTER_KEY))}
    assert letters[deep][b"reason"] == b"e is nested too deeply: it must be a JSON array of events"
    assert letters[poison][b"reason"].startswith(b"the entry could not be read: KeyError")
    assert letters[poison][b"f.poison"] == b"1"  # the whole entry, to replay once the decoder is fixed
    got = (await store.fetch(user, [], max_sequence_length=CAP)).sequence
    assert int(got.timestamp[-1]) == good.timestamp and 5 not in got.timestamp.tolist()
    assert client.xpending(shard_key, ev.GROUP)["pending"] == 0
    await c.close()


async def test_a_dead_consumers_shards_and_pending_entries_pass_to_a_live_one(
    store: OnlineStore, backend: Backend
) -> None:
    events, _ = await ingested(store)
    users = [int(u) for u in np.unique(events.user_id)[:6]]
    items = [int(i) for i in np.unique(events.item_id)[:5]]
    sent = new_events(users, items, per_user=20, t0=1_800_000_000, tag="b")
    client = sync_client(backend)
    ev.EventProducer(client, shards=SHARDS).send(sent)

    first = consumer(store, lease_ms=300, name="first")
    await first.rebalance(force=True)
    assert first.owned == set(range(SHARDS))  # alone: every shard
    # it reads a batch and dies before applying or acknowledging it (a fresh owner's first read
    # walks the shards' pending lists, empty here; the next one delivers new entries)
    read = 0
    for _ in range(3):
        read += sum(len(batch) for _, batch in (await first._read())[0])
    assert read > 0

    second = consumer(store, lease_ms=300, name="second")
    done = StepResult()
    for _ in range(400):  # the leases expire after 300 ms; the second takes over and claims
        step = await second.step()
        done.appended += step.appended
        done.duplicates += step.duplicates
        if second.owned == set(range(SHARDS)) and step.read == 0 and done.appended == len(sent):
            break
        await asyncio.sleep(0.01)
    assert done.appended == len(sent)
    for user in users:
        got = (await store.fetch(user, [], max_sequence_length=CAP)).sequence
        mine = [e.timestamp for e in sent if e.user_id == user]
        np.testing.assert_array_equal(got.timestamp[-len(mine):], mine)
    for shard in range(SHARDS):
        assert client.xpending(ev.stream_key(shard), ev.GROUP)["pending"] == 0
    await second.close()


async def test_a_batch_that_fails_during_a_claim_walk_is_claimed_again(
    store: OnlineStore, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new owner walks a dead consumer's pending entries batch by batch; when applying one of
    those batches fails, the walk must start over, or that batch stays pending, unapplied, while
    its users' newer events are appended."""
    events, _ = await ingested(store)
    users = [int(u) for u in np.unique(events.user_id)[:6]]
    items = [int(i) for i in np.unique(events.item_id)[:5]]
    sent = new_events(users, items, per_user=150, t0=1_800_000_000, tag="w")
    client = sync_client(backend)
    pipe = client.pipeline(transaction=False)
    for event in sent:  # one event per entry: a batch is 50 entries a shard, a shard's walk several batches
        pipe.xadd(ev.stream_key(ev.shard_of(str(event.user_id), SHARDS)),
                  {"id": event.event_id, "u": str(event.user_id), "i": str(event.item_id), "a": event.action,
                   "t": str(event.timestamp)})
    pipe.execute()
    first = consumer(store, lease_ms=300, name="first")
    await first.rebalance(force=True)
    while first._to_claim:  # a new owner first walks its shards' pending lists (empty here)
        await first._read()
    read = 0
    while got := sum(len(batch) for _, batch in (await first._read())[0]):  # it reads everything, applies
        read += got  # nothing, and dies
    assert read == len(sent)

    assert isinstance(store, RedisOnlineStore)
    apply = store.apply_appends
    calls = 0

    async def second_apply_fails(encoded: Any, **options: Any) -> Any:  # the first batch of the walk lands;
        nonlocal calls  # the next one fails
        calls += 1
        if calls == 2:
            raise FeatureStoreError("injected: Redis went away while the batch was applied")
        return await apply(encoded, **options)

    monkeypatch.setattr(store, "apply_appends", second_apply_fails)
    second = consumer(store, lease_ms=300, name="second")
    done = StepResult()
    for _ in range(400):  # the leases expire after 300 ms; the second takes over and walks the pending lists
        step = await second.step()
        done.appended += step.appended
        if second.owned == set(range(SHARDS)) and step.read == 0 and done.appended == len(sent):
            break
        await asyncio.sleep(0.01)
    assert calls > 2 and second.metrics.registry.get_sample_value("rankserve_consumer_failed_batches_total") == 1
    assert done.appended == len(sent)
    for user in users:  # the newest CAP events of each user, in order
        got = (await store.fetch(user, [], max_sequence_length=CAP)).sequence
        mine = [e.timestamp for e in sent if e.user_id == user][-CAP:]
        np.testing.assert_array_equal(got.timestamp[-len(mine):], mine)
    for shard in range(SHARDS):
        assert client.xpending(ev.stream_key(shard), ev.GROUP)["pending"] == 0
    await second.close()


async def test_a_consumer_takes_a_shard_whose_lease_already_names_it(store: OnlineStore, backend: Backend) -> None:
    """A lease taken by a command whose reply was lost (and that was then repeated) names the
    consumer already: it must count as taken, not leave the shard unread until it expires."""
    c = consumer(store, lease_ms=60_000, name="solo")
    client = sync_client(backend)
    client.set(ev.lease_key(2), "solo", px=60_000)
    await c.rebalance(force=True)
    assert c.owned == set(range(SHARDS))
    assert 59_000 < client.pttl(ev.lease_key(2)) <= 60_000
    client.set(ev.lease_key(2), "another", px=60_000)  # another consumer's lease is still respected
    await c._release([2])  # it lets go, and deletes only a lease of its own
    assert client.get(ev.lease_key(2)) == b"another"
    await c.rebalance(force=True)
    assert c.owned == {0, 1, 3}
    await c.close()


async def test_consumers_split_the_shards_fairly(store: OnlineStore) -> None:
    await ingested(store)
    a, b = consumer(store, name="a"), consumer(store, name="b")
    await a.rebalance(force=True)
    assert len(a.owned) == SHARDS
    await b.rebalance(force=True)  # b sees two live consumers; a still holds everything
    await a.rebalance(force=True)  # a gives back down to its fair share
    await b.rebalance(force=True)  # b takes the rest
    assert len(a.owned) == len(b.owned) == SHARDS // 2
    assert a.owned.isdisjoint(b.owned)
    await a.close()
    await b.rebalance(force=True)  # a left: b takes every shard
    assert b.owned == set(range(SHARDS))
    await b.close()
