"""Store configuration, mode selection and the retry policy (no server needed)."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from feature_store.errors import FeatureStoreError, FeatureStoreTimeout, FeatureStoreUnavailable, VersionNotFound
from feature_store.store import FeatureStoreConfig, RetryPolicy, VersionMeta


def test_mode_resolution() -> None:
    assert FeatureStoreConfig().resolved_mode() == "embedded"
    assert FeatureStoreConfig(url="redis://h:6379/0").resolved_mode() == "single"
    assert FeatureStoreConfig(url="rediss://u:p@h:6380").resolved_mode() == "single"
    nodes = FeatureStoreConfig(cluster_nodes="a:1, b:2,c:3")  # type: ignore[arg-type]
    assert nodes.cluster_nodes == ["a:1", "b:2", "c:3"] and nodes.resolved_mode() == "cluster"
    assert FeatureStoreConfig(mode="cluster", url="redis://h:7000").resolved_mode() == "cluster"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "http://h"},
        {"cluster_nodes": ["nohost"]},
        {"cluster_nodes": ["h:port"]},
        {"mode": "single"},
        {"mode": "cluster"},
        {"read_timeout_s": 0},
        {"retry_attempts": 0},
        {"backend": "memcached"},
        {"unknown_field": 1},
    ],
)
def test_invalid_configs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FeatureStoreConfig(**kwargs)  # type: ignore[arg-type]


def test_from_env() -> None:
    env = {"REDIS_URL": "redis://:secret@db:6379/0"}
    assert FeatureStoreConfig.from_env(env).url == "redis://:secret@db:6379/0"
    cfg = FeatureStoreConfig.from_env({"REDIS_CLUSTER_NODES": "n1:7000,n2:7000"}, read_timeout_s=0.1)
    assert cfg.resolved_mode() == "cluster" and cfg.read_timeout_s == 0.1
    assert FeatureStoreConfig.from_env({}, url=None).resolved_mode() == "embedded"  # None overrides are ignored


def test_retry_backoff_is_bounded_exponential_full_jitter() -> None:
    policy = RetryPolicy(attempts=5, base_s=0.01, max_s=0.05, deadline_s=1.0)
    rng = random.Random(0)
    for failed, ceiling in ((1, 0.01), (2, 0.02), (3, 0.04), (4, 0.05), (9, 0.05)):
        samples = [policy.backoff(failed, rng) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > 0.8 * ceiling  # jitter covers the range
    assert RetryPolicy.from_config(FeatureStoreConfig(request_timeout_s=2.5)).deadline_s == 2.5


def test_error_hierarchy() -> None:
    assert issubclass(FeatureStoreTimeout, FeatureStoreUnavailable)
    assert FeatureStoreUnavailable("x").retriable and FeatureStoreUnavailable("x").http_status == 503
    assert FeatureStoreTimeout("x").grpc_code == "DEADLINE_EXCEEDED"
    assert not FeatureStoreError("x").retriable and FeatureStoreError("x", retriable=True).retriable
    assert VersionNotFound("x").http_status == 503 and not VersionNotFound("x").retriable


def test_version_meta_json_roundtrip_ignores_unknown_fields() -> None:
    meta = VersionMeta(version="v1", schema_hash="h", counts={"users": 3}, checkpoint={"next_user": 2})
    back = VersionMeta.from_json(meta.to_json())
    assert back == meta
    assert VersionMeta.from_json(b'{"version": "v2", "schema_hash": "h", "future": 1}').version == "v2"


def test_fast_packer_sends_the_same_bytes_as_redis_py() -> None:
    from redis.asyncio.connection import Connection

    from feature_store.connections import FastConnection

    commands = [
        ("MGET", *(b"rs:v1:i:%d" % i for i in range(600))),
        ("GETRANGE", b"rs:v1:{u1}:seq", -120_000, -1),
        ("SET", b"k", b"\x00\xff" * 70_000, "EX", 300),
        ("EVALSHA", "abc", 1, b"key", b"payload", 1200, 0),
        ("CLIENT SETINFO", "LIB-NAME", "redis-py"),  # two-word command names are split alike
        ("SET", "unicode-ключ", "значение"),
    ]
    fast, slow = FastConnection(), Connection()
    assert b"".join(fast.pack_commands(commands)) == b"".join(slow.pack_commands(commands))


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:1/0", "FastConnection"),
        ("rediss://alice:s3cret@127.0.0.1:1/0", "FastSSLConnection"),
        ("unix:///tmp/nowhere.sock", "FastUnixDomainSocketConnection"),
    ],
)
def test_url_selects_transport_and_credentials(url: str, kind: str) -> None:
    import asyncio

    from feature_store.redis_store import create_store

    store = create_store(FeatureStoreConfig(url=url))
    try:
        pool = store.client.connection_pool  # type: ignore[attr-defined]
        assert pool.connection_class.__name__ == kind
        assert pool.connection_kwargs["socket_timeout"] == 0.5
        if "alice" in url:
            assert pool.connection_kwargs["username"] == "alice" and pool.connection_kwargs["password"] == "s3cret"
    finally:
        asyncio.run(store.aclose())
