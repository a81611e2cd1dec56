"""Helpers for tests that run real ROS 2 processes: starting, stopping, waiting."""
from __future__ import annotations

import contextlib
import gc
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest

SHM_BEFORE = pytest.StashKey[frozenset]()


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               poll: Callable[[], None] | None = None) -> None:
    """Wait for ``condition`` (calling ``poll`` in between, e.g. to spin a node), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out after {timeout:.0f} s waiting for {what}')
        if poll is not None:
            poll()
        else:
            time.sleep(0.01)


def python_module(module: str, *args: str) -> list[str]:
    """Return the command that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, '-m', module, *args]


def ros_args(**parameters: object) -> list[str]:
    """Return ``--ros-args -p name:=value ...`` for the given parameters."""
    out = ['--ros-args']
    for name, value in parameters.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ['-p', f'{name}:={text}']
    return out


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """
    Keep this process's objects (torch, earlier tests) out of garbage collections meanwhile.

    An observer measures receive times: a full collection over ~500k objects would stall it
    for 100+ ms, as the node freezes its own for the same reason.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def running(command: list[str], **popen: object) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` for the duration of the block; stop it with SIGINT, then SIGKILL."""
    process = subprocess.Popen(command, text=True, **popen)  # type: ignore[call-overload]
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[str], timeout: float = 10.0) -> int:
    """Stop ``process`` as a user's Ctrl-C would, escalating if it does not exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
