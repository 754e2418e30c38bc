"""Ingestion of real and synthetic data, read back and compared with the source events exactly;
and the `rankserve ingest` command line, including the embedded default with persistence."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
import pytest

from feature_store.embedded import EmbeddedValkey
from feature_store.redis_store import create_store
from feature_store.schema import FeatureSchema
from feature_store.store import EmbeddedConfig, FeatureStoreConfig, OnlineStore, VersionMeta
from ingest import bulk as ingest
from ingest.bulk import ingest_log, schema_from_log
from models.data.events import EventLog
from tests.integration.conftest import Backend, assert_same_sequence, expected_sequence


async def assert_store_matches(
    store: OnlineStore,
    events: EventLog,
    schema: FeatureSchema,
    version: str,
    items: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Every user's stored sequence equals the newest `cap` source events; every item is found."""
    cap = schema.spec.max_sequence_length
    users, _ = events.user_offsets()
    sem = asyncio.Semaphore(16)

    async def check(user: int) -> None:
        async with sem:
            got = await store.fetch(user, [], max_sequence_length=cap, version=version)
        assert got.user_index == int(schema.users.lookup([user])[0])
        assert_same_sequence(got.sequence, expected_sequence(events, schema, user, cap))

    await asyncio.gather(*(check(int(u)) for u in users))
    item_ids, cat_ids = items if items is not None else events.item_catalogue()
    for k in range(0, len(item_ids), 500):
        got = await store.fetch(int(users[0]), item_ids[k : k + 500], max_sequence_length=0, version=version)
        assert got.found.all()
        np.testing.assert_array_equal(got.item_index, schema.items.lookup(item_ids[k : k + 500]))
        np.testing.assert_array_equal(got.category_index, schema.categories.lookup(cat_ids[k : k + 500]))


async def test_tmall_2014_roundtrip(store: OnlineStore) -> None:
    readers = pytest.importorskip("models.data.readers")
    try:
        events = readers.load_dataset("tmall")
    except readers.DataError as exc:
        pytest.skip(f"Tmall 2014 sample not available: {exc}")
    schema = schema_from_log(events)
    stats = await ingest_log(store, events, schema, "tmall", activate=True)
    assert stats.users == len(np.unique(events.user_id)) and stats.events == len(events)
    await assert_store_matches(store, events, schema, "tmall")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    synth = pytest.importorskip("models.data.synth")
    out = tmp_path_factory.mktemp("synth")
    # Some users exceed the 10,000-event cap (log-uniform lengths up to 12,000).
    synth.generate(
        synth.SynthParams(users=30, items=20_000, categories=100, events_min=200, events_max=12_000, seed=7),
        out,
        progress=False,
    )
    return out


async def test_synthetic_roundtrip(store: OnlineStore, synthetic_dir: Path) -> None:
    from models.data.synth import load_synthetic

    events = load_synthetic(synthetic_dir)
    catalogue = (
        np.load(synthetic_dir / "catalogue_item.npy").astype(np.int64),
        np.load(synthetic_dir / "catalogue_category.npy").astype(np.int64),
    )
    schema = schema_from_log(events)
    stats = await ingest_log(store, events, schema, "synth", catalogue=catalogue, batch_users=7, activate=True)
    lengths = np.diff(events.user_offsets()[1])
    assert lengths.max() > schema.spec.max_sequence_length  # the cap is exercised
    assert stats.events == int(np.minimum(lengths, schema.spec.max_sequence_length).sum())
    assert stats.items == 20_000
    await assert_store_matches(store, events, schema, "synth", items=catalogue)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    ingest.add_arguments(parser)
    return ingest.run(parser.parse_args(list(argv)))


def _target_args(backend: Backend) -> list[str]:
    if backend.name == "cluster":
        return ["--cluster-nodes", ",".join(backend.config.cluster_nodes)]
    return ["--redis-url", str(backend.config.url)]


