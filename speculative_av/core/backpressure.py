"""Keep only the newest frame per camera so results never come from a backlog."""
from __future__ import annotations

from collections import OrderedDict
import threading
from typing import Generic, TypeVar

T = TypeVar('T')


class LatestFrameSlots(Generic[T]):
    """
    One slot per camera holding its newest unprocessed frame.

    A frame that arrives while an older one still waits replaces it (the older one is dropped
    and counted): a detector slower than the camera processes the freshest image instead of
    falling further behind. Cameras are served round-robin so one fast camera cannot starve
    another.
    """

    def __init__(self) -> None:
        """Start with no frames waiting."""
        self._slots: OrderedDict[str, T] = OrderedDict()
        self._ready = threading.Condition()
        self._closed = False
        self.dropped: dict[str, int] = {}

    def put(self, camera: str, frame: T) -> T | None:
        """Store ``frame`` as ``camera``'s newest and return the frame it displaced, if any."""
        with self._ready:
            displaced = self._slots.pop(camera, None)
            if displaced is not None:
                self.dropped[camera] = self.dropped.get(camera, 0) + 1
            self._slots[camera] = frame  # to the back of the round-robin order
            self._ready.notify()
            return displaced

    def take(self, timeout: float | None = None) -> tuple[str, T] | None:
        """Remove and return the longest-waiting camera's frame; None on timeout or close."""
        with self._ready:
            self._ready.wait_for(lambda: self._slots or self._closed, timeout)
            if self._closed or not self._slots:
                return None
            return self._slots.popitem(last=False)

    def take_all(self, timeout: float | None = None) -> list[tuple[str, T]]:
        """
        Remove and return every camera's waiting frame, longest-waiting first.

        Waits up to ``timeout`` for one; returns an empty list on timeout or close. Frames of
        several cameras that wait together can then share one forward pass.
        """
        with self._ready:
            self._ready.wait_for(lambda: self._slots or self._closed, timeout)
            if self._closed:
                return []
            taken = list(self._slots.items())
            self._slots.clear()
            return taken

    def close(self) -> None:
        """Wake every waiting :meth:`take` so worker threads can exit."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
