"""Which store errors are safe to retry for a command that must not run twice."""

from __future__ import annotations


def test_connect_failures_are_told_from_failures_after_sending() -> None:
    """An append (not repeatable) is retried only when redis-py never connected: a real refused connect."""
    import asyncio

    from redis import exceptions as rex
    from redis.asyncio import Redis

    from feature_store.embedded import free_port
    from feature_store.redis_store import never_sent

    async def refused() -> BaseException:
        client = Redis(host="127.0.0.1", port=free_port("127.0.0.1"), socket_connect_timeout=2)
        try:
            await client.ping()
        except rex.RedisError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("nothing listens on a free port, yet the connect succeeded")

    assert never_sent(asyncio.run(refused()))
    assert never_sent(rex.TimeoutError("Timeout connecting to server"))
    assert not never_sent(rex.TimeoutError("Timeout reading from socket"))
    assert not never_sent(rex.ConnectionError("Connection closed by server."))
