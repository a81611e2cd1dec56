"""replay and record: rosbag2 bags (mcap and sqlite3) into ROS 2 topics and back, as processes."""
import json
from pathlib import Path
import signal
import subprocess
import time

import numpy as np
import pytest
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from ros_harness import python_module, ros_args, running, stop, wait_until
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image
from speculative_av.ros.image_conversion import rgb_to_image_msg
from speculative_av.ros.synthetic_camera import render_frame
from speculative_av.tools.bag_types import typestore, vision_msgs_share
from speculative_av.tools.replay import parse_args, split_ros_args
from std_msgs.msg import Header
from vision_msgs.msg import Detection2D, Detection2DArray

WIDTH, HEIGHT, FRAMES = 64, 48, 10
T0_NS, PERIOD_NS = 1_700_000_000_000_000_000, 100_000_000  # 10 Hz
IMAGE, COMPRESSED, TRUTH = '/camera/image', '/camera/image/compressed', '/ground_truth'
TYPES = {IMAGE: Image, COMPRESSED: CompressedImage, TRUTH: Detection2DArray}
TYPE_NAMES = {IMAGE: 'sensor_msgs/msg/Image', COMPRESSED: 'sensor_msgs/msg/CompressedImage',
              TRUTH: 'vision_msgs/msg/Detection2DArray'}
STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}


def _header(i: int) -> Header:
    header = Header(frame_id='cam_front')
    header.stamp.sec, header.stamp.nanosec = divmod(T0_NS + i * PERIOD_NS, 1_000_000_000)
    return header


def _message(topic: str, i: int):
    if topic == IMAGE:
        return rgb_to_image_msg(render_frame(i, WIDTH, HEIGHT), _header(i))
    if topic == COMPRESSED:
        return CompressedImage(header=_header(i), format='jpeg', data=bytes([i]) * (i + 1))
    return Detection2DArray(header=_header(i), detections=[Detection2D(id=f'object-{i}')])


def _content(msg) -> tuple:
    """Return what a received message must match: stamp, frame and payload."""
    payload = [d.id for d in msg.detections] if isinstance(msg, Detection2DArray) \
        else bytes(msg.data)
    return (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id, payload)


def _write_bag(path: Path, storage: str) -> Path:
    """Write FRAMES images, compressed images and ground truth, logged at their stamps."""
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[storage]) as writer:
        connections = {topic: writer.add_connection(topic, name, typestore=typestore())
                       for topic, name in TYPE_NAMES.items()}
        for i in range(FRAMES):
            for topic, connection in connections.items():
                writer.write(connection, T0_NS + i * PERIOD_NS,
                             serialize_message(_message(topic, i)))
    return path


@pytest.fixture(scope='module', params=sorted(STORAGES))
def bag(request, tmp_path_factory) -> Path:
    """Write the test bag in each storage format."""
    return _write_bag(tmp_path_factory.mktemp('bags') / request.param, request.param)


@pytest.fixture(scope='module')
def mcap_bag(tmp_path_factory) -> Path:
    """Write the test bag once, for what does not depend on the storage format."""
    return _write_bag(tmp_path_factory.mktemp('bags') / 'mcap', 'mcap')


@pytest.fixture
def node():
    rclpy.init()
    node = rclpy.create_node('replay_test')
    yield node
    node.destroy_node()
    rclpy.shutdown()


