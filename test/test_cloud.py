"""
The gRPC cloud detector: wire format, a real server process on loopback, and CloudEndpoint.

Servers run ``python -m speculative_av.cloud.server`` with SSDlite and fixed-seed random
weights, the same weights :class:`TorchvisionDetector` builds in this process, so replies can be
checked against local inference on the same decoded image.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import cv2
from google.protobuf import descriptor_pool
import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)
import numpy as np
import pytest
from ros_harness import wait_until
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.cloud import detection_pb2_grpc
from speculative_av.cloud import generate_protos
from speculative_av.cloud.client import CloudEndpoint
from speculative_av.cloud.reply import CloudReply
from speculative_av.cloud.security import ChannelSecurity
from speculative_av.core.detections import Detections
from speculative_av.detectors.torchvision_detector import coco_categories, TorchvisionDetector

MODEL = 'ssdlite320_mobilenet_v3_large'
SERVICE = 'speculative_av.v1.CloudDetector'
EXTRA_LATENCY_MS = 400.0
STARTUP_TIMEOUT_S = 60.0
PLAINTEXT = ChannelSecurity.insecure()  # these servers listen on loopback only
CATEGORIES = coco_categories()  # the vehicle's label map: the servers' random SSDlite has it


class ServerProcess:
    """A cloud server in its own OS process, logging to a file."""

    READY = r'cloud_server listening on (\S+:\d+)\n'  # its first stdout line

    def __init__(self, log_path: Path, *args: str, port: int = 0,
                 security: tuple[str, ...] = ('--insecure',)) -> None:
        """Start it; ``security`` are its security options (default: plaintext on loopback)."""
        self.log_path = log_path
        with log_path.open('w') as log:
            self.process = subprocess.Popen(self.command(port, (*security, *args)),
                                            stdout=subprocess.PIPE, stderr=log, text=True)
        self._target = ''

    def command(self, port: int, args: tuple[str, ...]) -> list[str]:
        """Return the server's command line."""
        return [sys.executable, '-m', 'speculative_av.cloud.server', '--host', '127.0.0.1',
                '--port', str(port), '--model', MODEL, '--weights', 'random',
                '--score-threshold', '0.0', *args]

    @property
    def target(self) -> str:
        """Return 'host:port' from the server's first stdout line (waiting for it)."""
        if not self._target:
            assert self.process.stdout is not None
            ready, _, _ = select.select([self.process.stdout], [], [], STARTUP_TIMEOUT_S)
            line = self.process.stdout.readline() if ready else ''
            match = re.fullmatch(self.READY, line)
            assert match, f'no listening line ({line!r}); log:\n{self.log()}'
            self._target = match.group(1)
        return self._target

    def wait_serving(self) -> str:
        """Wait until the health service reports SERVING; return the target."""
        target = self.target
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            wait_until(lambda: health_status(stub, SERVICE) == 'SERVING', STARTUP_TIMEOUT_S,
                       f'{target} to serve')
        return target

    def terminate(self, timeout: float = 10.0) -> int:
        """Send SIGTERM and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        """Return what the server logged so far."""
        return self.log_path.read_text()


def health_status(stub: health_pb2_grpc.HealthStub, service: str) -> str:
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serving_together(
        started: dict[str, ServerProcess]) -> Iterator[dict[str, ServerProcess]]:
    """Wait for servers started in parallel (imports take seconds); stop them in parallel too."""
    try:
        for server in started.values():
            server.wait_serving()
        yield started
    finally:
        for server in started.values():
            server.process.send_signal(signal.SIGTERM)  # exits take a second: overlap them
        for server in started.values():
            server.terminate()


def plain_and_slow_servers(logs: Path, extra_latency_ms: float
                           ) -> contextlib.AbstractContextManager[dict[str, ServerProcess]]:
    """Run a plain server and one with extra latency."""
    return serving_together({
        'plain': ServerProcess(logs / 'plain.log'),
        'slow': ServerProcess(logs / 'slow.log', '--extra-latency-ms', str(extra_latency_ms))})


@pytest.fixture(scope='module')
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """Start a plain server and one with extra latency."""
    with plain_and_slow_servers(tmp_path_factory.mktemp('cloud_logs'),
                                EXTRA_LATENCY_MS) as started:
        yield started


@pytest.fixture(scope='module')
def plain(servers: dict[str, ServerProcess]) -> Iterator[detection_pb2_grpc.CloudDetectorStub]:
    with grpc.insecure_channel(servers['plain'].target) as channel:
        yield detection_pb2_grpc.CloudDetectorStub(channel)


@pytest.fixture(scope='module')
def local_detector() -> TorchvisionDetector:
    return TorchvisionDetector(MODEL, 'random', score_threshold=0.0)


@pytest.fixture(scope='module')
def image() -> np.ndarray:
    """Return a 320x240 RGB frame with flat regions, edges and texture."""
    rng = np.random.default_rng(3)
    frame = np.full((240, 320, 3), (70, 110, 150), np.uint8)
    frame[40:150, 30:140] = (220, 40, 40)
    frame[120:230, 180:300] = rng.integers(0, 256, (110, 120, 3), dtype=np.uint8)
    return frame


def assert_same(actual: Detections, expected: Detections, box_atol: float = 0.05) -> None:
    """
    Check two detection lists agree one to one within float tolerance.

    Inference is not bit-reproducible across processes: detections whose scores tie within the
    tolerance may come in either order, so each expected one is matched, not compared by index.
    """
    assert len(actual) == len(expected) > 0
    unmatched = list(range(len(actual)))
    for i in range(len(expected)):
        match = next((j for j in unmatched if actual.labels[j] == expected.labels[i]
                      and abs(actual.scores[j] - expected.scores[i]) <= 1e-5
                      and np.all(np.abs(actual.boxes[j] - expected.boxes[i]) <= box_atol)),
                     None)
        assert match is not None, (
            f'expected detection {i} (box {expected.boxes[i]}, score {expected.scores[i]}, '
            f'label {expected.labels[i]}) has no match among {actual}')
        unmatched.remove(match)


# --- wire format, no server -------------------------------------------------------------------

def test_encode_decode_and_response_round_trip(image: np.ndarray) -> None:
    jpeg = codec.encode_frame(image, jpeg_quality=90)
    assert (jpeg.width, jpeg.height, jpeg.original_width, jpeg.original_height) == (
        320, 240, 320, 240)
    assert jpeg.data[:2] == b'\xff\xd8' and jpeg.encode_ms > 0 and jpeg.nbytes < image.nbytes
    request = codec.build_request(jpeg, 'cam_front', 42, 7)
    assert (request.frame_id, request.stamp_ns, request.deadline_unix_ns) == ('cam_front', 42, 7)
    decoded = codec.decode_request_image(request)
    assert decoded.shape == image.shape and np.median(np.abs(decoded.astype(int) - image)) <= 2

    small = codec.encode_frame(image, max_image_side=160, image_format='png')
    assert (small.width, small.height, small.original_width) == (160, 120, 320)
    lossless = codec.decode_request_image(codec.build_request(small, '', 0, 0))
    np.testing.assert_array_equal(
        lossless, cv2.resize(image, (160, 120), interpolation=cv2.INTER_AREA))

    found = Detections(np.array([[1.5, 2.5, 30.25, 40.75]]), np.array([0.5]), np.array([3]))
    mapped = codec.to_original_coordinates(
        found, codec.build_request(small, '', 0, 0), small.width, small.height)
    np.testing.assert_allclose(mapped.boxes, [[3.0, 5.0, 60.5, 81.5]])
    response = codec.detections_to_response(
        mapped, model_name='m', model_version='v', server_receive_unix_ns=1, queue_ms=0.5,
        decode_ms=1.0, inference_ms=2.0)
    back = codec.response_to_detections(
        detection_pb2.DetectResponse.FromString(response.SerializeToString()))
    assert_same(back, mapped, box_atol=0.0)
    assert len(codec.response_to_detections(detection_pb2.DetectResponse())) == 0


@pytest.mark.parametrize('image_format, data, message', [
    ('jpeg', b'not a jpeg at all', 'cannot decode 17 bytes as jpeg'),
    ('png', b'\x89PNG\r\n\x1a\n' + b'\0' * 30, 'cannot decode 38 bytes as png'),
    ('png', b'\xff\xd8 a jpeg sent as png', 'do not start with the png signature'),
    ('gif', b'GIF89a', 'image format must be one of'),
    ('jpeg', b'', 'no image bytes'),
])
def test_decode_rejects_bad_images(image_format: str, data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        codec.decode_request_image(detection_pb2.DetectRequest(
            image=data, image_format=image_format, original_width=64, original_height=48))


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    for fresh in generate_protos.generate(tmp_path):
        committed = generate_protos.PACKAGE_DIR / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), (
            f'{committed} is stale: run python -m speculative_av.cloud.generate_protos')


# --- a real server on loopback ----------------------------------------------------------------

@pytest.mark.parametrize('max_image_side', [0, 160])
def test_detect_matches_local_inference_in_original_coordinates(
        plain: detection_pb2_grpc.CloudDetectorStub, local_detector: TorchvisionDetector,
        image: np.ndarray, max_image_side: int) -> None:
    frame = codec.encode_frame(image, max_image_side=max_image_side)
    request = codec.build_request(frame, 'cam_front', 123, 0)
    before = time.time_ns()
    response = plain.Detect(request, timeout=30.0)
    assert before <= response.server_receive_unix_ns <= time.time_ns()
    assert (response.model_name, response.model_version) == (MODEL, 'random')
    assert response.inference_ms > 0 and response.decode_ms > 0 and response.queue_ms >= 0

    decoded = codec.decode_request_image(request)
    expected = local_detector.detect(decoded).scaled(320 / decoded.shape[1],
                                                     240 / decoded.shape[0])
    actual = codec.response_to_detections(response)
    assert_same(actual, expected)
    # Boxes cover the camera image, not the smaller encoded one.
    assert actual.boxes[:, 2].max() > 0.75 * 320 and actual.boxes[:, 3].max() > 0.75 * 240


def test_health_reflection_and_model_info(servers: dict[str, ServerProcess]) -> None:
    target = servers['plain'].target
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health_status(health, '') == health_status(health, SERVICE) == 'SERVING'
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE, 'grpc.health.v1.Health'} <= set(database.get_services())
        service = descriptor_pool.DescriptorPool(database).FindServiceByName(SERVICE)
        assert {m.name for m in service.methods} == {'Detect', 'GetModelInfo'}
    with CloudEndpoint('plain', target, security=PLAINTEXT, categories=CATEGORIES) as endpoint:
        info = endpoint.model_info(timeout_s=5.0)
    assert info is not None
    assert (info.model_name, info.model_version, info.device) == (MODEL, 'random', 'cpu')
    assert len(info.categories) == 91 and info.categories[1] == 'person'


def test_bad_image_is_invalid_argument_and_server_keeps_serving(
        plain: detection_pb2_grpc.CloudDetectorStub, image: np.ndarray) -> None:
    for data, image_format in ((b'\xff\xd8garbage', 'jpeg'), (b'GIF89a', 'gif')):
        with pytest.raises(grpc.RpcError) as info:
            plain.Detect(detection_pb2.DetectRequest(image=data, image_format=image_format,
                                                     frame_id='bad'), timeout=10.0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "frame 'bad'" in info.value.details()
    frame = codec.encode_frame(image)
    assert len(plain.Detect(codec.build_request(frame, 'good', 0, 0), timeout=30.0).detections)


def test_expired_deadline_is_refused(plain: detection_pb2_grpc.CloudDetectorStub,
                                     image: np.ndarray) -> None:
    request = codec.build_request(codec.encode_frame(image), 'late', 0, time.time_ns() - 1)
    with pytest.raises(grpc.RpcError) as info:
        plain.Detect(request, timeout=10.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.details() == 'deadline passed before inference'


def test_extra_latency_delays_replies(servers: dict[str, ServerProcess],
                                      image: np.ndarray) -> None:
    request = codec.build_request(codec.encode_frame(image), 'cam', 0, 0)
    with grpc.insecure_channel(servers['slow'].target) as channel:
        stub = detection_pb2_grpc.CloudDetectorStub(channel)
        start = time.monotonic()
        response = stub.Detect(request, timeout=30.0)
        elapsed_ms = (time.monotonic() - start) * 1e3
    assert elapsed_ms >= EXTRA_LATENCY_MS + response.inference_ms
    assert response.inference_ms < EXTRA_LATENCY_MS  # the wait is not inference


class Replies:
    """Collect on_done calls."""

    def __init__(self) -> None:
        self.items: list[CloudReply] = []
        self._lock = threading.Lock()

    def __call__(self, reply: CloudReply) -> None:
        with self._lock:
            self.items.append(reply)

    def count(self) -> int:
        with self._lock:
            return len(self.items)


def test_submit_replies_cancel_and_timeout(servers: dict[str, ServerProcess],
                                           local_detector: TorchvisionDetector,
                                           image: np.ndarray) -> None:
    frame = codec.encode_frame(image)
    with CloudEndpoint('slow', servers['slow'].target, security=PLAINTEXT,
                       categories=CATEGORIES) as endpoint:
        wait_until(lambda: endpoint.healthy, 10.0, 'the slow endpoint to be healthy')
        cancelled, timed_out, answered = Replies(), Replies(), Replies()
        future = endpoint.submit(frame, 'f1', 1, 30.0, 0, cancelled)
        assert future.cancel()
        endpoint.submit(frame, 'f2', 2, 0.1, 0, timed_out)
        endpoint.submit(frame, 'f3', 3, 30.0, 0, answered)
        # f3 ends after the server's 400 ms delay; by then f1 and f2 are long decided.
        wait_until(lambda: len(answered.items) == 1, 30.0, 'the reply to f3')
    assert [(r.ok, r.error, r.frame_id) for r in cancelled.items] == [(False, 'CANCELLED', 'f1')]
    assert len(timed_out.items) == 1 and not timed_out.items[0].ok
    assert timed_out.items[0].error.startswith('DEADLINE_EXCEEDED')
    assert len(timed_out.items[0].detections) == 0
    reply = answered.items[0]
    assert reply.ok and reply.error == '' and reply.endpoint == 'slow'
    assert (reply.model_name, reply.model_version) == (MODEL, 'random')
    assert reply.round_trip_ms >= EXTRA_LATENCY_MS and reply.server_inference_ms > 0
    decoded = codec.decode_request_image(codec.build_request(frame, '', 0, 0))
    assert_same(reply.detections, local_detector.detect(decoded))


def test_endpoint_health_backoff_and_server_lifecycle(tmp_path: Path,
                                                      image: np.ndarray) -> None:
    """Down endpoint backs off; a server started there is found; SIGTERM ends it cleanly."""
    port = _free_port()
    target = f'127.0.0.1:{port}'
    changes: list[tuple[str, str]] = []

    def note(name: str, old: str, new: str, error: str) -> None:
        changes.append((old, new))

    with CloudEndpoint('late', target, security=PLAINTEXT, categories=CATEGORIES,
                       backoff_initial_s=0.05, backoff_max_s=0.4,
                       on_health_change=note) as endpoint:
        wait_until(lambda: endpoint.health().consecutive_failures >= 3, 10.0, 'failed polls')
        assert endpoint.health_state == 'UNREACHABLE' and not endpoint.healthy
        assert endpoint.health().next_check_in_s >= 0.2  # 0.05 -> 0.1 -> 0.2 -> 0.4
        assert endpoint.health().last_error.startswith('UNAVAILABLE')

        server = ServerProcess(tmp_path / 'late.log', port=port)
        try:
            assert server.target == target
            wait_until(lambda: endpoint.healthy, STARTUP_TIMEOUT_S, 'the endpoint to recover')
            assert endpoint.health().next_check_in_s == 0.0  # a health stream is open

            frame = codec.encode_frame(image)
            replies = Replies()
            endpoint.submit(frame, 'ok', 0, 30.0, 0, replies)
            endpoint.submit(frame, 'late', 0, 30.0, time.time_ns() - 1, replies)
            wait_until(lambda: len(replies.items) == 2, 30.0, 'two replies')
            by_frame = {r.frame_id: r for r in replies.items}
            assert by_frame['ok'].ok
            assert by_frame['late'].error.startswith('DEADLINE_EXCEEDED')
            with grpc.insecure_channel(target) as channel:
                with pytest.raises(grpc.RpcError, match='INVALID_ARGUMENT'):
                    detection_pb2_grpc.CloudDetectorStub(channel).Detect(
                        detection_pb2.DetectRequest(image=b'junk', image_format='jpeg'),
                        timeout=10.0)

            start = time.monotonic()
            assert server.terminate() == 0
            assert time.monotonic() - start < 5.0
            replies = Replies()
            endpoint.submit(frame, 'after', 0, 5.0, 0, replies)
            wait_until(lambda: len(replies.items) == 1, 10.0, 'the failed reply')
            assert replies.items[0].error.startswith('UNAVAILABLE')
            wait_until(lambda: endpoint.health_state == 'UNREACHABLE', 10.0, 'unreachable')
        finally:
            server.terminate()
    # Every transition reached the listener, as a chain of real changes.
    states = [changes[0][0]] + [new for _, new in changes]
    assert [old for old, _ in changes] == states[:-1] and all(o != n for o, n in changes)
    assert states[:2] == ['UNKNOWN', 'UNREACHABLE'] and states[-1] == 'UNREACHABLE'
    assert 'SERVING' in states
    summary = re.search(r'summary: (.*)', server.log())
    assert summary, server.log()
    counts = dict(item.split('=') for item in summary.group(1).split())
    assert (counts['requests'], counts['ok'], counts['expired'], counts['invalid']) == (
        '3', '1', '1', '1')
    assert counts['inferences'] == '1'  # the expired request never reached the model


@pytest.mark.benchmark
def test_round_trip_benchmark(plain: detection_pb2_grpc.CloudDetectorStub) -> None:
    """Print encode and loopback round-trip times for 640x480 frames (ssdlite, random)."""
    rng = np.random.default_rng(0)
    frame_rgb = np.full((480, 640, 3), 100, np.uint8)
    frame_rgb[100:400, 100:500] = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for max_side in (0, 320):
        encode_ms, total_ms, inference_ms = [], [], []
        for _ in range(20):
            frame = codec.encode_frame(frame_rgb, max_image_side=max_side)
            start = time.perf_counter()
            response = plain.Detect(codec.build_request(frame, 'cam', 0, 0), timeout=30.0)
            total_ms.append((time.perf_counter() - start) * 1e3)
            encode_ms.append(frame.encode_ms)
            inference_ms.append(response.inference_ms)
        print(f'\n640x480 max_side={max_side}: {frame.nbytes} B, encode '
              f'{np.median(encode_ms):.1f} ms, round trip {np.median(total_ms):.1f} ms '
              f'(server inference {np.median(inference_ms):.1f} ms)')
