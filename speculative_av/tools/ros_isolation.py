"""
Run ROS 2 processes on one machine without meeting anyone else's: domain, discovery, cleanup.

Used by the demo and the test harness: a ROS_DOMAIN_ID no other live process of ours holds
(claimed with a lock file the kernel releases on exit, crash included), discovery kept on
loopback, the FastDDS profile with large shared-memory segments, the venv on the ament index,
and removal of the
``/dev/shm`` files FastDDS leaves when a process dies.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
import sys
from typing import IO

from speculative_av.package_files import config_path

_DOMAIN_LOCKS = Path('/tmp/speculative_av_ros_domains')
_held_locks: list[IO[str]] = []


def claim_domain_id() -> int:
    """Return a ROS_DOMAIN_ID in 1..100 that no other process of ours holds, for our lifetime."""
    _DOMAIN_LOCKS.mkdir(exist_ok=True)
    first = 1 + os.getpid() % 100  # spread concurrent claimants; 0 is everyone's default
    for offset in range(100):
        domain_id = 1 + (first - 1 + offset) % 100
        handle = open(_DOMAIN_LOCKS / f'{domain_id}.lock', 'w')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_locks.append(handle)
        return domain_id
    raise RuntimeError('all ROS domain ids 1..100 are held by other processes')


def isolate(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """Set up ``environ`` for an isolated local ROS 2 graph and return its domain id."""
    domain_id = claim_domain_id()
    environ['ROS_DOMAIN_ID'] = str(domain_id)
    environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    environ.pop('ROS_STATIC_PEERS', None)
    environ['RMW_IMPLEMENTATION'] = 'rmw_fastrtps_cpp'
    environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(config_path('fastdds_local.xml'))
    # The ROS wheels set LD_LIBRARY_PATH but leave the venv off the ament index path.
    prefixes = environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep)
    if sys.prefix not in prefixes:
        environ['AMENT_PREFIX_PATH'] = os.pathsep.join(p for p in [sys.prefix, *prefixes] if p)
    return domain_id


def fastdds_shm_files() -> frozenset[str]:
    """Return the names of the FastDDS shared-memory files present now."""
    shm = Path('/dev/shm')
    if not shm.is_dir():
        return frozenset()
    return frozenset(p.name for p in shm.iterdir() if 'fastdds' in p.name)


def files_in_use() -> set[str]:
    """Return every path some live process has open or mapped (from /proc)."""
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
    """Delete FastDDS shm files created since ``before`` that no live process uses; count them."""
    in_use = files_in_use()
    removed = 0
    for name in fastdds_shm_files() - before:
        path = f'/dev/shm/{name}'
        if path not in in_use:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed
