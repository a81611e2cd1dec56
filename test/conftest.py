"""Isolate every pytest process on its own ROS 2 domain, on loopback, and clean up after it.

Environment set here is inherited by the processes tests start, so a test's nodes discover
each other and nothing else: a ROS_DOMAIN_ID no concurrent test process holds (claimed with a
lock file), ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (no discovery traffic off the machine), and
the project's FastDDS profile with large shared-memory segments.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import ros_harness  # noqa: E402  (needs the path above)

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Claim a domain and set the ROS environment before any test module imports rclpy."""
    domain_id = ros_harness.claim_domain_id()
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.pop('ROS_STATIC_PEERS', None)
    os.environ['RMW_IMPLEMENTATION'] = 'rmw_fastrtps_cpp'
    os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(REPO / 'config' / 'fastdds_local.xml')
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get('PYTHONPATH', '')) if p)
    os.environ['PYTHONUNBUFFERED'] = '1'
    # The ROS wheels set LD_LIBRARY_PATH but not the ament index path of the venv.
    prefixes = os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep)
    if sys.prefix not in prefixes:
        os.environ['AMENT_PREFIX_PATH'] = os.pathsep.join(p for p in [sys.prefix, *prefixes] if p)
    config.stash[ros_harness.SHM_BEFORE] = ros_harness.fastdds_shm_files()


def pytest_report_header(config: pytest.Config) -> str:
    """Show which domain this run uses, for reading logs of parallel runs."""
    return f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} (discovery range LOCALHOST)"


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove shared-memory files this run's processes left behind."""
    ros_harness.remove_stale_shm(config.stash.get(ros_harness.SHM_BEFORE, frozenset()))
