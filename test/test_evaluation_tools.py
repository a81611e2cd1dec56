"""make_recording -> evaluate, and the whole demo, on small inputs with random weights."""
import os
from pathlib import Path
import signal
import subprocess
import sys

import numpy as np
import pytest
from rosbags.rosbag2 import Reader
from speculative_av.scenes.generator import render_drive
from speculative_av.tools.evaluate import main as evaluate_main, read_recording
from speculative_av.tools.make_recording import make_recording

RANDOM = ['--local-weights', 'random', '--cloud-model', 'ssdlite320_mobilenet_v3_large',
          '--cloud-weights', 'random']


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_recording_pairs_every_image_with_its_ground_truth(tmp_path, storage):
    bag = make_recording(tmp_path / 'drive', frames=5, fps=10, seed=3, width=160, height=120,
                         storage=storage, progress=False)
    with Reader(bag) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == {
            '/image': 'sensor_msgs/msg/Image',
            '/ground_truth': 'vision_msgs/msg/Detection2DArray'}
    frames = read_recording(bag, '/image', '/ground_truth')
    scenes = list(render_drive(3, 5, 160, 120, 10))
    assert [round(f.t_s, 3) for f in frames] == [0.0, 0.1, 0.2, 0.3, 0.4]
    for frame, scene in zip(frames, scenes):
        assert np.array_equal(frame.rgb, scene.image)
        np.testing.assert_allclose(frame.truth.boxes, scene.boxes, atol=1e-3)
        assert frame.truth.labels.tolist() == scene.labels.tolist()


def test_evaluate_writes_report_plots_and_results(tmp_path, capsys):
    bag = make_recording(tmp_path / 'drive', frames=4, fps=10, seed=5, width=160, height=120,
                         compressed=True, progress=False)
    out = tmp_path / 'report'
    assert evaluate_main([str(bag), *RANDOM, '--profiles', 'lan', 'poor-lte',
                          '--deadlines-ms', '20', '2000', '--threads', '1',
                          '--out', str(out)]) == 0
    report = (out / 'report.md').read_text()
    assert '## `lan`' in report and '## `poor-lte`' in report
    assert (out / 'map_vs_deadline.png').stat().st_size > 10_000
    assert (out / 'latency_cdf.png').stat().st_size > 10_000
    # With 2 s to spare on a LAN every cloud result is in time: speculative equals cloud-only.
    row = report.split('## `lan`')[1].splitlines()
    last = [line for line in row if line.startswith('| 2000 |')][0].split('|')
    assert last[2].strip() == '100%' and last[4].strip() == last[5].strip()


def _session_processes(session: int) -> list[str]:
    alive = []
    for proc in Path('/proc').iterdir():
        if proc.name.isdigit():
            try:
                if os.getsid(int(proc.name)) == session:
                    alive.append((proc / 'cmdline').read_text().replace('\0', ' '))
            except (OSError, ProcessLookupError):
                pass
    return alive


def test_demo_runs_end_to_end_and_leaves_no_process_behind(tmp_path):
    out = tmp_path / 'demo'
    demo = subprocess.Popen(
        [sys.executable, '-m', 'speculative_av.tools.demo', '--frames', '15', '--fps', '5',
         '--deadline-ms', '600', '--profile', 'lan', '--out', str(out), *RANDOM],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = demo.communicate(timeout=240)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 0, output[-3000:]
    assert _session_processes(demo.pid) == []
    summary = (out / 'summary.md').read_text()
    assert '| winners |' in summary and '| mAP speculative (fused topic) |' in summary
    for name in ('annotated.mp4', 'annotated_frame.png', 'latency.png'):
        assert (out / name).stat().st_size > 10_000, name
    with Reader(out / 'outputs') as reader:
        recorded = {c.topic for c in reader.connections}
        assert '/detections' in recorded and reader.message_count > 0