class Listener:
    """Everything the test process receives on some topics, with arrival times, and /clock."""

    def __init__(self, node, topics: dict[str, type]) -> None:
        self.node = node
        self.received: dict[str, list] = {topic: [] for topic in topics}
        self.arrivals: dict[str, list[float]] = {topic: [] for topic in topics}
        self.clock_ns: list[int] = []
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        for topic, cls in topics.items():
            node.create_subscription(cls, topic, lambda msg, t=topic: self._on(t, msg), reliable)
        node.create_subscription(
            Clock, '/clock', lambda m: self.clock_ns.append(m.clock.sec * 10**9 + m.clock.nanosec),
            QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT))

    def _on(self, topic: str, msg) -> None:
        self.received[topic].append(msg)
        self.arrivals[topic].append(time.monotonic())

    def spin(self) -> None:
        rclpy.spin_once(self.node, timeout_sec=0.02)

    def play(self, *args: str, expect: dict[str, int], timeout: float = 30) -> str:
        """Run replay with ``args`` until it exits and ``expect`` counts arrived; its stdout."""
        command = python_module('speculative_av.tools.replay', *args, '--qos', 'reliable',
                                '--wait-for-subscribers', '1')
        with running(command, stdout=subprocess.PIPE) as replay:
            wait_until(lambda: replay.poll() is not None and all(
                len(self.received[t]) >= n for t, n in expect.items()),
                timeout, f'replay {args} to deliver {expect}', poll=self.spin)
            assert replay.returncode == 0
            return replay.stdout.read()


def test_vision_msgs_in_the_typestore_have_the_installed_type_hashes():
    installed = {entry['type_name']: entry['hash_string']
                 for path in (vision_msgs_share() / 'msg').glob('*.json')
                 for entry in json.loads(path.read_text())['type_hashes']}
    vision = {name for name in installed if name.startswith('vision_msgs/')}
    assert len(vision) == 16
    assert {name: typestore().hash_rihs01(name) for name in installed} == installed


def test_command_line_normalises_topics_and_remaps():
    own, ros = split_ros_args(['replay', 'bag', '--remap', 'a:=b', '--ros-args', '-r', 'x:=y',
                               '--', '--loop'])
    assert own == ['bag', '--remap', 'a:=b', '--loop']
    assert ros == ['replay', '--ros-args', '-r', 'x:=y']
    options = parse_args(['bag', '--topics', 'a', '/b', '--remap', 'a:=c/d', '--rate', '0'])
    assert options.topics == ['/a', '/b'] and options.remap == [('/a', '/c/d')]
    assert options.rate == 0 and options.clock and options.qos == 'sensor_data'
    with pytest.raises(SystemExit):
        parse_args(['bag', '--remap', 'a=b'])


def test_every_message_arrives_as_recorded_with_the_bag_time_on_clock(bag, node):
    listener = Listener(node, TYPES)
    out = listener.play(str(bag), expect={topic: FRAMES for topic in TYPES})
    for topic in TYPES:
        assert [_content(m) for m in listener.received[topic]] == \
            [_content(_message(topic, i)) for i in range(FRAMES)], topic
    assert listener.received[IMAGE][0].encoding == 'rgb8'
    assert listener.clock_ns, 'no /clock message arrived'
    assert all(T0_NS <= t <= T0_NS + (FRAMES - 1) * PERIOD_NS for t in listener.clock_ns)
    assert listener.clock_ns == sorted(listener.clock_ns)
    assert f'replay: {3 * FRAMES} messages on 3 topics' in out


def test_rate_scales_the_playback_time(mcap_bag, node):
    listener = Listener(node, {IMAGE: Image})
    gaps = {}  # the median time between arrivals: one stall of the receiver does not move it
    for rate in (1, 2):
        listener.received[IMAGE].clear()
        listener.arrivals[IMAGE].clear()
        listener.play(str(mcap_bag), '--topics', IMAGE, '--rate', str(rate),
                      expect={IMAGE: FRAMES})
        gaps[rate] = float(np.median(np.diff(listener.arrivals[IMAGE])))
    period = PERIOD_NS / 1e9
    assert 0.7 * period < gaps[1] < 1.5 * period, gaps
    assert 0.3 < gaps[2] / gaps[1] < 0.7, gaps


def test_topics_select_and_remap_renames(mcap_bag, node):
    listener = Listener(node, {'/front/image': Image, TRUTH: Detection2DArray,
                               IMAGE: Image, COMPRESSED: CompressedImage})
    out = listener.play(str(mcap_bag), '--rate', '0', '--topics', IMAGE, TRUTH,
                        '--remap', f'{IMAGE}:=/front/image', '--no-clock',
                        expect={'/front/image': FRAMES, TRUTH: FRAMES})
    assert [_content(m) for m in listener.received['/front/image']] == \
        [_content(_message(IMAGE, i)) for i in range(FRAMES)]
    assert not listener.received[IMAGE] and not listener.received[COMPRESSED]
    assert not listener.clock_ns
    assert f'replay: {2 * FRAMES} messages on 2 topics' in out


