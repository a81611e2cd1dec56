"""
triton_server: the detector on a real tritonserver, asked over v2 (gRPC, HTTP, metrics).

The server runs in the Triton environment (built here by tools/bootstrap_triton.sh when
missing, ~25 s); it is started with this venv's Python, so its re-execution into the Triton
environment is tested too. tritonclient needs protobuf < 7, so the requests come from
helpers/triton_probe.py run with the Triton environment's Python.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import re
import signal
import subprocess
import sys
from typing import Any, Iterator, NamedTuple
import urllib.request

import pytest
from speculative_av.cloud.triton_server import triton_python
from speculative_av.detectors.torchvision_detector import coco_categories

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).parent / 'helpers' / 'triton_probe.py'
SYSTEM_PYTHON = Path('/usr/bin/python3.11')
READY = re.compile(r'^triton_server ready grpc=(\S+) http=(\S+) metrics=(\S+) model=(\S+)$')
MODEL = 'speculative_detector'


class Server(NamedTuple):
    """A running triton_server and where it listens."""

    process: subprocess.Popen[str]
    grpc: str
    http: str
    metrics: str


def _triton_env() -> dict[str, str]:
    """Return the environment for Triton-venv processes (no ROS re-exec guard inherited)."""
    env = dict(os.environ)
    env.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
    return env


@pytest.fixture(scope='module')
def triton_venv() -> Path:
    """Build the Triton environment if needed (a no-op when its stamp matches)."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f'{SYSTEM_PYTHON} (Debian python3.11) is absent: the Triton environment '
                    'cannot be built here')
    subprocess.run([str(REPO / 'tools' / 'bootstrap_triton.sh')], check=True, timeout=900,
                   env=_triton_env())
    return triton_python()


def start_server(logs: Path, *args: str) -> Server:
    """Start triton_server on free ports; return once it printed its ready line."""
    log = (logs / 'triton_server.log').open('w')
    process = subprocess.Popen(
        [sys.executable, '-m', 'speculative_av.cloud.triton_server', '--weights', 'random',
         '--threads', '1', '--score-threshold', '0.0', '--host', '127.0.0.1', '--grpc-port', '0',
         '--http-port', '0', '--metrics-port', '0', *args],
        stdout=subprocess.PIPE, stderr=log, text=True, env=_triton_env())
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until ready, or '' once the process ended
    match = READY.match(line.strip())
    if match is None:
        process.kill()
        process.wait()
        raise AssertionError(f'no ready line but {line!r}; log: '
                             f'{(logs / "triton_server.log").read_text()[-3000:]}')
    return Server(process, *match.groups()[:3])


