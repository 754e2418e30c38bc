"""A bundle refused for another feature schema is told which fields differ, from the schema the
store recorded at ingest (`rs:meta:<ver>:schema`, read by `service.lifecycle.StoreSchemaHash`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from feature_store.schema import FeatureSchema, SchemaSpec, TaskSpec
from feature_store.store import StoredSchema
from service.errors import BundleRejected
from service.registry import ModelRegistry
from service.retrieval import make_retriever
from service.settings import Settings
from tests.helpers import tiny_model, tiny_schema


class StoreHash:
    """What `StoreSchemaHash` gives the registry: the store's schema hash, and its recorded schema."""

    def __init__(self, value: str, schema: StoredSchema | None) -> None:
        self.value = value
        self.schema = schema

    def __call__(self) -> str:
        return self.value


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureSchema]:
    from export.exporter import write_bundle

    root = tmp_path_factory.mktemp("mismatch")
    schema = tiny_schema()
    schema.save(root / "schema")
    return write_bundle(tiny_model(schema), root / "schema", {}, root / "models", "tiny"), schema


def registry(store_hash: StoreHash, model_dir: Path) -> ModelRegistry:
    settings = Settings(model_dir=model_dir, scorer_threads=1, poll_interval_s=0, retrieval_strategy="exact")
    return ModelRegistry(settings, lambda: make_retriever("exact"), schema_hash=store_hash)


def refusal(store_hash: StoreHash, path: Path) -> str:
    with pytest.raises(BundleRejected) as info:
        registry(store_hash, path.parent.parent).load(path)
    return info.value.message


def test_refusal_names_the_differing_fields(bundle: tuple[Path, FeatureSchema]) -> None:
    path, schema = bundle
    tasks = (*schema.spec.tasks[:-1], dataclasses.replace(schema.spec.tasks[-1], weight=99.0))
    other = dataclasses.replace(schema.spec, tasks=tasks, max_sequence_length=77)
    message = refusal(StoreHash("f" * 64, StoredSchema("f" * 64, other.to_dict())), path)
    assert "does not match the feature store's active schema ffffffffffff" in message
    assert "they differ in: tasks, max_sequence_length" in message, message
    assert "rankserve ingest --schema" in message


def test_refusal_for_other_vocabularies_and_without_a_record(bundle: tuple[Path, FeatureSchema]) -> None:
    path, schema = bundle
    same_spec = refusal(StoreHash("e" * 64, StoredSchema("e" * 64, schema.spec.to_dict())), path)
    assert "same spec and side features: the vocabularies differ" in same_spec
    # No record (an ingest from before it), a record of another hash, or an unreadable one: today's message.
    for stored in (None, StoredSchema("d" * 64, schema.spec.to_dict()), StoredSchema("e" * 64, {"format": 1})):
        message = refusal(StoreHash("e" * 64, stored), path)
        assert "differ" not in message and "does not match the feature store's active schema" in message


def test_same_hash_loads(bundle: tuple[Path, FeatureSchema]) -> None:
    path, schema = bundle
    other = SchemaSpec(name="other", tasks=(TaskSpec("click", ("click",)),))
    loaded = registry(StoreHash(schema.hash, StoredSchema(schema.hash, other.to_dict())), path.parent.parent).load(path)
    assert loaded.bundle.schema.hash == schema.hash


async def test_store_schema_hash_reads_the_record_once_per_hash() -> None:
    import asyncio

    from service.lifecycle import StoreSchemaHash

    class Store:
        def __init__(self) -> None:
            self.hash: str | None = "a" * 64
            self.reads = 0

        async def active_schema_hash(self) -> str | None:
            return self.hash

        async def active_schema(self) -> StoredSchema | None:
            self.reads += 1
            return StoredSchema(str(self.hash), {}) if self.hash else None

    store = Store()
    tracker = StoreSchemaHash(store, asyncio.get_running_loop())  # type: ignore[arg-type]
    assert await tracker.refresh() == "a" * 64 and tracker.schema is not None and store.reads == 1
    await tracker.refresh()
    assert store.reads == 1  # the same hash: not read again
    store.hash = "b" * 64
    await tracker.refresh()
    assert store.reads == 2 and tracker.schema is not None and tracker.schema.schema_hash == "b" * 64
