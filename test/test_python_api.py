"""
The plain-Python API: the engine with a real local detector and real cloud servers on loopback.

The servers run the local detector's random SSDlite weights, so the cloud's answer is known:
the local detector's on the JPEG that was sent, its labels translated when the server's label
map is another one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from speculative_av.cloud import codec
from speculative_av.core.detections import label_mapping
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.engine.python_api import SpeculativeDetection
from test_cloud import (_free_port, assert_same, CATEGORIES, image, local_detector,  # noqa: F401
                        ServerProcess, STARTUP_TIMEOUT_S)
from test_label_verification import checkpoints, REVERSED  # noqa: F401

LONG_DEADLINE_MS = 20_000.0  # the cloud always makes it: what wins is the contract here


def _sent(rgb: np.ndarray) -> np.ndarray:
    """Return what the server decodes from the JPEG the engine sends."""
    return codec.decode_request_image(codec.build_request(codec.encode_frame(rgb), '', 0, 0))


@pytest.fixture(scope='module')
def servers(tmp_path_factory: pytest.TempPathFactory,
            checkpoints: dict[str, Path]) -> Iterator[dict[str, str]]:  # noqa: F811
    """Start a server with the vehicle's label map and one with the labels reversed."""
    logs = tmp_path_factory.mktemp('python_api_logs')
    started = {'same': ServerProcess(logs / 'same.log'),
               'reversed': ServerProcess(logs / 'reversed.log', '--weights',
                                         str(checkpoints['reversed']))}
    try:
        yield {name: server.wait_serving() for name, server in started.items()}
    finally:
        for server in started.values():
            server.terminate()


def test_the_cloud_result_is_returned_when_it_comes_in_time(
        servers: dict[str, str], local_detector: TorchvisionDetector,  # noqa: F811
        image: np.ndarray) -> None:  # noqa: F811
    with SpeculativeDetection(local_detector, [f'gpu={servers["same"]}'],
                              deadline_ms=LONG_DEADLINE_MS, insecure=True) as fusion:
        assert fusion.wait_until_serving(STARTUP_TIMEOUT_S)
        result = fusion.detect(image)
        assert result.winner == 'gpu' and not result.late
        assert_same(result.detections, local_detector.detect(_sent(image)))
        assert fusion.engine.snapshot()['frames_processed'] == 1


def test_cloud_labels_are_translated_into_the_vehicles_label_ids(
        servers: dict[str, str], local_detector: TorchvisionDetector,  # noqa: F811
        image: np.ndarray) -> None:  # noqa: F811
    with SpeculativeDetection(local_detector, [servers['reversed']],
                              deadline_ms=LONG_DEADLINE_MS, insecure=True) as fusion:
        assert fusion.wait_until_serving(STARTUP_TIMEOUT_S)
        result = fusion.detect(image)
    expected = local_detector.detect(_sent(image)).relabeled(
        label_mapping(REVERSED, CATEGORIES))
    assert result.winner == 'cloud'
    assert (expected.labels != local_detector.detect(_sent(image)).labels).any()
    assert_same(result.detections, expected)


def test_the_higher_priority_of_two_endpoints_wins(
        servers: dict[str, str], local_detector: TorchvisionDetector,  # noqa: F811
        image: np.ndarray) -> None:  # noqa: F811
    endpoints = [f'low={servers["same"]}@10', f'high={servers["reversed"]}@20']
    with SpeculativeDetection(local_detector, endpoints, deadline_ms=LONG_DEADLINE_MS,
                              insecure=True) as fusion:
        assert fusion.wait_until_serving(STARTUP_TIMEOUT_S)
        results = [fusion.detect(image) for _ in range(3)]
    assert [r.winner for r in results] == ['high'] * 3


def test_without_a_reachable_cloud_the_local_result_comes_at_once(
        local_detector: TorchvisionDetector, image: np.ndarray) -> None:  # noqa: F811
    with SpeculativeDetection(local_detector, [f'127.0.0.1:{_free_port()}'],
                              deadline_ms=LONG_DEADLINE_MS, insecure=True) as fusion:
        result = fusion.detect(image)
    assert result.winner == 'local' and not result.late
    assert result.latency_ms < LONG_DEADLINE_MS / 2  # not held for a cloud that is down
    assert_same(result.detections, local_detector.detect(image))


@pytest.mark.parametrize('bad', [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((0, 4, 3), np.uint8), 'image'])
def test_a_malformed_frame_raises_and_the_next_frame_is_served(
        bad: object, local_detector: TorchvisionDetector,  # noqa: F811
        image: np.ndarray) -> None:  # noqa: F811
    with SpeculativeDetection(local_detector, deadline_ms=1000.0) as fusion:
        with pytest.raises(ValueError, match='RGB image'):
            fusion.detect(bad)  # type: ignore[arg-type]
        assert fusion.detect(image).winner == 'local'
