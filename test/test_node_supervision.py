"""
The node's threads under faults, in one process: frames that break, threads that die, clocks.

The node, a camera publisher and an observer share one executor here, so a test can break the
node's parts (the detector, the frame slots) directly and watch what reaches its topics.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import State
import numpy as np
import pytest
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from ros_harness import wait_until
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import Image
from speculative_av.ros.detector_node import SpeculativeDetector
from speculative_av.ros.image_conversion import rgb_to_image_msg
from std_msgs.msg import Header
from vision_msgs.msg import Detection2DArray

FRAME = np.full((120, 160, 3), 90, np.uint8)


class Rig:
    """A configured, active node fed by :meth:`send`, observed on its topics."""

    def __init__(self, node: SpeculativeDetector, peer: rclpy.node.Node) -> None:
        self.node = node
        self.fused: list[Detection2DArray] = []
        self.summaries: list[DiagnosticStatus] = []
        self._images = peer.create_publisher(Image, 'image', 10)
        self._clock = peer.create_publisher(ClockMsg, '/clock', 10)
        peer.create_subscription(Detection2DArray, 'detections', self.fused.append, 100)
        peer.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        self.summaries += [s for s in msg.status if s.name.endswith('speculation')]

    def send(self, stamp_s: float, frame_id: str = 'cam') -> None:
        """Publish one frame stamped ``stamp_s`` and wait for its fused result."""
        before = len(self.fused)
        sec = int(stamp_s)
        self._images.publish(rgb_to_image_msg(FRAME, Header(
            stamp=TimeMsg(sec=sec, nanosec=round((stamp_s - sec) * 1e9)), frame_id=frame_id)))
        wait_until(lambda: len(self.fused) > before, 30.0, f'the fused result of {stamp_s} s')

    def set_clock(self, seconds: float) -> None:
        """Publish /clock (for use_sim_time) and wait until the node's clock shows it."""
        self._clock.publish(ClockMsg(clock=TimeMsg(sec=int(seconds))))
        wait_until(lambda: abs(self.node.get_clock().now().nanoseconds / 1e9 - seconds) < 1.0,
                   10.0, f'the node clock at {seconds} s')

    def counter(self, name: str) -> int:
        """Return a counter of the newest /diagnostics summary published from now on."""
        seen = len(self.summaries)
        wait_until(lambda: len(self.summaries) > seen, 10.0, 'fresh diagnostics')
        return int({kv.key: kv.value for kv in self.summaries[-1].values}[name])


@contextlib.contextmanager
def rig(**parameters: object) -> Iterator[Rig]:
    """Run an active node (random ssdlite, no cloud unless asked) with a peer in one executor."""
    rclpy.init()
    overrides = {'local.weights': 'random', 'local.threads': 1, 'cloud.enabled': False,
                 'deadline_reference': 'arrival', 'deadline_ms': 2000.0, **parameters}
    node = SpeculativeDetector(parameter_overrides=[
        Parameter(name, value=value) for name, value in overrides.items()])
    node.trigger_configure()
    node.trigger_activate()
    peer = rclpy.create_node('supervision_peer')
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    executor.add_node(peer)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        test_rig = Rig(node, peer)
        wait_until(lambda: peer.count_subscribers('image') > 0, 30.0, 'the node subscribed')
        yield test_rig
    finally:
        node.close()
        executor.shutdown()
        spinner.join(10)
        node.destroy_node()
        peer.destroy_node()
        rclpy.try_shutdown()


def test_a_frame_whose_processing_raises_still_gets_one_result_and_the_node_goes_on():
    with rig() as test_rig:
        detector = test_rig.node._detector
        assert detector is not None
        real_detect = detector.detect
        calls = {'n': 0}

        def flaky(rgb: np.ndarray) -> object:
            calls['n'] += 1
            if calls['n'] == 2:
                raise RuntimeError('CUDA error: an illegal memory access was encountered')
            return real_detect(rgb)

        detector.detect = flaky  # type: ignore[method-assign]
        for stamp in (1.0, 2.0, 3.0):
            test_rig.send(stamp)
        assert len(test_rig.fused) == 3
        stamps = [m.header.stamp.sec for m in test_rig.fused]
        assert stamps == [1, 2, 3]
        assert test_rig.counter('frame_errors') == 1
        assert test_rig.counter('frames_processed') == 3
        assert test_rig.summaries[-1].level == DiagnosticStatus.WARN


def test_a_thread_that_dies_reports_error_and_ends_the_node_in_finalized():
    with rig() as test_rig:
        test_rig.send(1.0)

        def broken(timeout: float | None = None) -> None:
            raise MemoryError('std::bad_alloc')

        engine = test_rig.node.engine
        assert engine is not None
        engine.slots.take_all = broken  # type: ignore[method-assign,assignment]
        engine.slots.put('', None)  # type: ignore[arg-type]  (wakes the worker)
        wait_until(lambda: bool(test_rig.node.failed), 10.0, 'the worker to die')
        wait_until(lambda: any(s.level == DiagnosticStatus.ERROR for s in test_rig.summaries),
                   10.0, 'ERROR on /diagnostics')
        assert 'detector thread died' in test_rig.node.failed
        wait_until(lambda: test_rig.node._state_machine.current_state[0]
                   == State.PRIMARY_STATE_FINALIZED, 10.0, 'Finalized')


def test_stamps_stepping_back_restart_the_camera_instead_of_blinding_it():
    with rig(stamp_backstep_tolerance_ms=500.0) as test_rig:
        for stamp in (100.0, 100.5, 101.0):
            test_rig.send(stamp)
        for stamp in (5.0, 5.5):  # a replay looped back to its start
            test_rig.send(stamp)
        assert [m.header.stamp.sec for m in test_rig.fused] == [100, 100, 101, 5, 5]
        assert test_rig.counter('clock_resets') == 1
        assert test_rig.counter('stale_frames') == 0


def test_ros_time_jumping_back_under_sim_time_restarts_ordering():
    with rig(use_sim_time=True, deadline_reference='stamp') as test_rig:
        test_rig.set_clock(100)
        test_rig.send(100.0)
        test_rig.set_clock(3)  # the replay looped: /clock steps back before any new frame
        assert test_rig.counter('clock_resets') == 1
        test_rig.send(3.0)
        assert [m.header.stamp.sec for m in test_rig.fused] == [100, 3]
        assert test_rig.counter('clock_resets') == 1  # ordering had restarted already
        assert test_rig.counter('stale_frames') == 0


@pytest.mark.parametrize('name, value', [
    ('image_transport', 'theora'), ('cameras', ['front', 'front']), ('cameras', ['front cam']),
    ('cloud.endpoints', ['localhost']), ('local.weights', '/does/not/exist.pt')])
def test_configure_refuses_bad_settings_with_failure_not_a_crash(name, value):
    rclpy.init()
    try:
        node = SpeculativeDetector(parameter_overrides=[
            Parameter('local.weights', value='random'), Parameter(name, value=value)])
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
