"""Bounded load against a `rankserve serve` process: concurrent REST and gRPC clients that record
every request's outcome (timing, status, degraded flag, model), for the fault-injection tests.

Like `tests/e2e/test_hot_swap.Load`, but it also records the `degraded` flag and the HTTP or gRPC
status of every answer, can stop after a fixed number of requests (the soak), can mix in
deliberately invalid requests, and tracks how many requests are in flight (the SIGTERM test
sends its signal while some are).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import Server, World

# failures that happen at the connection, before a server could answer (a refused or closed
# socket; gRPC's UNAVAILABLE): expected from a server that has stopped accepting
CONNECTION_ERRORS = ("ConnectError", "RemoteProtocolError", "ReadError", "WriteError", "UNAVAILABLE")


@dataclass
class Outcome:
    started: float
    finished: float
    transport: str  # rest | grpc
    status: str  # "200", "422", ... for REST; a gRPC status code name; else the exception's class name
    degraded: bool | None = None
    model: str | None = None
    invalid: bool = False  # sent invalid on purpose: a 4xx / INVALID_ARGUMENT is the right answer
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("200", "OK")

    @property
    def correct(self) -> bool:
        """The answer this request should get: success, or a 4xx for a deliberately invalid one."""
        if self.invalid:
            return self.status in ("422", "INVALID_ARGUMENT")
        return self.ok

    @property
    def server_error(self) -> bool:
        return self.status.startswith("5") or self.status in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED")

    @property
    def latency(self) -> float:
        return self.finished - self.started


@dataclass
class LoadGen:
    server: Server
    world: World
    rest_clients: int = 3
    grpc_clients: int = 1
    pause_s: float = 0.02
    max_requests: int | None = None  # stop after this many (all clients together)
    invalid_every: int = 0  # every n-th request is invalid on purpose (0: never)
    timeout_s: float = 10.0
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    open_requests: dict[int, tuple[str, float]] = field(default_factory=dict)  # number -> (transport, started)
    _sent: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # -- requests -------------------------------------------------------------------------------------

    def _next(self) -> tuple[int, bool] | None:
        """The next request number and whether it is invalid; None once max_requests are sent."""
        if self.stop.is_set() or (self.max_requests is not None and self._sent >= self.max_requests):
            self.stop.set()
            return None
        i = self._sent
        self._sent += 1
        return i, bool(self.invalid_every and i % self.invalid_every == self.invalid_every - 1)

    def body(self, i: int, invalid: bool = False) -> dict[str, Any]:
        """Varied requests: the long-history user, short-history and unknown users, windows of
        known items plus an unknown one."""
        w = self.world
        users = [w.long_user, int(w.schema.users.ids[i % 20]), w.unknown_user]
        items = w.known_items
        start = (i * 7) % (len(items) - 30)
        body: dict[str, Any] = {"user_id": users[i % 3], "candidates": [*items[start : start + 25], w.unknown_item],
                                "top_n": 10}
        if invalid:
            body["top_n"] = 0  # out of range: 422 / INVALID_ARGUMENT
        return body

    async def _rest_client(self) -> None:
        async with httpx.AsyncClient(base_url=self.server.base_url, timeout=self.timeout_s) as client:
            while (nxt := self._next()) is not None:
                i, invalid = nxt
                t0 = time.monotonic()
                self.open_requests[i] = ("rest", t0)
                try:
                    resp = await client.post("/v1/rank", json=self.body(i, invalid))
                    body = resp.json() if resp.status_code == 200 else {}
                    self.outcomes.append(Outcome(t0, time.monotonic(), "rest", str(resp.status_code),
                                                 body.get("degraded"), body.get("model"), invalid,
                                                 "" if resp.status_code == 200 else resp.text[:300]))
                except httpx.HTTPError as exc:
                    self.outcomes.append(Outcome(t0, time.monotonic(), "rest", type(exc).__name__, invalid=invalid,
                                                 detail=repr(exc)))
                finally:
                    del self.open_requests[i]
                await self._pause()

    async def _grpc_client(self) -> None:
        async with grpc.aio.insecure_channel(self.server.grpc_target) as channel:
            stub = pb2_grpc.RankerStub(channel)
            while (nxt := self._next()) is not None:
                i, invalid = nxt
                t0 = time.monotonic()
                self.open_requests[i] = ("grpc", t0)
                try:
                    resp = await stub.Rank(pb2.RankRequest(**self.body(i, invalid)), timeout=self.timeout_s)
                    self.outcomes.append(Outcome(t0, time.monotonic(), "grpc", "OK", resp.degraded, resp.model,
                                                 invalid))
                except grpc.aio.AioRpcError as exc:
                    self.outcomes.append(Outcome(t0, time.monotonic(), "grpc", exc.code().name, invalid=invalid,
                                                 detail=str(exc.details())[:300]))
                finally:
                    del self.open_requests[i]
                await self._pause()

    async def _pause(self) -> None:
        # back off after a failure at the connection: a stopped server must not turn the clients
        # into a busy loop of refused connects
        failed = bool(self.outcomes) and self.outcomes[-1].status in CONNECTION_ERRORS
        await asyncio.sleep(max(self.pause_s, 0.05) if failed else self.pause_s)

    # -- control --------------------------------------------------------------------------------------

    def start(self) -> LoadGen:
        self._tasks = [asyncio.create_task(self._rest_client()) for _ in range(self.rest_clients)]
        self._tasks += [asyncio.create_task(self._grpc_client()) for _ in range(self.grpc_clients)]
        return self

    async def finish(self) -> list[Outcome]:
        """Stop sending (if still running), wait for every client, return all outcomes."""
        self.stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    async def wait_done(self, seconds: float) -> list[Outcome]:
        """Wait (at most `seconds`) until max_requests were sent and answered."""
        async with asyncio.timeout(seconds):
            await asyncio.gather(*self._tasks)
        return self.outcomes

    # -- views ----------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self.open_requests)

    def open_since(self, transport: str, seconds: float) -> int:
        """Requests of `transport` sent at least `seconds` ago and not answered yet."""
        now = time.monotonic()
        return sum(1 for tr, t0 in self.open_requests.values() if tr == transport and now - t0 >= seconds)

    def between(self, t0: float, t1: float) -> list[Outcome]:
        """Requests started at or after t0 and finished by t1."""
        return [o for o in self.outcomes if o.started >= t0 and o.finished <= t1]

    def wrong(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.correct]


async def wait_until(predicate: Any, seconds: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate()` (sync or async) until true; TimeoutError naming `what` otherwise."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                value = predicate()
                if asyncio.iscoroutine(value):
                    value = await value
                if value:
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(what) from None
