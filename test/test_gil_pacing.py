"""Paced Python work pauses as often as its pacing says, on the calling thread only."""
from __future__ import annotations

import sys
import threading
import time

import pytest
from speculative_av.core.gil_pacing import GilPacing, paced


def step() -> None:
    """One Python call: an event the pacing checks at."""


def run_python_for(cpu_s: float) -> None:
    """Make Python calls until this thread has used ``cpu_s`` of CPU (pauses use none)."""
    until = time.thread_time() + cpu_s
    while time.thread_time() < until:
        step()


def test_paced_work_pauses_after_each_run_slice_and_other_threads_are_untouched():
    # Each slice uses at most run_s of CPU (plus one call), so 5 ms of CPU takes >= 4 slices
    # and >= 3 pauses of 20 ms: >= 60 ms of wall time, where unpaced it takes ~5 ms.
    pacing = GilPacing(run_s=0.001, pause_s=0.02)
    profiles: list[object] = []
    other = threading.Thread(target=lambda: profiles.append(sys.getprofile()))
    began = time.perf_counter()
    with paced(pacing):
        other.start()
        other.join()
        run_python_for(0.005)
    assert time.perf_counter() - began >= 3 * pacing.pause_s
    assert profiles == [None]
    assert sys.getprofile() is None


def test_the_previous_profile_function_comes_back_even_when_the_work_raises():
    def previous(frame: object, event: str, arg: object) -> None:
        pass

    sys.setprofile(previous)
    try:
        with pytest.raises(RuntimeError, match='bad release'):
            with paced(GilPacing(run_s=0.001, pause_s=0.001)):
                raise RuntimeError('bad release')
        assert sys.getprofile() is previous
    finally:
        sys.setprofile(None)


@pytest.mark.parametrize('run_s, pause_s', [(0.0, 0.005), (0.001, 0.0), (-1.0, 1.0),
                                            (float('nan'), 0.005)])
def test_a_pacing_that_never_runs_or_never_pauses_is_refused(run_s, pause_s):
    with pytest.raises(ValueError, match='must be > 0'):
        GilPacing(run_s, pause_s)
