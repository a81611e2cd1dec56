"""Error logging that cannot flood the log: one message per interval, the rest dropped."""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol

ERROR_LOG_INTERVAL_S = 1.0


class ErrorLogger(Protocol):
    """Where errors go (rclpy's node logger and :mod:`logging` loggers both fit)."""

    def error(self, message: str) -> Any:
        """Log at ERROR."""


class ThrottledErrors:
    """
    Log an error at most once per ``interval_s``; the others are dropped.

    Per-frame failures (a malformed image every frame, a failing candidate) would otherwise
    write one line per frame; every one of them is still counted by the caller.
    """

    def __init__(self, logger: ErrorLogger | None, interval_s: float = ERROR_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Log to ``logger`` (None: nowhere), timing on ``clock`` (seconds)."""
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last = -float('inf')

    def __call__(self, text: str) -> None:
        """Log ``text`` unless an error was logged less than the interval ago."""
        now = self._clock()
        if now - self._last >= self._interval_s:
            self._last = now
            if self._logger is not None:
                self._logger.error(text)
