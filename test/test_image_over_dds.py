"""Camera images cross process boundaries over DDS on loopback, intact."""
import hashlib
import json
import subprocess

import pytest
from ros_harness import python_module, ros_args, running

from speculative_av.ros.synthetic_camera import render_frame

WIDTH, HEIGHT, COUNT = 640, 480, 60


def _receive(qos: str, count: int) -> list[dict]:
    sink = subprocess.Popen(
        python_module('image_sink', '--count', str(count), '--qos', qos, '--timeout', '60'),
        cwd='test/helpers', stdout=subprocess.PIPE, text=True)
    camera_command = python_module(
        'speculative_av.ros.synthetic_camera',
        *ros_args(width=WIDTH, height=HEIGHT, count=count, rate_hz=30.0,
                  reliable=qos == 'reliable', wait_for_subscribers=1, frame_id='cam_front'))
    with running(camera_command):
        out, _ = sink.communicate(timeout=90)
    return [json.loads(line) for line in out.splitlines()]


def test_rgb8_frames_arrive_intact_and_in_order_reliable():
    frames = _receive('reliable', COUNT)
    assert len(frames) == COUNT
    expected = [hashlib.sha256(render_frame(i, WIDTH, HEIGHT).tobytes()).hexdigest()
                for i in range(COUNT)]
    assert [f['sha256'] for f in frames] == expected
    first = frames[0]
    assert (first['width'], first['height'], first['step'], first['encoding'], first['frame_id']) \
        == (WIDTH, HEIGHT, WIDTH * 3, 'rgb8', 'cam_front')
    print('reliable 640x480 latency ms p50=%.1f max=%.1f' % (
        sorted(f['latency_ms'] for f in frames)[COUNT // 2], max(f['latency_ms'] for f in frames)))


def test_sensor_data_qos_frames_arrive_intact():
    """Best effort may drop, but with the project's FastDDS profile it should not corrupt."""
    count = COUNT // 2
    sink = subprocess.Popen(
        python_module('image_sink', '--count', str(count), '--qos', 'sensor_data',
                      '--timeout', '20'),
        cwd='test/helpers', stdout=subprocess.PIPE, text=True)
    # The camera streams until stopped; best effort gives no acknowledgement to wait for.
    with running(python_module('speculative_av.ros.synthetic_camera',
                               *ros_args(width=WIDTH, height=HEIGHT, rate_hz=30.0,
                                         wait_for_subscribers=1))):
        out, _ = sink.communicate(timeout=60)
    frames = [json.loads(line) for line in out.splitlines()]
    assert sink.returncode == 0, f'only {len(frames)} of {count} best-effort frames arrived'
    valid = {hashlib.sha256(render_frame(i, WIDTH, HEIGHT).tobytes()).hexdigest()
             for i in range(1000)}
    assert all(f['sha256'] in valid for f in frames)


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)