async def _active(config: FeatureStoreConfig) -> tuple[str | None, list[str]]:
    async with create_store(config) as store:
        return await store.active_version(refresh=True), await store.list_versions()


def test_cli_ingest_activate_list_drop(
    backend: Backend, synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_CLUSTER_NODES", raising=False)
    target = _target_args(backend)
    data = ["--data", f"synthetic:{synthetic_dir}", "--no-progress"]
    assert _cli(*data, *target, "--version", "a1", "--activate", "--save-schema", str(tmp_path / "schema")) == 0
    # A bundle-like dir with the schema under schema/ is accepted too.
    (tmp_path / "bundle").mkdir()
    (tmp_path / "schema").rename(tmp_path / "bundle" / "schema")
    assert _cli(*data, *target, "--version", "a2", "--schema", str(tmp_path / "bundle")) == 0
    assert asyncio.run(_active(backend.config)) == ("a1", ["a1", "a2"])
    assert _cli(*target, "--list-versions") == 0
    assert _cli(*target, "--drop-version", "a1") == 1  # active: refused, exit code 1
    assert _cli(*target, "--drop-version", "a2") == 0
    assert asyncio.run(_active(backend.config)) == ("a1", ["a1"])


def test_cli_embedded_default_persists_between_runs(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_CLUSTER_NODES", raising=False)
    data_dir = tmp_path / "valkey"
    args = ["--embedded-data-dir", str(data_dir), "--persistence", "rdb"]
    assert _cli("--data", f"synthetic:{synthetic_dir}", "--no-progress", *args, "--version", "e1", "--activate") == 0
    assert (data_dir / "dump.rdb").exists()  # snapshot written on shutdown
    # A fresh embedded server on the same directory loads it: what `rankserve serve` will see.
    config = FeatureStoreConfig(embedded=EmbeddedConfig(data_dir=str(data_dir)))
    assert asyncio.run(_active(config)) == ("e1", ["e1"])


def test_embedded_second_process_attaches(tmp_path: Path) -> None:
    cfg = EmbeddedConfig(data_dir=str(tmp_path / "v"), persistence="none")
    with EmbeddedValkey(cfg) as owner:
        assert owner.owned and owner.is_running()
        with EmbeddedValkey(cfg) as guest:  # same dir: the lock is held, so attach instead of a 2nd server
            assert not guest.owned and guest.url == owner.url
        assert owner.is_running()  # the guest leaving does not stop the owner's server
    assert not owner.is_running()


async def test_a_version_being_dropped_is_not_loaded_resumed_or_completed(
    store: OnlineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop marks the version `dropping`, then deletes its keys: a one-process load under way
    stops at its next write, and a resume of a half-dropped version is refused (its checkpoint
    counts keys as written that the drop deleted)."""
    from feature_store.errors import VersionConflict, VersionNotFound
    from feature_store.store import STATUS_DROPPING
    from tests.integration.conftest import make_events

    events = make_events(n_users=12, seed=3)
    schema = schema_from_log(events)
    write_users = store.write_users
    calls = 0

    async def dropped_after_the_first_batch(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        await write_users(*args, **kwargs)  # type: ignore[arg-type]
        if calls == 1:  # what `--drop-version` does first, from another process
            meta = await store.get_meta("gone")
            assert meta is not None
            meta.status = STATUS_DROPPING
            await store.put_meta(meta)

    monkeypatch.setattr(store, "write_users", dropped_after_the_first_batch)
    with pytest.raises(VersionNotFound, match="'gone' is being dropped: this ingest stops"):
        await ingest_log(store, events, schema, "gone", batch_users=4, activate=True)
    assert calls == 1
    meta = await store.get_meta("gone")
    assert meta is not None and meta.status == STATUS_DROPPING  # not marked complete over the drop
    assert await store.active_version(refresh=True) != "gone"
    monkeypatch.undo()
    with pytest.raises(VersionConflict, match=r"is being dropped .* finish the drop with --drop-version gone"):
        await ingest_log(store, events, schema, "gone", batch_users=4, resume=True, activate=True)
    await store.drop_version("gone")
    await ingest_log(store, events, schema, "gone", batch_users=4, activate=True)  # loaded again after the drop
    assert await store.active_version(refresh=True) == "gone"


async def test_a_drop_that_begins_after_the_loads_check_is_not_undone(
    store: OnlineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drop begins between the load's check of the meta and its checkpoint write: the write is
    refused (the meta stays `dropping`, the version is neither completed nor activated)."""
    from feature_store.errors import VersionNotFound
    from feature_store.store import STATUS_DROPPING
    from tests.integration.conftest import make_events

    events = make_events(n_users=12, seed=4)
    schema = schema_from_log(events)
    write_users, get_meta = store.write_users, store.get_meta
    checked: dict[str, object] = {}

    async def stale_get_meta(version: str) -> object:  # the check read the meta just before the drop
        return checked.get(version) or await get_meta(version)

    async def dropped_after_the_first_batch(*args: object, **kwargs: object) -> None:
        await write_users(*args, **kwargs)  # type: ignore[arg-type]
        if not checked:
            meta = await get_meta("raced")
            assert meta is not None
            checked["raced"] = VersionMeta.from_json(meta.to_json())  # what the check will have seen
            meta.status = STATUS_DROPPING
            await store.put_meta(meta)

    monkeypatch.setattr(store, "write_users", dropped_after_the_first_batch)
    monkeypatch.setattr(store, "get_meta", stale_get_meta)
    with pytest.raises(VersionNotFound, match="'raced' is being dropped: this ingest stops"):
        await ingest_log(store, events, schema, "raced", batch_users=4, activate=True)
    monkeypatch.undo()
    meta = await store.get_meta("raced")
    assert meta is not None and meta.status == STATUS_DROPPING
    assert await store.active_version(refresh=True) != "raced"
    await store.drop_version("raced")


async def test_update_meta_writes_only_a_live_version(store: OnlineStore) -> None:
    from feature_store.store import STATUS_DROPPING

    meta = VersionMeta(version="upd", schema_hash="h")
    assert not await store.update_meta(meta)  # no meta yet: nothing created
    assert await store.get_meta("upd") is None
    await store.put_meta(meta)
    meta.counts["users"] = 3
    assert await store.update_meta(meta)
    stored = await store.get_meta("upd")
    assert stored is not None and stored.counts == {"users": 3}
    meta.status = STATUS_DROPPING
    await store.put_meta(meta)
    meta.status, meta.counts["users"] = "ingesting", 4
    assert not await store.update_meta(meta)  # being dropped: left as the drop wrote it
    stored = await store.get_meta("upd")
    assert stored is not None and stored.status == STATUS_DROPPING and stored.counts == {"users": 3}
    await store.drop_version("upd")


async def test_events_past_the_cap_are_not_checked_by_a_one_process_load(store: OnlineStore) -> None:
    """A sharded load selects each user's newest `cap` events before encoding; a one-process load
    must store and check the same ones, so an old event it drops cannot fail the load."""
    from feature_store.schema import SchemaSpec
    from tests.integration.conftest import make_events

    events = make_events(n_users=6, min_events=60, max_events=120, seed=4)
    users, offsets = events.user_offsets()
    events.timestamp[offsets[2]] = -5  # the third user's oldest event: before 1970, not a u32
    schema = schema_from_log(events, SchemaSpec(max_sequence_length=50))
    stats = await ingest_log(store, events, schema, "capped", batch_users=4, activate=True)
    assert stats.events == 6 * 50
    for user in users.tolist():
        got = await store.fetch(user, [], max_sequence_length=50, version="capped")
        assert_same_sequence(got.sequence, expected_sequence(events, schema, user, 50))
