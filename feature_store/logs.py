"""Logging helpers every layer may use (kept in the lowest package so that all can import them)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class RateLimitedLog:
    """Log a recurring failure at most once per `interval_s` per message, not on every occurrence.

    A failure that repeats on every request (a broken shadow, an unreachable sink, an unreadable
    value) would otherwise flood the logs and hide everything else; one line per interval per
    distinct message still says what is wrong, and a different message is never held back by
    another's limit. Safe to call from any thread.
    """

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def _due(self, message: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(message, float("-inf")) < self.interval_s:
                return False
            self._last[message] = now
            return True

    def log(self, level: int, message: str, **extra: Any) -> bool:
        """Log `message` at `level` with `extra` fields unless it was logged within the interval; True if logged."""
        if not self._due(message):
            return False
        self.logger.log(level, message, extra=extra)
        return True

    def warning(self, message: str, **extra: Any) -> bool:
        return self.log(logging.WARNING, message, **extra)

    def error(self, message: str, **extra: Any) -> bool:
        return self.log(logging.ERROR, message, **extra)