def test_loop_repeats_until_terminated(mcap_bag, node):
    listener = Listener(node, {IMAGE: Image})
    command = python_module('speculative_av.tools.replay', str(mcap_bag), '--loop',
                            '--rate', '4', '--topics', IMAGE, '--qos', 'reliable',
                            '--wait-for-subscribers', '1')
    with running(command, stdout=subprocess.PIPE) as replay:
        wait_until(lambda: len(listener.received[IMAGE]) >= 2 * FRAMES, 30,
                   'two passes of the bag', poll=listener.spin)
        replay.send_signal(signal.SIGTERM)
        assert replay.wait(10) == 0
        assert 'stopped' in replay.stdout.read()
    once = [_content(_message(IMAGE, i)) for i in range(FRAMES)]
    assert [_content(m) for m in listener.received[IMAGE][:2 * FRAMES]] == once + once


def test_missing_topic_is_an_error(mcap_bag):
    result = subprocess.run(python_module('speculative_av.tools.replay', str(mcap_bag),
                                          '--topics', '/nope'),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and '/nope not in' in result.stderr


@pytest.mark.parametrize('storage', sorted(STORAGES))
def test_record_the_synthetic_camera_and_replay_the_recording(storage, tmp_path, node):
    path = tmp_path / 'camera'
    record = python_module('speculative_av.tools.record', '/image', '-o', str(path),
                           '--storage', storage, '--count', '20')
    camera = python_module('speculative_av.ros.synthetic_camera', *ros_args(
        count=20, reliable=True, wait_for_subscribers=1, width=WIDTH, height=HEIGHT))
    recorder = subprocess.Popen(record, stdout=subprocess.PIPE, text=True)
    try:
        with running(camera):
            out, _ = recorder.communicate(timeout=60)
    finally:
        stop(recorder)
    assert recorder.returncode == 0 and 'record: 20 messages on 1 topics' in out

    store = typestore()
    with Reader(path) as reader:
        assert list(reader.topics) == ['/image']
        (connection,) = reader.connections
        assert connection.msgtype == 'sensor_msgs/msg/Image'
        assert connection.digest == store.hash_rihs01('sensor_msgs/msg/Image')
        assert 'uint8[] data' in connection.msgdef.data
        assert connection.ext.offered_qos_profiles[0].reliability.name == 'RELIABLE'
        recorded = [store.deserialize_cdr(raw, connection.msgtype)
                    for _, _, raw in reader.messages()]
    assert next(path.glob('*.mcap' if storage == 'mcap' else '*.db3'))
    frames = [render_frame(i, WIDTH, HEIGHT).tobytes() for i in range(20)]
    assert [m.data.tobytes() for m in recorded] == frames

    listener = Listener(node, {'/image': Image})
    listener.play(str(path), expect={'/image': 20})
    assert [bytes(m.data) for m in listener.received['/image']] == frames
    assert [(m.header.stamp.sec, m.header.stamp.nanosec) for m in listener.received['/image']] \
        == [(m.header.stamp.sec, m.header.stamp.nanosec) for m in recorded]


@pytest.mark.parametrize('storage', sorted(STORAGES))
def test_record_closes_the_bag_on_sigint(storage, tmp_path, node):
    path = tmp_path / 'idle'
    command = python_module('speculative_av.tools.record', '/nothing:std_msgs/msg/String',
                            '-o', str(path), '--storage', storage)
    with running(command, stdout=subprocess.PIPE) as recorder:
        wait_until(lambda: node.count_subscribers('/nothing') > 0, 30, 'the recorder')
        assert stop(recorder) == 0
        assert 'record: 0 messages on 1 topics' in recorder.stdout.read()
    with Reader(path) as reader:
        assert reader.topics['/nothing'].msgtype == 'std_msgs/msg/String'
        assert reader.message_count == 0
