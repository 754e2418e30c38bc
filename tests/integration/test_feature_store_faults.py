"""Fault injection: a killed or hung server gives a typed retriable error within the deadline (never
a hang), and the same store object works again once the server is back on the same port."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from feature_store.errors import FeatureStoreError, FeatureStoreUnavailable
from feature_store.redis_store import create_store
from feature_store.schema import SchemaSpec
from feature_store.store import OnlineStore
from ingest.bulk import ingest_log, schema_from_log
from tests.integration.conftest import CONTRACT_TIMEOUTS, TEST_STORE_SETTINGS, Backend, make_events

pytestmark = pytest.mark.fault

DEADLINE = float(str(TEST_STORE_SETTINGS["request_timeout_s"]))
SLACK = 0.5  # scheduling noise on a loaded 2-core machine


async def load(backend: Backend) -> tuple[int, list[int]]:
    """Ingest a small data set through a store of its own with the contract tests' generous
    deadline: the setup is not what these tests time, and on a loaded machine the 1 s deadline
    of the store under test may not cover it."""
    events = make_events(n_users=4, min_events=500, max_events=2000)
    setup = create_store(backend.store_config(**CONTRACT_TIMEOUTS))
    try:
        await ingest_log(setup, events, schema_from_log(events, SchemaSpec()), "v1", activate=True)
    finally:
        await setup.aclose()
    return int(events.user_id[0]), np.unique(events.item_id)[:300].tolist()


async def timed_fetch(store: OnlineStore, user: int, items: list[int]) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        # The outer wait_for only guards the test against a hang; the store must answer first.
        await asyncio.wait_for(store.fetch(user, items), timeout=DEADLINE + 5)
    except (FeatureStoreError, TimeoutError) as exc:
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


async def test_kill_during_fetch_then_restart(fault_backend: Backend) -> None:
    store = create_store(fault_backend.store_config())
    try:
        user, items = await load(fault_backend)
        assert (await store.fetch(user, items)).found.all()

        # Fetches in flight while the server is SIGKILLed.
        async def hammer() -> list[tuple[float, BaseException | None]]:
            return [await timed_fetch(store, user, items) for _ in range(60)]

        runner = asyncio.gather(*(hammer() for _ in range(4)))
        await asyncio.sleep(0.02)
        fault_backend.kill()
        outcomes = [o for batch in await runner for o in batch]
        failures = [(t, e) for t, e in outcomes if e is not None]
        assert failures, "no fetch failed although the server was killed"
        for elapsed, exc in failures:
            assert isinstance(exc, FeatureStoreUnavailable), repr(exc)
            assert exc.retriable and exc.http_status == 503
            assert elapsed < DEADLINE + SLACK, f"failure took {elapsed:.3f}s"

        # Same port, fresh (empty) server: the same store object reconnects by itself.
        await asyncio.to_thread(fault_backend.restart)
        await asyncio.sleep(0.1)
        deadline = time.monotonic() + 15
        while True:
            elapsed, exc = await timed_fetch(store, user, items)
            if exc is None or time.monotonic() > deadline:
                break
            assert isinstance(exc, FeatureStoreError)
            await asyncio.sleep(0.2)
        assert exc is None, f"store did not recover after restart: {exc!r}"
        await load(fault_backend)  # the restarted server lost its data (no persistence): write it again
        result = await store.fetch(user, items)
        assert result.user_index is not None and result.found.all()
    finally:
        await store.aclose()


async def test_hung_server_times_out_then_recovers(fault_backend: Backend) -> None:
    store = create_store(fault_backend.store_config(item_cache_size=0))
    try:
        user, items = await load(fault_backend)
        fault_backend.freeze()
        try:
            elapsed, exc = await timed_fetch(store, user, items)
        finally:
            fault_backend.thaw()
        assert isinstance(exc, FeatureStoreUnavailable), repr(exc)
        assert exc.retriable
        assert elapsed < DEADLINE + SLACK, f"hung server held the fetch for {elapsed:.3f}s"
        deadline = time.monotonic() + 15
        while (await timed_fetch(store, user, items))[1] is not None:
            assert time.monotonic() < deadline, "store did not recover after the server resumed"
            await asyncio.sleep(0.1)
        assert (await store.fetch(user, items)).found.all()
    finally:
        await store.aclose()


async def test_unreachable_server_fails_fast_with_bounded_retries() -> None:
    from feature_store.embedded import free_port
    from feature_store.store import FeatureStoreConfig

    config = FeatureStoreConfig(url=f"redis://127.0.0.1:{free_port()}/0", **TEST_STORE_SETTINGS)  # type: ignore[arg-type]
    store = create_store(config)
    try:
        start = time.monotonic()
        with pytest.raises(FeatureStoreUnavailable) as info:
            await store.fetch(1, [1, 2], version="v1")
        assert time.monotonic() - start < DEADLINE + SLACK
        assert "attempt 3" in str(info.value)  # retried, and only retry_attempts times
        health = await store.health()
        assert not health.ok and health.error
    finally:
        await store.aclose()


async def test_cluster_slot_migration_is_followed(cluster_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot moved after the store loaded its slot map: the fast per-node read sees MOVED, falls
    back to the cluster pipeline (which follows redirections) and refreshes the map."""
    import redis
    from redis.crc import key_slot

    from feature_store import keys

    cluster_backend.flush()
    store = create_store(cluster_backend.store_config())
    try:
        user, items = await load(cluster_backend)
        before = await store.fetch(user, items)
        slot = key_slot(keys.profile_key("v1", user))
        clients = [redis.Redis(port=p) for p in cluster_backend.ports]
        try:
            ids = [c.cluster("myid") for c in clients]
            ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
            owner = next(k for k, c in enumerate(clients) if c.cluster("countkeysinslot", slot) > 0)
            target = (owner + 1) % len(clients)
            src, dst = clients[owner], clients[target]
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[owner])
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
            moved = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
            src.execute_command("MIGRATE", "127.0.0.1", cluster_backend.ports[target], "", 0, 5000, "KEYS", *moved)
            for c in clients:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
        finally:
            for c in clients:
                c.close()
        from feature_store.redis_store import RedisOnlineStore

        fallbacks = []
        original = RedisOnlineStore._cluster_pipeline

        async def spy(client: object, commands: list[tuple[object, ...]]) -> list[object]:
            fallbacks.append(len(commands))
            return await original(client, commands)  # type: ignore[arg-type]

        monkeypatch.setattr(RedisOnlineStore, "_cluster_pipeline", staticmethod(spy))
        for _ in range(2):  # the first read is redirected, the second uses the refreshed map
            after = await store.fetch(user, items)
            assert after.user_index == before.user_index
            np.testing.assert_array_equal(after.sequence.item, before.sequence.item)
            assert after.found.all()
        assert len(fallbacks) == 1
    finally:
        await store.aclose()
