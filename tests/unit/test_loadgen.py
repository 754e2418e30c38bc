"""The load generator's accounting: a degraded answer is a failure, and an open loop's latency
starts at the arrival it scheduled. Against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest

from loadtest.loadgen import DEGRADED, HttpPool, LoadResult, _timed, closed_loop, rest_call

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def serve(bodies: list[bytes]) -> asyncio.Server:
    """Answers request k with bodies[k % n], HTTP/1.1 keep-alive."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            await reader.readexactly(length)
            body = bodies[count % len(bodies)]
            count += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_degraded_answers_are_failures_not_latencies() -> None:
    server = await serve([b'{"items":[],"degraded":false}', b'{"items":[],"degraded":true}'])
    port = server.sockets[0].getsockname()[1]
    pool = HttpPool("127.0.0.1", port)
    try:
        result = await closed_loop(rest_call(pool, [b"{}"]), 1, 10)
    finally:
        await pool.close()
        server.close()
    assert (len(result.latencies_ms), result.failures) == (5, 5)
    assert result.errors[0].endswith(DEGRADED)


async def test_an_open_loop_latency_starts_at_the_scheduled_arrival() -> None:
    async def call(i: int) -> None:
        return None

    result = LoadResult()
    # a request the client sends 250 ms after its scheduled arrival (open_loop schedules on perf_counter)
    await _timed(call, 0, result, time.perf_counter() - 0.25)
    await _timed(call, 1, result)  # a closed loop's: from when it is sent
    assert result.latencies_ms[0] >= 250.0 > result.latencies_ms[1]
