"""
The cloud server's deadline-aware scheduling, batching and metrics under real concurrent clients.

Real ``cloud_server`` processes on loopback (SSDlite, random weights, one torch thread) and
concurrent gRPC calls from this process: deadline order against FIFO, admission under
overload, dynamic batching, and the Prometheus endpoint.
"""
from __future__ import annotations

from concurrent import futures
import contextlib
from pathlib import Path
import re
import socket
import threading
import time
from typing import Iterator
import urllib.request

import grpc
import numpy as np
import pytest
from ros_harness import wait_until
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.cloud import detection_pb2_grpc
from speculative_av.cloud.server import parse_args
from test_cloud import ServerProcess, serving_together

QUEUED_BEHIND = 6  # requests with a late deadline queued before the urgent one


@pytest.fixture(scope='module')
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """Start a deadline server, a FIFO one and a batching one with metrics (in parallel)."""
    logs = tmp_path_factory.mktemp('scheduling_logs')
    common = ('--threads', '1', '--metrics-port', '0')
    with serving_together({
        'deadline': ServerProcess(logs / 'deadline.log', *common),
        'fifo': ServerProcess(logs / 'fifo.log', '--scheduling', 'fifo', *common),
        'batching': ServerProcess(logs / 'batching.log', '--max-batch-size', '4',
                                  '--max-queue-delay-ms', '100', *common),
    }) as started:
        yield started


@pytest.fixture(scope='module')
def request_template() -> detection_pb2.DetectRequest:
    """Return a Detect request of a 640x480 jpeg, without a deadline."""
    rng = np.random.default_rng(5)
    frame = np.full((480, 640, 3), 100, np.uint8)
    frame[100:400, 100:500] = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    return codec.build_request(codec.encode_frame(frame), 'cam', 0, 0)


def with_deadline(request: detection_pb2.DetectRequest, frame_id: str,
                  seconds: float) -> detection_pb2.DetectRequest:
    """Return a copy of ``request`` due ``seconds`` from now."""
    copy = detection_pb2.DetectRequest()
    copy.CopyFrom(request)
    copy.frame_id = frame_id
    copy.deadline_unix_ns = time.time_ns() + int(seconds * 1e9)
    return copy


def metrics_url(server: ServerProcess) -> str:
    """Return the server's /metrics address, from its log."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = re.findall(r'metrics on http://\S+?:(\d+)/metrics', server.log())
        return bool(found)
    wait_until(logged, 30.0, 'the metrics line')
    return f'http://127.0.0.1:{found[0]}/metrics'


def scrape(server: ServerProcess) -> dict[str, float]:
    """Return every sample of the server's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(metrics_url(server), timeout=5.0) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            name, value = line.rsplit(' ', 1)
            samples[name] = float(value)
    return samples


