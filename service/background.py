"""Supervised periodic background work: run a step every N seconds until shutdown, whatever it raises.

Every loop a serving process keeps (picking up new bundle versions, re-reading the experiments
file, re-checking readiness) goes through `run_every`, so all share one error policy: an
exception is logged with its traceback and the loop carries on at the next tick; only
cancellation or the stop event ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("rankserve.background")


async def run_every(
    name: str, interval_s: float, step: Callable[[], Awaitable[object]], stop: asyncio.Event, *,
    first_at_once: bool = False,
) -> None:
    """Await `step()` every `interval_s` seconds until `stop` is set (at once first, if `first_at_once`).

    A step that raises is logged with its traceback under `name`; the next tick runs as usual.
    An interval <= 0 means the work is off: return at once.
    """
    if interval_s <= 0:
        return
    wait_first = not first_at_once
    while not stop.is_set():
        if wait_first:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            if stop.is_set():
                return
        wait_first = True
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug or an unexpected failure must not end the loop for good
            log.exception("background task failed; retrying at the next tick",
                          extra={"task": name, "interval_s": interval_s})
