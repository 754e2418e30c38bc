"""Sharded bulk loads (`rankserve ingest --shard I/N`) against real servers: three shards loading
the synthetic set side by side into the 3-master Cluster write exactly the keys and bytes of a
one-process load, and the version turns complete and active only once the last shard is done.
Per-shard resume, the refusals that keep two data sets out of one version, `--finish-shards`
and dropping a sharded version run on the embedded Valkey."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import redis

from feature_store.errors import VersionConflict
from feature_store.redis_store import create_store
from feature_store.schema import FeatureSchema
from feature_store.spec import FeatureSpec
from feature_store.store import STATUS_COMPLETE, STATUS_INGESTING, FeatureStoreConfig
from ingest import bulk
from ingest.bulk import IngestStats, ingest_dataset, schema_from_dataset, shard_record
from models.data.events import Dataset
from tests.integration.conftest import CONTRACT_TIMEOUTS, Backend, assert_same_sequence, expected_sequence

SHARDS = 3


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset, FeatureSchema]:
    """The synthetic set with its side tables (users.csv, items.csv, items without events)."""
    synth = pytest.importorskip("models.data.synth")
    readers = pytest.importorskip("models.data.readers")
    out = tmp_path_factory.mktemp("synth-shards")
    # Some users exceed the cap of 2,000 events the schema is given below.
    synth.generate(
        synth.SynthParams(users=40, items=3_000, categories=40, events_min=30, events_max=3_000, seed=11),
        out,
        progress=False,
    )
    dataset = readers.load_spec_dataset(FeatureSpec.load(out / synth.SPEC_FILE), out)
    schema = schema_from_dataset(dataset)
    return out, dataset, dataclasses.replace(schema, spec=dataclasses.replace(schema.spec, max_sequence_length=2_000))


async def load_shards(
    config: FeatureStoreConfig, dataset: Dataset, schema: FeatureSchema, version: str, shards: list[int],
    **kwargs: object,
) -> list[IngestStats]:
    """Shards `shards` of SHARDS side by side, each with a store (connections) of its own, as
    separate processes or pods would."""

    async def one(index: int) -> IngestStats:
        async with create_store(config) as store:
            return await ingest_dataset(store, dataset, schema, version, shard=(index, SHARDS), batch_users=3,
                                        **kwargs)

    return list(await asyncio.gather(*(one(i) for i in shards)))


def stored_values(backend: Backend, version: str) -> dict[bytes, bytes]:
    """Every data key of `version` on every node (without the version prefix) and its value."""
    prefix = f"rs:{version}:".encode()
    out: dict[bytes, bytes] = {}
    for port in backend.ports:
        client = redis.Redis(port=port, socket_timeout=10)
        try:
            for key in client.scan_iter(match=prefix + b"*", count=1000):
                value = client.get(key)  # the key lives on the node that listed it
                assert isinstance(key, bytes) and isinstance(value, bytes)
                out[key.removeprefix(prefix)] = value
        finally:
            client.close()
    return out


async def test_three_shards_into_the_cluster_equal_a_one_process_load(
    cluster_backend: Backend, synth_set: tuple[Path, Dataset, FeatureSchema]
) -> None:
    cluster_backend.flush()
    config = cluster_backend.store_config(**CONTRACT_TIMEOUTS)
    _, dataset, schema = synth_set
    events = dataset.events
    async with create_store(config) as store:
        one = await ingest_dataset(store, dataset, schema, "one", batch_users=5)
    assert one.table_users == 0 and one.users == len(np.unique(events.user_id))
    expected = stored_values(cluster_backend, "one")
    assert len(expected) == 2 * one.users + one.items  # a profile and a sequence per user, a value per item

    # Two shards side by side: each is done, the version waits for the third.
    early = await load_shards(config, dataset, schema, "sh", [0, 1], activate=True)
    assert [s.shard for s in early] == ["0/3", "1/3"]
    assert not any(s.complete or s.activated for s in early)
    async with create_store(config) as store:
        meta = await store.get_meta("sh")
        assert meta is not None and meta.status == STATUS_INGESTING
        assert await store.active_version(refresh=True) is None
        with pytest.raises(VersionConflict):
            await store.activate("sh")
    # The third completes and activates it.
    (last,) = await load_shards(config, dataset, schema, "sh", [2], activate=True)
    assert last.complete and last.activated
    shards = [*early, last]
    # The shards partition the users and the items, and write exactly what one process writes.
    assert sum(s.users for s in shards) == one.users and all(s.users > 0 for s in shards)
    assert sum(s.items for s in shards) == one.items and all(s.items > 0 for s in shards)
    assert sum(s.events for s in shards) == one.events
    assert stored_values(cluster_backend, "sh") == expected

    # All three at the same moment: whichever sees the others done completes and activates it.
    together = await load_shards(config, dataset, schema, "all3", [0, 1, 2], activate=True)
    assert any(s.complete and s.activated for s in together)
    assert stored_values(cluster_backend, "all3") == expected

    async with create_store(config) as store:
        assert await store.active_version(refresh=True) == "all3"
        one_meta = await store.get_meta("one")
        assert one_meta is not None
        for version in ("sh", "all3"):
            meta = await store.get_meta(version)
            assert meta is not None and meta.status == STATUS_COMPLETE and meta.info["shards"] == SHARDS
            for name in ("users", "events", "items", "table_users", "bytes"):
                assert meta.counts[name] == one_meta.counts[name], (version, name)
        # Every sequence reads back as the user's newest events.
        cap = schema.spec.max_sequence_length
        for user in np.unique(events.user_id).tolist():
            got = await store.fetch(int(user), [], max_sequence_length=cap)
            assert got.user_index == int(schema.users.lookup([user])[0])
            assert_same_sequence(got.sequence, expected_sequence(events, schema, int(user), cap))


@pytest.fixture
def valkey(valkey_backend: Backend) -> Backend:
    valkey_backend.flush()
    return valkey_backend


def test_shard_resume_refusals_finish_and_drop(
    valkey: Backend, synth_set: tuple[Path, Dataset, FeatureSchema]
) -> None:
    config = valkey.store_config(**CONTRACT_TIMEOUTS)
    synth_dir, dataset, schema = synth_set

    def shards(version: str, which: list[int], **kwargs: object) -> list[IngestStats]:
        return asyncio.run(load_shards(config, dataset, schema, version, which, **kwargs))

    (first,) = shards("v1", [1])
    assert first.users > 0 and not first.complete
    # A resumed shard that is done has nothing left to write.
    (again,) = shards("v1", [1], resume=True)
    assert again.users == 0 and again.resumed_from_user == first.users

    async def checks() -> None:
        async with create_store(config) as store:
            record = await store.get_meta(shard_record("v1", 1, SHARDS))
            assert record is not None and record.status == STATUS_COMPLETE
            assert record.counts["users"] == first.users
            assert await bulk.latest_incomplete_version(store, schema.hash) is None  # sharded: named, not guessed
            assert await bulk.finish_shards(store, "v1", SHARDS) == [0, 2]
            # Other source data, another shard count, a one-process resume: refused.
            other = dataset.events.select(dataset.events.user_id != dataset.events.user_id[0])
            with pytest.raises(VersionConflict, match="different source data"):
                await bulk.ingest_log(store, other, schema, "v1", shard=(0, SHARDS))
            with pytest.raises(VersionConflict, match="in 3 shards, not 2"):
                await ingest_dataset(store, dataset, schema, "v1", shard=(0, 2))
            with pytest.raises(VersionConflict, match="resume each with --shard"):
                await ingest_dataset(store, dataset, schema, "v1", resume=True)
            assert await bulk.finish_shards(store, "v1", SHARDS) == [0, 2]  # the refused ones wrote no record

    asyncio.run(checks())
    shards("v1", [0, 2], activate=False)
    assert asyncio.run(version_state(config, "v1")) == (STATUS_COMPLETE, None)
    # The fallback step completes (idempotently) and activates; a wrong count is refused.
    target = ["--redis-url", str(valkey.config.url)]
    assert cli(*target, "--version", "v1", "--finish-shards", "3", "--activate") == 0
    assert cli(*target, "--version", "v1", "--finish-shards", "2") == 1
    assert asyncio.run(version_state(config, "v1")) == (STATUS_COMPLETE, "v1")
    (v2,) = shards("v2", [0])
    assert not v2.complete
    assert cli(*target, "--version", "v2", "--finish-shards", "3") == 1  # shards 1 and 2 have not run
    assert cli(*target, "--list-versions") == 0

    # The command line: two shards, one after the other; only the second completes and activates.
    data = ["--data", f"synthetic:{synth_dir}", "--no-progress", "--version", "c1", "--activate"]
    assert cli(*data, *target, "--shard", "1/2") == 0
    assert asyncio.run(version_state(config, "c1")) == (STATUS_INGESTING, "v1")
    assert cli(*data, *target, "--shard", "0/2", "--resume") == 0
    assert asyncio.run(version_state(config, "c1")) == (STATUS_COMPLETE, "c1")

    # Dropping a sharded version drops its shard records too (the active one is refused, records kept).
    assert cli(*target, "--drop-version", "c1") == 1
    assert shard_record("c1", 0, 2) in asyncio.run(versions(config))
    assert cli(*target, "--drop-version", "v1") == 0
    assert cli(*target, "--drop-version", "v2") == 0
    assert asyncio.run(versions(config)) == ["c1", shard_record("c1", 0, 2), shard_record("c1", 1, 2)]


async def version_state(config: FeatureStoreConfig, version: str) -> tuple[str | None, str | None]:
    async with create_store(config) as store:
        meta = await store.get_meta(version)
        return (meta.status if meta else None), await store.active_version(refresh=True)


async def versions(config: FeatureStoreConfig) -> list[str]:
    async with create_store(config) as store:
        return await store.list_versions()


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bulk.add_arguments(parser)
    return bulk.run(parser.parse_args(list(argv)))
