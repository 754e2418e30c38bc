"""Fault-injection fixtures. The servers, the tiny bundle and the shared store are the e2e
suite's (`tests/e2e/conftest.py`, imported here rather than copied); what is added is a private
Valkey that a test may kill and restart, holding the same data as the shared one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from feature_store.embedded import EmbeddedValkey
from feature_store.redis_store import create_store
from feature_store.store import EmbeddedConfig, FeatureStoreConfig
from ingest.bulk import ingest_log
from tests.e2e.conftest import FEATURE_VERSION, World, make_server, tiny_event_log, world
from tests.integration.conftest import fault_backend

# the e2e fixtures and the integration suite's private servers, registered for tests/fault too
__all__ = ["fault_backend", "make_server", "private_valkey", "world"]


def ingest_world(url: str, world: World) -> None:
    """The e2e data set (same schema, same events) into the store at `url`, activated."""

    async def run() -> None:
        async with create_store(FeatureStoreConfig(url=url)) as store:
            await ingest_log(store, tiny_event_log(world.schema), world.schema, FEATURE_VERSION, activate=True)

    asyncio.run(run())


@pytest.fixture
def private_valkey(tmp_path: Path, world: World) -> Iterator[EmbeddedValkey]:
    """A Valkey of this test's own, with the e2e data snapshotted to disk, so that after
    `kill()` (SIGKILL) a `restart()` on the same port comes back with the same data."""
    valkey = EmbeddedValkey(EmbeddedConfig(data_dir=str(tmp_path / "valkey"), persistence="rdb"))
    valkey.start()
    try:
        ingest_world(valkey.url, world)
        client = redis.Redis(port=valkey.port, socket_timeout=30)
        client.save()
        client.close()
        yield valkey
    finally:
        valkey.stop()
