"""
A native endpoint checks its server's label map each time the server becomes serving.

Servers are real ``cloud_server`` processes; their checkpoints hold the random SSDlite weights
of the local detector under other category lists, so a reply's labels show which map was used.
"""
from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
import numpy as np
import pytest
from ros_harness import wait_until
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.cloud.client import CloudEndpoint, SERVICE_NAME
from speculative_av.core.detections import Detections, label_mapping
from speculative_av.detectors.torchvision_detector import save_checkpoint, TorchvisionDetector
from test_cloud import (_free_port, assert_same, CATEGORIES, image, local_detector,  # noqa: F401
                        PLAINTEXT, Replies, ServerProcess, STARTUP_TIMEOUT_S)

REVERSED = CATEGORIES[::-1]


@pytest.fixture(scope='module')
def checkpoints(local_detector: TorchvisionDetector,  # noqa: F811
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints of the local weights under reversed and under foreign category names."""
    folder = tmp_path_factory.mktemp('checkpoints')
    paths = {}
    for name, categories in (('reversed', REVERSED),
                             ('foreign', [f'thing_{i}' for i in range(len(CATEGORIES))])):
        paths[name] = folder / f'{name}.pt'
        save_checkpoint(local_detector.module, paths[name], num_classes=len(categories),
                        categories=categories)
    return paths


def _reply(endpoint: CloudEndpoint, frame: codec.EncodedFrame) -> Detections:
    replies = Replies()
    endpoint.submit(frame, 'f', 0, 30.0, 0, replies)
    wait_until(replies.count, 30.0, 'the reply')
    assert replies.items[0].ok, replies.items[0]
    return replies.items[0].detections


def test_label_map_is_verified_on_every_start_of_the_server(
        tmp_path: Path, checkpoints: dict[str, Path], image: np.ndarray,  # noqa: F811
        local_detector: TorchvisionDetector) -> None:  # noqa: F811
    """Down at start, then a model with reversed labels, then one with the local labels."""
    frame = codec.encode_frame(image)
    local = local_detector.detect(codec.decode_request_image(
        codec.build_request(frame, '', 0, 0)))
    port = _free_port()
    states: list[str] = []
    with CloudEndpoint('cloud', f'127.0.0.1:{port}', security=PLAINTEXT, categories=CATEGORIES,
                       backoff_initial_s=0.05, backoff_max_s=0.4,
                       on_health_change=lambda n, o, new, e: states.append(new)) as endpoint:
        wait_until(lambda: endpoint.health().consecutive_failures >= 2, 10.0, 'failed checks')
        reversed_server = ServerProcess(tmp_path / 'reversed.log', '--weights',
                                        str(checkpoints['reversed']), port=port)
        try:
            wait_until(lambda: endpoint.healthy, STARTUP_TIMEOUT_S, 'the reversed-label server')
            translated = local.relabeled(label_mapping(REVERSED, CATEGORIES))
            assert (translated.labels != local.labels).any()
            assert_same(_reply(endpoint, frame), translated)
        finally:
            reversed_server.terminate()
        wait_until(lambda: not endpoint.healthy, 10.0, 'the stopped server to be noticed')

        same_server = ServerProcess(tmp_path / 'same.log', port=port)
        try:
            wait_until(lambda: endpoint.healthy, STARTUP_TIMEOUT_S, 'the restarted server')
            assert_same(_reply(endpoint, frame), local)
        finally:
            same_server.terminate()
    assert states[0] == 'UNREACHABLE' and states.count('SERVING') == 2, states


def test_a_model_sharing_no_class_with_the_vehicle_is_never_healthy(
        tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    server = ServerProcess(tmp_path / 'foreign.log', '--weights', str(checkpoints['foreign']))
    try:
        target = server.wait_serving()
        with CloudEndpoint('cloud', target, security=PLAINTEXT, categories=CATEGORIES,
                           backoff_initial_s=0.05, backoff_max_s=0.2) as endpoint:
            wait_until(lambda: endpoint.health().consecutive_failures >= 3, 10.0, 'retries')
            health = endpoint.health()
            assert health.state == 'UNVERIFIED' and not endpoint.healthy
            assert 'none of its 91 categories is a local one' in health.last_error
            replies = Replies()
            endpoint.submit(codec.encode_frame(np.zeros((64, 64, 3), np.uint8)), 'f', 0, 30.0, 0,
                            replies)
            wait_until(replies.count, 30.0, 'the reply')
            assert replies.items[0].error == 'labels not verified'
    finally:
        server.terminate()


def test_a_reply_from_another_model_is_refused_and_the_model_verified_again() -> None:
    """A server whose Detect names another model than its GetModelInfo (a swap behind a proxy)."""
    info = detection_pb2.ModelInfo(model_name='a', model_version='1', categories=CATEGORIES)
    answer = detection_pb2.DetectResponse(model_name='b', model_version='1')
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        'GetModelInfo': grpc.unary_unary_rpc_method_handler(
            lambda request, context: info.SerializeToString(), request_deserializer=bytes,
            response_serializer=bytes),
        'Detect': grpc.unary_unary_rpc_method_handler(
            lambda request, context: answer.SerializeToString(), request_deserializer=bytes,
            response_serializer=bytes)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    servicer = health.HealthServicer()
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port('127.0.0.1:0')
    server.start()
    states: list[str] = []
    try:
        with CloudEndpoint('cloud', f'127.0.0.1:{port}', security=PLAINTEXT,
                           categories=CATEGORIES, backoff_initial_s=0.05,
                           on_health_change=lambda n, o, new, e: states.append(new)
                           ) as endpoint:
            wait_until(lambda: endpoint.healthy, 10.0, 'the endpoint to serve')
            replies = Replies()
            endpoint.submit(codec.encode_frame(np.zeros((64, 64, 3), np.uint8)), 'f', 0, 10.0,
                            0, replies)
            wait_until(replies.count, 10.0, 'the reply')
            assert replies.items[0].error == 'model changed: b 1 answered, a 1 was verified'
            wait_until(lambda: states.count('SERVING') == 2, 10.0, 'verified again')
    finally:
        server.stop(0).wait()
    assert states[:3] == ['SERVING', 'UNVERIFIED', 'SERVING'], states
