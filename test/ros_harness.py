"""Helpers for tests that run real ROS 2 processes: domains, processes, waiting, cleanup."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, IO, Iterator

import pytest

SHM_BEFORE = pytest.StashKey[frozenset]()
_DOMAIN_LOCKS = Path('/tmp/speculative_av_ros_domains')
_held_lock: IO[str] | None = None


def claim_domain_id() -> int:
    """Return a ROS_DOMAIN_ID no other live test process on this machine holds.

    The lock is held for the life of this process; the kernel releases it on exit, crash
    included, so a killed run never leaks a domain.
    """
    global _held_lock
    _DOMAIN_LOCKS.mkdir(exist_ok=True)
    # FastDDS derives ports from the domain; 1..100 stays clear of 0 (everyone's default).
    first = 1 + os.getpid() % 100
    for offset in range(100):
        domain_id = 1 + (first - 1 + offset) % 100
        handle = open(_DOMAIN_LOCKS / f'{domain_id}.lock', 'w')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_lock = handle
        return domain_id
    raise RuntimeError('all ROS domain ids 1..100 are held by other test processes')


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


def fastdds_shm_files() -> frozenset[str]:
    """Return the FastDDS shared-memory files present now."""
    shm = Path('/dev/shm')
    return frozenset(p.name for p in shm.iterdir() if 'fastdds' in p.name) if shm.is_dir() else (
        frozenset())


def _files_in_use() -> set[str]:
    used: set[str] = set()
    for proc in Path('/proc').iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / 'fd').iterdir():
                with contextlib.suppress(OSError):
                    used.add(os.readlink(fd))
            with open(proc / 'maps') as maps:
                used.update(line.split(None, 5)[-1].strip() for line in maps if '/dev/shm' in line)
    return used


def remove_stale_shm(before: frozenset[str]) -> int:
    """Delete FastDDS shm files created since ``before`` that no live process still uses."""
    in_use = _files_in_use()
    removed = 0
    for name in fastdds_shm_files() - before:
        path = f'/dev/shm/{name}'
        if path not in in_use:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed
