"""
Let a background thread's Python work yield the GIL to the threads that have deadlines.

Two Python threads that both want the GIL share it about fairly, so a background thread that
runs Python back to back (building a torch module, unpickling a checkpoint, a warm-up forward
pass) stretches a concurrent inference by roughly that inference's own Python time, whatever
``sys.setswitchinterval`` says (measured in README, "Over-the-air model updates"). Within
:func:`paced`, the calling thread instead sleeps for ``pause_s`` whenever it has run
``run_s`` since its last pause, checked at every Python call and return (a profile hook of
this thread only): it holds the GIL and a core for a bounded share of the time and the others
wait for it at most about ``run_s``. The work takes longer by about ``(run_s + pause_s) /
run_s``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
import sys
import time
from types import FrameType
from typing import Any, Iterator


@dataclass(frozen=True)
class GilPacing:
    """How long a paced thread runs between pauses, and how long it pauses (seconds)."""

    run_s: float
    pause_s: float

    def __post_init__(self) -> None:
        """Refuse a pacing that would never pause or never run."""
        if not (self.run_s > 0 and self.pause_s > 0):
            raise ValueError(f'run_s and pause_s must be > 0, got {self.run_s}, {self.pause_s}')


@contextmanager
def paced(pacing: GilPacing) -> Iterator[None]:
    """Pace the calling thread's Python work within the block (other threads are untouched)."""
    clock, sleep = time.perf_counter, time.sleep
    resumed = clock()

    def pause_when_due(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal resumed
        if clock() - resumed >= pacing.run_s:
            sleep(pacing.pause_s)
            resumed = clock()

    previous = sys.getprofile()
    sys.setprofile(pause_when_due)
    try:
        yield
    finally:
        sys.setprofile(previous)
