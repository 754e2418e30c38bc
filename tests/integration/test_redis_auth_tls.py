"""Redis AUTH and TLS, configured through the URL alone (SECURITY.md): `redis://:PASSWORD@...`
and `rediss://...?ssl_ca_certs=CA`. The feature store ingests and reads back through each; a
wrong or missing password and a plaintext client on the TLS port are typed, retriable errors
within the call deadline, whose messages never contain the password."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from feature_store.errors import FeatureStoreError, FeatureStoreUnavailable
from feature_store.redis_store import create_store
from feature_store.store import FeatureStoreConfig
from ingest.bulk import ingest_log
from tests.e2e.conftest import FEATURE_VERSION, tiny_event_log
from tests.helpers import tiny_schema
from tests.integration.conftest import TEST_STORE_SETTINGS
from tests.secure_redis import OPENSSL, REDIS_SERVER, SecureRedis, make_certs, valkey_binary

pytestmark = pytest.mark.timeout(120)

PASSWORD = "s3cret-Pa55word-for-tests"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    with SecureRedis(valkey_binary(), tmp_path_factory.mktemp("auth"), PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    if REDIS_SERVER is None or OPENSSL is None:
        pytest.skip("TLS needs Debian's redis-server (built with TLS; `make redis-server`) and openssl")
    root = tmp_path_factory.mktemp("tls")
    certs = make_certs(root / "certs")
    server = SecureRedis(REDIS_SERVER, root / "server", PASSWORD, certs)
    try:
        server.start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS support: {exc}")
        raise
    try:
        yield server
    finally:
        server.stop()


def roundtrip(url: str) -> int:
    """Ingest the tiny data set through `url`, then fetch the long user's history back."""
    schema = tiny_schema()
    events = tiny_event_log(schema)

    async def run() -> int:
        async with create_store(FeatureStoreConfig.model_validate({"url": url, **TEST_STORE_SETTINGS})) as store:
            await ingest_log(store, events, schema, FEATURE_VERSION, activate=True)
            health = await store.health()
            assert health.ok and health.active_version == FEATURE_VERSION, health
            result = await store.fetch(int(schema.users.ids[-1]), [int(schema.items.ids[0])])
            return len(result.sequence)

    return asyncio.run(run())


def refused(url: str) -> FeatureStoreError:
    async def run() -> FeatureStoreError:
        async with create_store(FeatureStoreConfig.model_validate({"url": url, **TEST_STORE_SETTINGS})) as store:
            started = time.monotonic()
            with pytest.raises(FeatureStoreError) as info:
                await store.active_version(refresh=True)
            assert time.monotonic() - started < TEST_STORE_SETTINGS["request_timeout_s"] + 0.5  # type: ignore[operator]
            health = await store.health()  # never raises; says why
            assert not health.ok and health.error and PASSWORD not in health.error
            return info.value

    return asyncio.run(run())


def test_password_in_the_url(auth_server: SecureRedis) -> None:
    assert roundtrip(auth_server.url()) == 300


@pytest.mark.parametrize("password", ["wrong-password", ""])
def test_wrong_or_missing_password_is_refused(auth_server: SecureRedis, password: str) -> None:
    url = auth_server.url(password) if password else f"redis://127.0.0.1:{auth_server.port}/0"
    err = refused(url)
    assert isinstance(err, FeatureStoreError)
    text = f"{err} {err.__cause__}"
    assert PASSWORD not in text and (not password or password not in text)
    assert any(word in text for word in ("Authentication", "NOAUTH", "invalid", "WRONGPASS")), text


def test_tls_with_password(tls_server: SecureRedis) -> None:
    assert roundtrip(tls_server.tls_url()) == 300
    from feature_store.connections import FastSSLConnection

    async def connection_class() -> type:
        async with create_store(FeatureStoreConfig(url=tls_server.tls_url())) as store:
            connection_class: type = getattr(store, "client").connection_pool.connection_class  # noqa: B009
            return connection_class

    assert asyncio.run(connection_class()) is FastSSLConnection


def test_tls_failures_are_typed_errors(tls_server: SecureRedis, tmp_path: Path) -> None:
    assert tls_server.tls_port is not None
    plaintext = refused(f"redis://:{PASSWORD}@127.0.0.1:{tls_server.tls_port}/0")  # plaintext to the TLS port
    assert isinstance(plaintext, FeatureStoreUnavailable)
    untrusted = refused(tls_server.tls_url(ca=False))  # the system CAs do not know the test CA
    assert isinstance(untrusted, FeatureStoreUnavailable)
    assert "certificate" in f"{untrusted} {untrusted.__cause__}".lower()
    wrong_password = refused(tls_server.tls_url(password="nope"))
    assert PASSWORD not in str(wrong_password)
