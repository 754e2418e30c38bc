"""A worker of several waits for its first model load before it takes connections (service/server.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from service.server import _first_load_or_stop


def _core() -> Any:
    return SimpleNamespace(first_load_attempted=asyncio.Event())


async def test_returns_once_the_first_load_was_tried() -> None:
    core, stop = _core(), asyncio.Event()
    stop_task = asyncio.create_task(stop.wait())
    waiting = asyncio.create_task(_first_load_or_stop(core, stop_task))
    await asyncio.sleep(0)
    assert not waiting.done()  # no load tried yet: no connection may be taken
    core.first_load_attempted.set()
    assert await waiting is True
    assert not stop_task.done()  # the stop signal is still watched by the server afterwards
    stop_task.cancel()


async def test_a_stop_signal_during_the_load_ends_the_wait() -> None:
    core, stop = _core(), asyncio.Event()
    stop_task = asyncio.create_task(stop.wait())
    waiting = asyncio.create_task(_first_load_or_stop(core, stop_task))
    await asyncio.sleep(0)
    stop.set()
    assert await waiting is False
    await asyncio.sleep(0)  # let the cancelled waiter finish
    # no task is left waiting for a load that no longer matters
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "first-load"]
