"""
The vehicle's Open Inference Protocol endpoint against a real v2 gRPC server on loopback.

The server (``test/helpers/oip_server.py``) implements ``inference.GRPCInferenceService`` with
the project's stubs and a real SSDlite with fixed-seed random weights, the weights of the local
detector here, so replies can be checked against local inference on the same image. It stands
in for Triton, whose own race test runs the node against a real ``tritonserver``.
"""
from __future__ import annotations

from pathlib import Path
import signal
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from ros_harness import wait_until
from speculative_av.cloud import codec
from speculative_av.cloud import open_inference_pb2 as oip
from speculative_av.cloud import open_inference_pb2_grpc as oip_grpc
from speculative_av.cloud.endpoint_factory import open_endpoint
from speculative_av.cloud.endpoints import EndpointSpec
from speculative_av.cloud.oip_client import OipEndpoint
from speculative_av.core.detections import Detections
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from test_cloud import (_free_port, assert_same, CATEGORIES, image, local_detector,  # noqa: F401
                        PLAINTEXT, Replies, ServerProcess, STARTUP_TIMEOUT_S)

HELPER = Path(__file__).resolve().parent / 'helpers' / 'oip_server.py'


class OipServer(ServerProcess):
    """The v2 test server in its own process (``port`` 0: a free one)."""

    READY = r'oip_server ready grpc=(\S+:\d+) model=\S+\n'

    def __init__(self, log_path: Path, *args: str, port: int = 0) -> None:
        """Start it; it serves plaintext on loopback only."""
        super().__init__(log_path, *args, port=port, security=())

    def command(self, port: int, args: tuple[str, ...]) -> list[str]:
        """Return the helper's command line."""
        return [sys.executable, str(HELPER), '--port', str(port), *args]


def _expected(detector: TorchvisionDetector, frame: codec.EncodedFrame) -> Detections:
    """
    Return what local inference finds in the image as sent, in camera pixels.

    Labels travel as names, so COCO's ten 'N/A' classes all arrive as the last of them.
    """
    decoded = codec.decode_request_image(codec.build_request(frame, '', 0, 0))
    found = detector.detect(decoded).scaled(frame.original_width / frame.width,
                                            frame.original_height / frame.height)
    by_name = {name: i for i, name in enumerate(CATEGORIES)}
    return Detections(found.boxes, found.scores,
                      np.array([by_name[CATEGORIES[i]] for i in found.labels], np.int64))


