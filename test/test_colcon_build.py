"""The package builds with colcon and its executables are found through the ament index."""
import os
from pathlib import Path
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
EXECUTABLES = ['speculative_detector', 'cloud_server', 'synthetic_camera']


@pytest.fixture(scope='module')
def install(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp('colcon')
    colcon = Path(sys.executable).with_name('colcon')
    subprocess.run(
        [str(colcon), '--log-base', str(work / 'log'), 'build', '--merge-install',
         '--base-paths', str(REPO), '--build-base', str(work / 'build'),
         '--install-base', str(work / 'install'), '--packages-select', 'speculative_av'],
        cwd=work, check=True, capture_output=True, text=True, timeout=300)
    return work / 'install'


def _installed_env(install: Path) -> dict[str, str]:
    env = dict(os.environ)
    env['AMENT_PREFIX_PATH'] = os.pathsep.join(
        [str(install), os.environ.get('AMENT_PREFIX_PATH', '')])
    env['PYTHONPATH'] = str(install / 'lib' / 'python3.11' / 'site-packages')
    return env


def test_colcon_installs_package_marker_share_files_and_executables(install):
    assert (install / 'share' / 'ament_index' / 'resource_index' / 'packages'
            / 'speculative_av').is_file()
    share = install / 'share' / 'speculative_av'
    assert (share / 'package.xml').is_file()
    assert (share / 'config' / 'fastdds_local.xml').is_file()
    for name in EXECUTABLES:
        assert os.access(install / 'lib' / 'speculative_av' / name, os.X_OK)


def test_executable_found_through_ament_index_runs_from_the_install(install):
    env = _installed_env(install)
    lookup = subprocess.run(
        [sys.executable, '-c',
         'from ament_index_python.packages import get_package_prefix;'
         'print(get_package_prefix("speculative_av"))'],
        env=env, check=True, capture_output=True, text=True)
    executable = Path(lookup.stdout.strip()) / 'lib' / 'speculative_av' / 'synthetic_camera'
    assert executable.is_file()
    # What `ros2 run speculative_av synthetic_camera` would do: run the indexed executable.
    run = subprocess.run(
        [str(executable), '--ros-args', '-p', 'count:=3', '-p', 'rate_hz:=100.0'],
        env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert 'published 3 frames' in run.stderr