@pytest.fixture(scope='module')
def server(triton_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module (batches of up to 4, so a burst queues)."""
    running = start_server(tmp_path_factory.mktemp('triton'), '--max-batch-size', '4')
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def probe(server: Server, check: str) -> Any:
    """Run one helpers/triton_probe.py check against ``server``; return its JSON."""
    done = subprocess.run([str(triton_python()), str(PROBE), server.grpc, MODEL, check],
                          capture_output=True, text=True, timeout=120, env=_triton_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def metrics(server: Server) -> dict[str, float]:
    """Return the model's nv_inference_* samples, keyed by name and labels."""
    with urllib.request.urlopen(f'http://{server.metrics}/metrics', timeout=10) as reply:
        text = reply.read().decode()
    return {line.rsplit(' ', 1)[0]: float(line.rsplit(' ', 1)[1]) for line in text.splitlines()
            if line.startswith('nv_inference_') and f'model="{MODEL}"' in line}


def children(pid: int) -> list[int]:
    """Return the ids of ``pid``'s child processes."""
    found = []
    for task in Path(f'/proc/{pid}/task').iterdir():
        found += [int(child) for child in (task / 'children').read_text().split()]
    return found


def test_health_and_metadata_state_the_contract(server: Server) -> None:
    found = probe(server, 'metadata')
    assert found['server_ready'] and found['model_ready']
    assert found['inputs'] == [{'name': 'IMAGE', 'datatype': 'BYTES', 'shape': ['-1', '1']}]
    assert found['outputs'] == [
        {'name': 'BOXES', 'datatype': 'FP32', 'shape': ['-1', '-1', '4']},
        {'name': 'SCORES', 'datatype': 'FP32', 'shape': ['-1', '-1']},
        {'name': 'LABELS', 'datatype': 'BYTES', 'shape': ['-1', '-1']}]
    assert found['max_batch_size'] == 4
    policy = found['dynamic_batching']['default_queue_policy']
    # REJECT is the enum's zero, which the JSON form leaves out.
    assert policy.get('timeout_action', 'REJECT') == 'REJECT' and policy['allow_timeout_override']
    assert int(policy['default_timeout_microseconds']) > 0  # else Triton ignores request timeouts
    with urllib.request.urlopen(f'http://{server.http}/v2/health/ready', timeout=10) as reply:
        assert reply.status == 200


def test_jpeg_and_png_get_boxes_scores_and_label_names(server: Server) -> None:
    found = probe(server, 'infer')
    names = set(coco_categories())
    for fmt in ('.jpg', '.png'):
        answer = found[fmt]
        count = answer['scores'][1]
        assert count > 0  # score threshold 0: random weights still yield boxes
        assert answer['boxes'] == [1, count, 4] and answer['labels'] == [1, count]
        assert set(answer['label_names']) <= names
        assert 0 < answer['box_max'] <= 640


def test_malformed_image_fails_alone(server: Server) -> None:
    answers = probe(server, 'malformed')['answers']
    assert [('ok' in a) for a in answers] == [True, False, True, False, True]
    for bad in (answers[1], answers[3]):
        assert bad['status'] == 'StatusCode.INVALID_ARGUMENT'
    assert 'neither jpeg nor png' in answers[1]['message']
    assert 'cannot decode 200 bytes as jpeg' in answers[3]['message']
    assert all(a['ok']['boxes'][0] == 1 for a in answers if 'ok' in a)


def test_requests_whose_timeout_passes_in_the_queue_are_rejected(server: Server) -> None:
    before = metrics(server)
    answers = probe(server, 'deadlines')['answers']
    rejected = [a for a in answers if 'ok' not in a]
    # 16 requests in batches of <= 4, ~100 ms per batch here, 50 ms to live: later ones expire.
    assert rejected
    assert {(a['status'], a['message']) for a in rejected} == {
        ('StatusCode.UNAVAILABLE', 'Request timeout expired')}
    after = metrics(server)
    key = f'nv_inference_request_failure{{model="{MODEL}",reason="REJECTED",version="1"}}'
    assert after[key] - before.get(key, 0.0) == len(rejected)
    success = f'nv_inference_request_success{{model="{MODEL}",version="1"}}'
    executions = f'nv_inference_exec_count{{model="{MODEL}",version="1"}}'
    assert after[success] - before[success] == len(answers) - len(rejected)
    assert after[executions] > before[executions]


def test_sigterm_stops_tritonserver_and_clears_shared_memory(triton_venv: Path,
                                                             tmp_path: Path) -> None:
    running = start_server(tmp_path)
    tritonserver = children(running.process.pid)
    assert len(tritonserver) == 1
    stubs = children(tritonserver[0])  # the Python backend's stub process(es)
    assert stubs
    prefix = f'speculative_av_triton_{running.process.pid}_'
    assert any(p.name.startswith(prefix) for p in Path('/dev/shm').iterdir())
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=30) == 0
    assert not [pid for pid in tritonserver + stubs if Path(f'/proc/{pid}').exists()]
    assert not [p for p in Path('/dev/shm').iterdir() if p.name.startswith(prefix)]


def test_batch_runs_one_detection_call_pads_rows_and_isolates_bad_requests() -> None:
    import numpy as np
    import simplejpeg
    from speculative_av.cloud.triton_model import BatchDetector, PADDING_LABEL
    from speculative_av.core.detections import Detections
    from speculative_av.core.image_decoding import ImageDecodeError
    calls = []

    def detect_images(images: list[np.ndarray]) -> list[Detections]:
        calls.append([image.shape for image in images])
        return [Detections(np.tile([1.0, 2.0, 3.0, 4.0], (n, 1)), np.full(n, 0.5), np.full(n, 3))
                for n in range(1, len(images) + 1)]

    jpeg = simplejpeg.encode_jpeg(np.zeros((6, 8, 3), np.uint8))
    rows = np.array([[jpeg], [jpeg]], dtype=object)
    batch = BatchDetector(detect_images, ['background', 'person', 'bicycle', 'car'])
    answers = batch.answer([rows, np.array([[b'junk']], dtype=object), rows[:1]])
    assert calls == [[(6, 8, 3)] * 3]  # one call for the batch's three good images
    assert isinstance(answers[1], ImageDecodeError) and batch.rejected == 1
    first, last = answers[0], answers[2]
    assert not isinstance(first, ImageDecodeError) and not isinstance(last, ImageDecodeError)
    assert first['BOXES'].shape == (2, 2, 4)
    assert first['SCORES'].tolist() == [[0.5, 0.0], [0.5, 0.5]]
    assert first['LABELS'].tolist() == [[b'car', PADDING_LABEL], [b'car', b'car']]
    assert last['LABELS'].tolist() == [[b'car'] * 3]
