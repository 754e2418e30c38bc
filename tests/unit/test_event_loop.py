"""The serving process runs on the configured event loop."""

from __future__ import annotations

import asyncio

import pytest

from service.server import run_loop
from service.settings import Settings


@pytest.mark.parametrize(("event_loop", "module"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_serving_loop_is_the_one_configured(event_loop: str, module: str) -> None:
    async def loop_module() -> int:
        return int(type(asyncio.get_running_loop()).__module__.split(".")[0] == module)

    assert Settings(event_loop=event_loop).event_loop == event_loop
    assert run_loop(loop_module(), event_loop) == 1