def test_v2_endpoint_races_like_the_native_one(tmp_path: Path, image: np.ndarray,  # noqa: F811
                                               local_detector: TorchvisionDetector  # noqa: F811
                                               ) -> None:
    """Healthy once verified; replies in local ids and camera pixels; cancel, timeout, loss."""
    server = OipServer(tmp_path / 'raw.log', '--padding', '5')
    frame = codec.encode_frame(image, max_image_side=200)  # 320x240 sent as 200x150
    expected = _expected(local_detector, frame)
    # The most frequent class is unknown on this vehicle: its detections must be dropped.
    names, counts = np.unique(expected.labels, return_counts=True)
    unknown = CATEGORIES[names[counts.argmax()]]
    local_names = [f'not-{c}' if c == unknown else c for c in CATEGORIES]
    keep = np.array([CATEGORIES[i] != unknown for i in expected.labels])
    changes: list[str] = []
    spec = EndpointSpec.parse(f'v2=kserve://{server.target}/speculative_detector')
    try:
        with open_endpoint(spec, security=PLAINTEXT, categories=local_names,
                           on_health_change=lambda n, o, new, e: changes.append(new)
                           ) as endpoint:
            assert isinstance(endpoint, OipEndpoint)
            wait_until(lambda: endpoint.healthy, STARTUP_TIMEOUT_S, 'the v2 endpoint to serve')
            assert endpoint.health().next_check_in_s == 0.25  # the poll interval
            answered, cancelled, timed_out = Replies(), Replies(), Replies()
            endpoint.submit(frame, 'f1', 1, 30.0, 0, answered)
            handle = endpoint.submit(frame, 'f2', 2, 30.0, 0, cancelled)
            handle.cancel()
            endpoint.submit(frame, 'f3', 3, 1e-4, 0, timed_out)
            wait_until(lambda: answered.count() and cancelled.count() and timed_out.count(),
                       30.0, 'three outcomes')
            reply = answered.items[0]
            assert reply.ok, reply
            assert (reply.endpoint, reply.frame_id, reply.model_name, reply.model_version) == (
                'v2', 'f1', 'speculative_detector', '1')
            assert_same(reply.detections, Detections(
                expected.boxes[keep], expected.scores[keep], expected.labels[keep]), 0.5)
            assert endpoint.unknown_labels() == {unknown: int(counts.max())}
            assert cancelled.items[0].error == 'CANCELLED'
            assert timed_out.items[0].error.startswith('DEADLINE_EXCEEDED')

            server.process.kill()
            wait_until(lambda: endpoint.health_state == 'UNREACHABLE', 5.0, 'the loss')
            lost = Replies()
            endpoint.submit(frame, 'f4', 4, 5.0, 0, lost)
            wait_until(lambda: lost.count(), 10.0, 'the failed call')
            assert lost.items[0].error.startswith('UNAVAILABLE')
    finally:
        server.terminate()
    assert changes[:2] == ['UNREACHABLE', 'SERVING'] or changes[:1] == ['SERVING'], changes
    assert changes[-1] == 'UNREACHABLE'


def test_a_new_model_version_is_verified_before_its_replies_count(
        tmp_path: Path, image: np.ndarray,  # noqa: F811
        local_detector: TorchvisionDetector) -> None:  # noqa: F811
    """Typed contents; after a reload as version 2 the first reply is refused, then fused."""
    server = OipServer(tmp_path / 'typed.log', '--typed-contents')
    frame = codec.encode_frame(image)
    expected = _expected(local_detector, frame)
    try:
        with OipEndpoint('v2', server.target, security=PLAINTEXT,
                         categories=CATEGORIES) as endpoint:
            wait_until(lambda: endpoint.healthy, STARTUP_TIMEOUT_S, 'the v2 endpoint to serve')
            before = Replies()
            endpoint.submit(frame, 'v1', 0, 30.0, 0, before)
            wait_until(before.count, 30.0, 'the first reply')
            assert before.items[0].ok and before.items[0].model_version == '1'
            assert_same(before.items[0].detections, expected)

            server.process.send_signal(signal.SIGUSR1)  # the model reloads as version 2
            with grpc.insecure_channel(server.target) as channel:
                stub = oip_grpc.GRPCInferenceServiceStub(channel)
                wait_until(lambda: stub.ModelMetadata(oip.ModelMetadataRequest(
                    name='speculative_detector'), timeout=5.0).versions == ['2'], 10.0,
                    'the reload')
            changed = Replies()
            endpoint.submit(frame, 'v2', 0, 30.0, 0, changed)
            wait_until(changed.count, 30.0, 'the reply of version 2')
            assert changed.items[0].error.startswith('model changed: version 2 answered')
            wait_until(lambda: endpoint.healthy, 10.0, 'version 2 to be verified')
            after = Replies()
            endpoint.submit(frame, 'v2-again', 0, 30.0, 0, after)
            wait_until(after.count, 30.0, 'the next reply')
            assert after.items[0].ok and after.items[0].model_version == '2'
            assert_same(after.items[0].detections, expected)
    finally:
        server.terminate()


