"""The fetch's own connections on a single node (`connections.LeanReads`), against real servers:
the replies redis-py's pipeline gives, its exceptions for error replies, and no connection
reused after a call that did not read all its replies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from redis import exceptions as rex

from feature_store.connections import LeanReads, lean_reads_for, single_client
from tests.integration.conftest import Backend

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["valkey", "redis"])
def node(request: pytest.FixtureRequest) -> Backend:
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    backend.flush()
    return backend


def lean(node: Backend, **overrides: Any) -> tuple[LeanReads, Any]:
    config = node.store_config(**overrides)
    client = single_client(config, config.url)
    reads = lean_reads_for(client, config)
    assert reads is not None
    return reads, client


async def test_replies_are_redis_pys(node: Backend) -> None:
    reads, client = lean(node)
    try:
        await client.set(b"p", b"\x00profile")
        await client.set(b"s", bytes(range(240)) * 500)
        commands: list[tuple[Any, ...]] = [
            ("GET", b"p"), ("GET", b"absent"), ("GETRANGE", b"s", -1200, -1), ("STRLEN", b"s"),
            ("MGET", b"p", b"absent", b"s"),
        ]
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        assert await reads.execute(commands) == await pipe.execute()
    finally:
        reads.close()
        await client.aclose()


async def test_an_error_reply_raises_redis_pys_exception_and_the_connection_stays_usable(node: Backend) -> None:
    reads, client = lean(node, pool_size=1)
    try:
        await client.hset(b"h", b"f", b"v")
        with pytest.raises(rex.ResponseError, match="WRONGTYPE"):
            await reads.execute([("GET", b"p"), ("GET", b"h")])
        assert await reads.execute([("STRLEN", b"h2")]) == [0]  # all replies were read: in step
    finally:
        reads.close()
        await client.aclose()


async def test_a_call_cut_off_closes_its_connection(node: Backend) -> None:
    reads, client = lean(node, pool_size=1, read_timeout_s=0.2)
    try:
        with pytest.raises(rex.TimeoutError):
            await reads.execute([("BLPOP", b"empty-list", 2)])  # answers after the read timeout
        # its late reply must not be taken for the next call's: a new connection answers
        await client.rpush(b"empty-list", b"x")
        assert await reads.execute([("GET", b"p"), ("LLEN", b"empty-list")]) == [None, 1]

        call = asyncio.ensure_future(reads.execute([("BLPOP", b"other-list", 2)]))
        await asyncio.sleep(0.05)
        with pytest.raises(rex.MaxConnectionsError):  # pool_size 1, and that one is busy
            await reads.execute([("GET", b"p")])
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await reads.execute([("LLEN", b"other-list")]) == [0]
    finally:
        reads.close()
        await client.aclose()


async def test_a_password_is_sent_on_connect(node: Backend) -> None:
    admin = redis.Redis(port=node.ports[0])
    admin.execute_command("ACL", "SETUSER", "lean", "on", ">s3cret", "~*", "+@all")
    try:
        config = node.store_config(url=f"redis://lean:s3cret@127.0.0.1:{node.ports[0]}/0")
        client = single_client(config, config.url)
        reads = lean_reads_for(client, config)
        assert reads is not None
        await client.set(b"p", b"v")
        assert await reads.execute([("GET", b"p"), ("ACL", "WHOAMI")]) == [b"v", b"lean"]
        reads.close()
        await client.aclose()
        wrong = node.store_config(url=f"redis://lean:nope@127.0.0.1:{node.ports[0]}/0")
        reads = lean_reads_for(single_client(wrong, wrong.url), wrong)
        assert reads is not None
        with pytest.raises(rex.AuthenticationError):
            await reads.execute([("GET", b"p")])
        reads.close()
    finally:
        admin.execute_command("ACL", "DELUSER", "lean")
        admin.close()


def test_a_tls_url_reads_through_redis_py(node: Backend) -> None:
    config = node.store_config(url=f"rediss://127.0.0.1:{node.ports[0]}/0")
    assert lean_reads_for(single_client(config, config.url), config) is None
