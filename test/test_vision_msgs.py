"""The vision_msgs in the environment match upstream and cross process boundaries."""
import json
from pathlib import Path
import subprocess

from ament_index_python.packages import get_package_share_directory
import pytest
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_harness import python_module, stop, wait_until
from vision_msgs.msg import (BoundingBox2D, Detection2D, Detection2DArray,
                             ObjectHypothesisWithPose)

UPSTREAM = json.loads(
    (Path(__file__).parent / 'data' / 'vision_msgs_upstream_rihs01.json').read_text())['hashes']


def _built_hashes() -> dict[str, str]:
    share = Path(get_package_share_directory('vision_msgs')) / 'msg'
    hashes = {}
    for description in share.glob('*.json'):
        for entry in json.loads(description.read_text())['type_hashes']:
            hashes[entry['type_name']] = entry['hash_string']
    return hashes


def test_every_upstream_vision_msgs_type_is_built_with_the_upstream_hash():
    built = _built_hashes()
    assert {name: built.get(name) for name in UPSTREAM} == UPSTREAM


def _detections() -> Detection2DArray:
    msg = Detection2DArray()
    msg.header.frame_id = 'cam_front'
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_000, 123_456_789
    for i, (cls, score) in enumerate([('car', 0.9), ('person', 0.55)]):
        det = Detection2D(id=f'track-{i}', bbox=BoundingBox2D(size_x=40.0 + i, size_y=20.0))
        det.header = msg.header
        det.bbox.center.position.x, det.bbox.center.position.y = 100.5 + i, 200.25
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id, hypothesis.hypothesis.score = cls, score
        det.results.append(hypothesis)
        msg.detections.append(det)
    return msg


@pytest.fixture
def node():
    rclpy.init()
    node = rclpy.create_node('detection_publisher_test')
    yield node
    node.destroy_node()
    rclpy.shutdown()


def test_detection2darray_crosses_processes_with_upstream_type_hash(node):
    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    publisher = node.create_publisher(Detection2DArray, 'detections', reliable)
    echo = subprocess.Popen(python_module('detection_echo'), cwd=Path(__file__).parent / 'helpers',
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: publisher.get_subscription_count() > 0, 30, 'the echo subscription',
                   poll=lambda: rclpy.spin_once(node, timeout_sec=0.05))
        remote = node.get_subscriptions_info_by_topic('/detections')
        assert [str(info.topic_type_hash) for info in remote] == \
            [UPSTREAM['vision_msgs/msg/Detection2DArray']]
        publisher.publish(_detections())
        out, _ = echo.communicate(timeout=30)
    finally:
        stop(echo)
    assert echo.returncode == 0
    assert json.loads(out) == {
        'stamp': [1_700_000_000, 123_456_789],
        'frame_id': 'cam_front',
        'detections': [
            {'id': 'track-0', 'center': [100.5, 200.25, 0.0], 'size': [40.0, 20.0],
             'results': [['car', 0.9]]},
            {'id': 'track-1', 'center': [101.5, 200.25, 0.0], 'size': [41.0, 20.0],
             'results': [['person', 0.55]]},
        ],
    }
