"""
The launch files under the real ROS 2 launch system, the way `ros2 launch` runs them.

The package is built with colcon so the launch system finds it through the ament index, and
every launch runs in its own process through ros2launch's `launch_a_launch_file`
(test/helpers/ros2_launch.py), whose exit code is what `ros2 launch` returns. Needs `launch`
and `launch_ros` (a ROS 2 installation, or their sources on PYTHONPATH: `make launch-check`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
import subprocess
import sys
from typing import Iterator
import urllib.request

import pytest
from ros_harness import running, stop, wait_until
from speculation_rig import camera_command, free_port, MODEL, observer
import yaml

pytest.importorskip(
    'launch_ros.actions',
    reason='the ROS 2 launch system (launch, launch_ros) is not importable: source a ROS 2 '
           'installation or run `make launch-check LAUNCH_PYTHONPATH=...` (README)')

REPO = Path(__file__).resolve().parents[1]
ROS2_LAUNCH = Path(__file__).parent / 'helpers' / 'ros2_launch.py'


@pytest.fixture(scope='module')
def launch_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build and install the package; return the environment `ros2 launch` would run in."""
    work = tmp_path_factory.mktemp('launch')
    colcon = Path(sys.executable).with_name('colcon')
    subprocess.run(
        [str(colcon), '--log-base', str(work / 'log'), 'build', '--merge-install',
         '--base-paths', str(REPO), '--build-base', str(work / 'build'),
         '--install-base', str(work / 'install'), '--packages-select', 'speculative_av'],
        cwd=work, check=True, capture_output=True, text=True, timeout=300)
    install = work / 'install'
    env = dict(os.environ)  # conftest's ROS isolation, and launch_ros's PYTHONPATH if any
    env['AMENT_PREFIX_PATH'] = os.pathsep.join(
        p for p in (str(install), env.get('AMENT_PREFIX_PATH', '')) if p)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(install / 'lib' / 'python3.11' / 'site-packages'),
                    env.get('PYTHONPATH', '')) if p)
    env['ROS_LOG_DIR'] = str(work / 'ros_log')
    return env


def _command(launch_file: str, arguments: tuple[str, ...]) -> list[str]:
    return [sys.executable, str(ROS2_LAUNCH), 'speculative_av', launch_file, *arguments]


@contextlib.contextmanager
def launched(env: dict[str, str], log: Path, launch_file: str,
             *arguments: str) -> Iterator[subprocess.Popen[str]]:
    """
    Run a launch file for the block's duration, its output in ``log``; stop it with Ctrl-C.

    The launch must still be running at the end of the block and exit 0 on Ctrl-C.
    """
    with log.open('w') as out:
        process = subprocess.Popen(_command(launch_file, arguments), env=env, text=True,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
        assert process.poll() is None, f'{launch_file} ended early:\n{log.read_text()}'
    finally:
        code = stop(process, timeout=30)
    assert code == 0, f'{launch_file} exited with {code} on Ctrl-C:\n{log.read_text()}'


def _launch_until_exit(env: dict[str, str], launch_file: str,
                       *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(launch_file, arguments), env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)


def test_launched_server_and_node_fuse_detections_with_two_endpoints_and_integer_deadline(
        launch_env, tmp_path):
    port, metrics_port = free_port(), free_port()
    server_log = tmp_path / 'cloud_server.log'
    # params_file says DEFAULT weights (not downloadable here): the node only starts if the
    # local_* arguments override it.
    params = yaml.safe_load((REPO / 'config' / 'vehicle.yaml').read_text())
    params['speculative_detector']['ros__parameters']['local'].update(
        threads=1, score_threshold=0.05)
    params_file = tmp_path / 'vehicle.yaml'
    params_file.write_text(yaml.safe_dump(params))
    with launched(launch_env, server_log, 'cloud_server.launch.py', 'host:=127.0.0.1',
                  f'port:={port}', f'model:={MODEL}', 'weights:=random',
                  'insecure:=true', 'max_batch_size:=4', 'max_queue_delay_ms:=5',
                  f'metrics_port:={metrics_port}') as server:
        wait_until(lambda: 'listening on' in server_log.read_text() or server.poll() is not None,
                   120, 'the launched cloud server to listen')
        assert server.poll() is None, f'cloud server launch ended:\n{server_log.read_text()}'
        vehicle_log = tmp_path / 'vehicle.log'
        with (observer() as seen,
              launched(launch_env, vehicle_log, 'vehicle.launch.py', f'params_file:={params_file}',
                       'camera_topic:=camera/image_raw', 'deadline_ms:=120',
                       f'cloud_endpoints:=datacenter=127.0.0.1:{port}@10, edge=127.0.0.1:{port}@5',
                       f'local_model:={MODEL}', 'local_weights:=random'),
              running(camera_command(rate_hz=5.0, wait_for_subscribers=1)
                      + ['-r', 'image:=camera/image_raw'])):
            seen.wait_for_decisions(5, timeout=120)
            wait_until(lambda: len(seen.fused) >= 5, 30, 'fused detections')
            wait_until(lambda: any(d.get('datacenter', {}).get('health') == 'SERVING'
                                   and d.get('edge', {}).get('health') == 'SERVING'
                                   for d in seen.diagnostics),
                       30, 'both endpoints healthy')
        with urllib.request.urlopen(f'http://127.0.0.1:{metrics_port}/metrics',
                                    timeout=10) as reply:
            metrics = reply.read().decode()
    assert 'speculative_av_requests_total{status="ok"}' in metrics
    decisions = [values for values, _ in seen.decisions]
    assert {d['deadline_ms'] for d in decisions} == {'120'}
    assert all({'source.local', 'source.datacenter', 'source.edge'} <= d.keys()
               for d in decisions), seen.outcomes()
    assert all(msg.header.frame_id == 'cam_front' for msg, _ in seen.fused)


@pytest.mark.parametrize('argument, error', [
    ('local_weights:=/does/not/exist', 'speculative_detector-1 exited with code 1'),
    ('cloud_endpoints:=localhost:50051,no-port-here', 'speculative_detector-1 exited with code 1'),
    ('deadline_ms:=soon', "could not convert string to float: 'soon'"),
    ('cloud_endpoint:=localhost:50051', 'cloud_endpoint is now cloud_endpoints'),
], ids=['missing-weights', 'malformed-endpoint', 'non-numeric-deadline', 'old-argument-name'])
def test_a_bad_vehicle_argument_fails_the_launch(launch_env, argument, error):
    result = _launch_until_exit(launch_env, 'vehicle.launch.py', f'local_model:={MODEL}',
                                'local_weights:=random', argument)  # the last one counts
    assert result.returncode == 1, result.stdout
    assert error in result.stdout


def test_a_failing_cloud_server_fails_the_launch(launch_env):
    result = _launch_until_exit(launch_env, 'cloud_server.launch.py', 'model:=no_such_model')
    assert result.returncode == 1, result.stdout
    assert "--model 'no_such_model' is not one of" in result.stdout
    assert 'cloud_server-1 exited with code 2' in result.stdout
