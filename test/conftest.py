"""
Isolate every pytest process on its own ROS 2 domain, on loopback, and clean up after it.

Environment set here is inherited by the processes tests start, so a test's nodes discover
each other and nothing else (see speculative_av/tools/ros_isolation.py): a ROS_DOMAIN_ID no
concurrent test process holds, discovery on loopback only, the project's FastDDS profile.
"""
from __future__ import annotations

import os
from pathlib import Path
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).parent), str(REPO)]

import ros_harness  # noqa: E402  (needs the path above)
from speculative_av.tools.ros_isolation import (  # noqa: E402,I100
    fastdds_shm_files, isolate, remove_stale_shm)


def pytest_configure(config: pytest.Config) -> None:
    """Claim a domain and set the ROS environment before any test module imports rclpy."""
    isolate(os.environ)
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get('PYTHONPATH', '')) if p)
    os.environ['PYTHONUNBUFFERED'] = '1'
    config.stash[ros_harness.SHM_BEFORE] = fastdds_shm_files()


def pytest_report_header(config: pytest.Config) -> str:
    """Show which domain this run uses, for reading logs of parallel runs."""
    return f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} (discovery range LOCALHOST)"


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove shared-memory files this run's processes left behind."""
    remove_stale_shm(config.stash.get(ros_harness.SHM_BEFORE, frozenset()))