@contextlib.contextmanager
def stub(server: ServerProcess) -> Iterator[detection_pb2_grpc.CloudDetectorStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield detection_pb2_grpc.CloudDetectorStub(channel)


def call_order_with_an_urgent_request(server: ServerProcess,
                                      request: detection_pb2.DetectRequest) -> list[str]:
    """
    Queue requests due in 30 s, then one due in 10 s; return the order their replies came in.

    The urgent request is sent once the server's queue holds at least 3 of the others.
    """
    finished: list[str] = []
    lock = threading.Lock()

    def send(detector: detection_pb2_grpc.CloudDetectorStub, name: str,
             seconds: float) -> grpc.Future:
        call = detector.Detect.future(with_deadline(request, name, seconds), timeout=60.0)

        def note(_: grpc.Future) -> None:
            with lock:
                finished.append(name)
        call.add_done_callback(note)
        return call

    with stub(server) as detector:
        calls = [send(detector, f'later{index}', 30.0) for index in range(QUEUED_BEHIND)]
        wait_until(lambda: scrape(server)['speculative_av_queue_depth'] >= 3, 30.0,
                   'a backlog in the queue')
        calls.append(send(detector, 'urgent', 10.0))
        wait_until(lambda: len(finished) == len(calls), 60.0, 'every reply')
        for call in calls:
            assert call.code() == grpc.StatusCode.OK, call.details()
    with lock:
        return list(finished)


def test_earliest_deadline_is_served_first(servers: dict[str, ServerProcess],
                                           request_template: detection_pb2.DetectRequest) -> None:
    order = call_order_with_an_urgent_request(servers['deadline'], request_template)
    # At most the one being inferred and one taken meanwhile finish before it; FIFO: all.
    assert order.index('urgent') <= 2, order
    fifo_order = call_order_with_an_urgent_request(servers['fifo'], request_template)
    assert fifo_order.index('urgent') >= 3, fifo_order


def test_hopeless_requests_are_refused_at_once_and_admitted_ones_arrive_in_time(
        servers: dict[str, ServerProcess], request_template: detection_pb2.DetectRequest) -> None:
    deadline_s, burst = 0.4, 12
    results: list[tuple[grpc.StatusCode, str, float]] = []
    lock = threading.Lock()
    with stub(servers['deadline']) as detector:
        def one(index: int) -> None:
            start = time.monotonic()
            try:
                # A reply after the deadline still comes back: it is counted as late.
                detector.Detect(with_deadline(request_template, f'f{index}', deadline_s),
                                timeout=5 * deadline_s)
                code, details = grpc.StatusCode.OK, ''
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
            with lock:
                results.append((code, details, time.monotonic() - start))
        with futures.ThreadPoolExecutor(burst) as pool:
            list(pool.map(one, range(burst)))
    refused = [seconds for code, details, seconds in results
               if code == grpc.StatusCode.DEADLINE_EXCEEDED
               and details.startswith('predicted completion')]
    served = [seconds for code, _, seconds in results if code == grpc.StatusCode.OK]
    assert len(refused) >= burst // 2 and served, results  # ~100 ms per inference here
    assert float(np.median(refused)) < deadline_s / 4, results
    assert sum(seconds <= deadline_s for seconds in served) >= 0.8 * len(served), results
    # Nothing else: no request waited in vain until its deadline.
    assert len(refused) + len(served) + sum(
        code == grpc.StatusCode.DEADLINE_EXCEEDED and details.startswith('deadline in')
        for code, details, _ in results) == burst, results


def test_concurrent_requests_share_forward_passes(
        servers: dict[str, ServerProcess], request_template: detection_pb2.DetectRequest) -> None:
    server = servers['batching']
    before = scrape(server)
    with stub(server) as detector:
        calls = [detector.Detect.future(with_deadline(request_template, f'b{i}', 30.0),
                                        timeout=60.0) for i in range(8)]
        replies = [call.result() for call in calls]
    sizes = [reply.batch_size for reply in replies]
    assert all(1 <= size <= 4 for size in sizes) and max(sizes) > 1, sizes
    assert all(len(reply.detections) for reply in replies)
    shared = replies[sizes.index(max(sizes))]
    assert shared.queue_ms >= 0 and shared.inference_ms > 0
    after = scrape(server)
    passes = after['speculative_av_batch_size_count'] - before['speculative_av_batch_size_count']
    images = after['speculative_av_batch_size_sum'] - before['speculative_av_batch_size_sum']
    assert images == 8 and passes < 8, (passes, images)
    assert (after['speculative_av_batch_size_bucket{le="1.0"}']
            - before['speculative_av_batch_size_bucket{le="1.0"}']) < passes


def test_metrics_endpoint_counts_by_status(servers: dict[str, ServerProcess],
                                           request_template: detection_pb2.DetectRequest) -> None:
    server = servers['batching']
    before = scrape(server)
    with stub(server) as detector:
        detector.Detect(with_deadline(request_template, 'ok', 30.0), timeout=30.0)
        with pytest.raises(grpc.RpcError) as info:
            detector.Detect(with_deadline(request_template, 'past', -1.0), timeout=30.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as info:
            detector.Detect(detection_pb2.DetectRequest(image=b'junk', image_format='jpeg'),
                            timeout=30.0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(server)

    def added(name: str) -> float:
        return after[name] - before.get(name, 0.0)
    assert added('speculative_av_requests_total{status="ok"}') == 1
    assert added('speculative_av_requests_total{status="expired"}') == 1
    assert added('speculative_av_requests_total{status="invalid"}') == 1
    assert added('speculative_av_replies_total{timeliness="in_time"}') == 1
    assert added('speculative_av_queue_seconds_count') == 1
    assert added('speculative_av_inference_seconds_count') == 1
    for status in ('late_rejected', 'dropped_unreachable', 'cancelled', 'refused',
                   'unavailable', 'failed'):
        assert f'speculative_av_requests_total{{status="{status}"}}' in after
    assert after['speculative_av_queue_depth'] == 0
    # Junk on the metrics port does not take the endpoint down.
    port = int(metrics_url(server).split(':')[-1].split('/')[0])
    for junk in (b'\x00\xff' * 5000, b'GET /' + b'a' * 70000 + b' HTTP/1.1\r\n\r\n',
                 b'POST /metrics HTTP/1.1\r\nContent-Length: 999999\r\n\r\nxx'):
        with socket.create_connection(('127.0.0.1', port), timeout=5.0) as connection:
            connection.sendall(junk)
    assert scrape(server)['speculative_av_queue_depth'] == 0


def test_a_taken_metrics_port_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        server = ServerProcess(tmp_path / 'taken.log', '--metrics-port',
                               str(taken.getsockname()[1]))
        assert server.process.wait(60.0) == 1
    assert 'could not serve metrics on port' in server.log(), server.log()


def test_summary_reports_statuses_and_batch_sizes(servers: dict[str, ServerProcess]) -> None:
    """The shutdown summary of the batching server (stopped last: the fixture ends it too)."""
    server = servers['batching']
    assert server.terminate() == 0
    summary = re.search(r'summary: (.*)', server.log())
    assert summary, server.log()
    counts = dict(item.split('=') for item in summary.group(1).split())
    assert int(counts['ok']) >= 9 and int(counts['invalid']) >= 1
    assert int(counts['requests']) == sum(int(counts[k]) for k in (
        'ok', 'late_rejected', 'dropped_unreachable', 'expired', 'cancelled', 'invalid',
        'refused', 'unavailable', 'failed'))
    sizes = dict(item.split(':') for item in counts['batch_sizes'].split(','))
    assert max(int(size) for size in sizes) > 1 and int(counts['inferences']) == sum(
        int(size) * int(count) for size, count in sizes.items())


@pytest.mark.parametrize('flags, message', [
    (['--max-batch-size', '0'], 'must be at least 1'),
    (['--max-queue', '-3'], 'must be at least 1'),
    (['--max-queue-delay-ms', 'nan'], 'must be at least 0'),
    (['--scheduling', 'lifo'], 'invalid choice'),
])
def test_bad_scheduling_flags_are_refused(flags: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err
