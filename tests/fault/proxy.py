"""A loopback TCP proxy that adds latency, for making Redis slow on purpose.

`LatencyProxy(upstream_port)` listens on 127.0.0.1 and relays every connection to the upstream
port, holding each chunk received from the upstream for `delay_s` before passing it on (a delay
per reply, not a throughput cap: every chunk keeps its own due time, so pipelined replies are not
serialized behind each other). The delay can be changed at any time and applies to chunks
received after the change. It runs its own event loop in a daemon thread, so it keeps relaying
while the test's loop is busy generating load. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self

from feature_store.embedded import free_port


class LatencyProxy:
    host = "127.0.0.1"

    def __init__(self, upstream_port: int, delay_s: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.port = free_port(self.host)
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="latency-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def set_delay(self, seconds: float) -> None:
        self.delay_s = seconds  # a float assignment: atomic, read by the relay on its next chunk

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- relaying -----------------------------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            client_writer.close()
            return
        tasks = [asyncio.create_task(relay)
                 for relay in self._relays(client_reader, client_writer, up_reader, up_writer)]
        self._tasks.update(tasks)
        try:
            # either side closing ends the connection on both sides
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            for writer in (client_writer, up_writer):
                writer.close()

    def _relays(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> list[Coroutine[Any, Any, None]]:
        """The two directions of one connection: requests as they come, replies delayed.
        A subclass changes what is relayed by overriding this."""
        return [self._pipe(client_reader, up_writer, delayed=False), self._pipe(up_reader, client_writer, delayed=True)]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
        if not delayed:
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()
            return
        # delayed direction: a reader stamps each chunk with its due time, a writer releases it then
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    return
                pause = due - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                writer.write(chunk)
                await writer.drain()

        releaser = asyncio.create_task(release())
        try:
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    queue.put_nowait((time.monotonic() + self.delay_s, chunk))
            queue.put_nowait((time.monotonic() + self.delay_s, b""))
            with contextlib.suppress(ConnectionError):
                await releaser
        finally:
            releaser.cancel()