@pytest.mark.parametrize('args, model, state, error', [
    (('--broken-metadata',), 'speculative_detector', 'UNVERIFIED',
     'declares output LABELS as INT64'),
    ((), 'no_such_model', 'NOT_SERVING', 'model no_such_model not ready'),
])
def test_a_model_that_breaks_the_contract_or_is_absent_is_never_healthy(
        tmp_path: Path, args: tuple[str, ...], model: str, state: str, error: str) -> None:
    server = OipServer(tmp_path / 'server.log', *args)
    try:
        with OipEndpoint('v2', server.target, model=model, security=PLAINTEXT,
                         categories=CATEGORIES, backoff_initial_s=0.05,
                         backoff_max_s=0.2) as endpoint:
            wait_until(lambda: endpoint.health_state == state, STARTUP_TIMEOUT_S, state)
            if state == 'UNVERIFIED':  # verification is retried, with backoff
                wait_until(lambda: endpoint.health().consecutive_failures >= 3, 10.0,
                           'retries')
            assert error in endpoint.health().last_error
            assert not endpoint.healthy
    finally:
        server.terminate()


def test_v2_endpoint_finds_a_server_that_starts_after_it(tmp_path: Path) -> None:
    port = _free_port()
    with OipEndpoint('late', f'127.0.0.1:{port}', security=PLAINTEXT, categories=CATEGORIES,
                     backoff_initial_s=0.05, backoff_max_s=0.4) as endpoint:
        wait_until(lambda: endpoint.health().consecutive_failures >= 2, 10.0, 'failed polls')
        assert endpoint.health_state == 'UNREACHABLE'
        server = OipServer(tmp_path / 'late.log', port=port)
        try:
            assert server.target == f'127.0.0.1:{port}'
            wait_until(lambda: endpoint.healthy, STARTUP_TIMEOUT_S, 'the late server')
        finally:
            assert server.terminate() == 0
        wait_until(lambda: not endpoint.healthy, 5.0, 'the stopped server to be noticed')


def _ready_since(target: str, stop: threading.Event, seen: list[float]) -> None:
    """Poll the model's readiness on a channel of its own every 10 ms; note the first ready."""
    with grpc.insecure_channel(target, options=[('grpc.initial_reconnect_backoff_ms', 10),
                                                ('grpc.max_reconnect_backoff_ms', 10)]) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set() and not seen:
            try:
                ready = stub.ModelReady(oip.ModelReadyRequest(name='speculative_detector'),
                                        timeout=0.5).ready
            except grpc.RpcError:
                ready = False
            if ready:
                seen.append(time.monotonic())
            stop.wait(0.01)


def test_a_killed_v2_server_is_noticed_at_once_and_a_restarted_one_within_a_second(
        tmp_path: Path) -> None:
    port = _free_port()
    became: dict[str, list[float]] = {}
    first = OipServer(tmp_path / 'first.log', port=port)
    try:
        with OipEndpoint('v2', first.target, security=PLAINTEXT, categories=CATEGORIES,
                         on_health_change=lambda n, o, new, e: became.setdefault(
                             new, []).append(time.monotonic())) as endpoint:
            wait_until(lambda: endpoint.healthy, STARTUP_TIMEOUT_S, 'the endpoint to serve')
            killed = time.monotonic()
            first.process.kill()
            wait_until(lambda: endpoint.health_state == 'UNREACHABLE', 5.0, 'the loss')
            noticed_s = became['UNREACHABLE'][-1] - killed
            stop, ready = threading.Event(), []
            second = OipServer(tmp_path / 'second.log', port=port)
            probe = threading.Thread(target=_ready_since, args=(first.target, stop, ready))
            probe.start()
            try:
                wait_until(lambda: bool(ready), STARTUP_TIMEOUT_S, 'the restarted server')
                wait_until(lambda: endpoint.healthy, 5.0, 'the endpoint to recover')
            finally:
                stop.set()
                probe.join()
                second.terminate()
            recovered_s = became['SERVING'][-1] - ready[0]
    finally:
        first.terminate()
    print(f'\nv2: killed server noticed after {noticed_s * 1e3:.0f} ms; restarted server '
          f'verified and raced again {recovered_s * 1e3:.0f} ms after it was ready')
    assert noticed_s < 1.0 and recovered_s < 1.0
