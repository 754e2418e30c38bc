"""A small asyncio load generator for the benchmark: closed loop at fixed concurrency, open loop at a rate.

The load generator shares the 2 cores with the server, so it must be cheap per request: REST
goes through a minimal HTTP/1.1 keep-alive client on asyncio streams (~30 µs of CPU a request,
against ~1 ms for httpx), gRPC through one `grpc.aio` channel (HTTP/2 multiplexes the calls).

* `closed_loop(call, concurrency, ...)`: `concurrency` workers, each sending its next request as
  soon as the previous one answers (latency under a fixed number of requests in flight);
* `open_loop(call, rate, ...)`: Poisson arrivals at `rate` per second whatever the answers do
  (latency at an offered load, so queueing shows up as it would with independent clients), with
  at most `max_inflight` outstanding (beyond that arrivals are counted as dropped).

A call is `async (i) -> None` that raises on a failed request; `i` is the request number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Call = Callable[[int], Awaitable[None]]


@dataclass
class LoadResult:
    """Latencies (ms) of the successful requests, failures, and the wall time of the run."""

    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0
    dropped: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            **latency_summary(self.latencies_ms),
            "failures": self.failures,
            "dropped": self.dropped,
            "throughput_rps": round(len(self.latencies_ms) / self.seconds, 2) if self.seconds else 0.0,
            "errors": self.errors[:3],
        }


def print_report(table: list[str], report: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark's markdown table; write its JSON report to `out` if given."""
    sys.stdout.write("\n".join(table) + "\n")
    if out is not None:
        out.write_text(json.dumps(report, indent=1))


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, Any]:
    """p50 / p95 / p99 / mean (ms, 2 decimals; None without samples) and the sample count `n`."""
    a = np.asarray(latencies_ms, dtype=np.float64)
    pct = {f"p{p}": round(float(np.percentile(a, p)), 2) if a.size else None for p in (50, 95, 99)}
    return {**pct, "mean": round(float(a.mean()), 2) if a.size else None, "n": int(a.size)}


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads Content-Length responses."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        reused = self._writer is not None
        try:
            return await self._post(path, body, headers)
        except asyncio.IncompleteReadError as exc:
            # the server closed an idle keep-alive connection (uvicorn: after 5 s) before reading the
            # request: nothing was processed, so send it once more on a fresh connection, as HTTP
            # clients do
            if not reused or exc.partial:
                raise
            return await self._post(path, body, headers)

    async def _post(self, path: str, body: bytes, headers: dict[str, str] | None) -> tuple[int, bytes]:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{extra}\r\n").encode()
        self._writer.write(head + body)
        try:
            status_line = await self._reader.readuntil(b"\r\n")
            length = 0
            while True:
                line = await self._reader.readuntil(b"\r\n")
                if line == b"\r\n":
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise
        return int(status_line.split()[1]), payload

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


class HttpPool:
    """Idle connections reused by concurrent requests (one request per connection at a time)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[HttpConnection] = []
        self._all: list[HttpConnection] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = HttpConnection(self.host, self.port)
            self._all.append(conn)
        try:
            return await conn.post(path, body, headers)
        finally:
            self._idle.append(conn)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()


async def _timed(call: Call, i: int, result: LoadResult, scheduled: float | None = None) -> None:
    """Run request `i` and record its latency, from `scheduled` when given (an open loop's arrival
    time: a client running late must not hide its lag from the latency) else from now."""
    t0 = time.perf_counter() if scheduled is None else scheduled
    try:
        await call(i)
    except Exception as exc:  # a failed request is data, not a crash of the run
        result.failures += 1
        if len(result.errors) < 10:
            result.errors.append(f"{type(exc).__name__}: {exc}"[:300])
        return
    result.latencies_ms.append((time.perf_counter() - t0) * 1000.0)


async def _workers(call: Call, concurrency: int, numbers: range, result: LoadResult) -> None:
    shared = iter(numbers)  # each worker takes the next request number when it is free

    async def worker() -> None:
        for i in shared:
            await _timed(call, i, result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def closed_loop(call: Call, concurrency: int, requests: int, warmup: int = 0) -> LoadResult:
    """`requests` requests by `concurrency` back-to-back workers (after `warmup` unrecorded ones)."""
    if warmup:
        await _workers(call, concurrency, range(warmup), LoadResult())
    result = LoadResult()
    t0 = time.perf_counter()
    await _workers(call, concurrency, range(warmup, warmup + requests), result)
    result.seconds = time.perf_counter() - t0
    return result


async def open_loop(call: Call, rate: float, seconds: float, max_inflight: int = 256, seed: int = 0) -> LoadResult:
    """Poisson arrivals at `rate`/s for `seconds`; latency includes any queueing at the server."""
    rng = random.Random(seed)
    result = LoadResult()
    inflight: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    next_at = t0
    i = 0
    while True:
        next_at += rng.expovariate(rate)
        if next_at - t0 > seconds:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(inflight) >= max_inflight:
            result.dropped += 1
            continue
        task = asyncio.create_task(_timed(call, i, result, next_at))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        i += 1
    if inflight:
        await asyncio.gather(*inflight)
    result.seconds = time.perf_counter() - t0
    return result


DEGRADED = "a degraded answer (ranked without the store's features): cheaper, not a served one"


def rest_call(pool: HttpPool, bodies: Sequence[bytes], path: str = "/v1/rank") -> Call:
    """POST bodies[i % n]; a non-200 answer or a degraded one is a failure."""

    async def call(i: int) -> None:
        status, payload = await pool.post(path, bodies[i % len(bodies)])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        if b'"degraded":true' in payload:  # the server's compact JSON; a byte search costs little
            raise RuntimeError(DEGRADED)

    return call


def grpc_call(stub: Any, messages: Sequence[Any], timeout: float = 30.0) -> Call:
    """stub.Rank(messages[i % n]) on a grpc.aio stub; a degraded answer is a failure."""

    async def call(i: int) -> None:
        reply = await stub.Rank(messages[i % len(messages)], timeout=timeout)
        if reply.degraded:
            raise RuntimeError(DEGRADED)

    return call
