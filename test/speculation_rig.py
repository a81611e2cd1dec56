"""
A test rig of real processes: cloud server, speculative_detector node, synthetic camera.

The pytest process is the observer: it subscribes to the node's outputs like a planning node
would and records when each message arrived.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import socket
import subprocess
from typing import Iterator

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import rclpy
from ros_harness import frozen_heap, python_module, ros_args, running, stop, wait_until
from sensor_msgs.msg import Image
from speculative_av.ros.spinning import background_node
from vision_msgs.msg import Detection2DArray

MODEL = 'ssdlite320_mobilenet_v3_large'  # ~31 ms per 640x480 frame on this machine's CPU


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def cloud_server(port: int, extra_latency_ms: float = 0,
                 security: tuple[str, ...] = ('--insecure',),
                 extra_args: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[str]]:
    """
    Run the cloud server on ``port`` until the block ends; wait until it listens.

    ``security`` are its security options: plaintext on loopback unless a test passes TLS ones.
    ``extra_args`` are further server options.
    """
    command = python_module(
        'speculative_av.cloud.server', '--host', '127.0.0.1', '--port', str(port),
        '--model', MODEL, '--weights', 'random', '--threads', '1',
        '--extra-latency-ms', str(extra_latency_ms), *security, *extra_args)
    with running(command, stdout=subprocess.PIPE) as server:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert 'listening on' in line, f'cloud server did not start: {line!r}'
        yield server


def detector_command(**parameters: object) -> list[str]:
    """Return the node's command line with test defaults (random weights, 1 thread, plaintext)."""
    defaults: dict[str, object] = {'local.model': MODEL, 'local.weights': 'random',
                                   'local.threads': 1, 'local.score_threshold': 0.05,
                                   'cloud.insecure': True}
    return python_module('speculative_av.ros.detector_node',
                         *ros_args(**{**defaults, **parameters}))


def camera_command(rate_hz: float = 10.0, frame_id: str = 'cam_front', namespace: str = '',
                   wait_for_subscribers: int = 2, **parameters: object) -> list[str]:
    """
    Return a synthetic 640x480 camera that starts once detector and observer subscribed.

    It publishes reliably so the observer sees every input header; the detector's best-effort
    subscription is compatible with that and sees the same stream.
    """
    command = python_module('speculative_av.ros.synthetic_camera', *ros_args(
        rate_hz=rate_hz, frame_id=frame_id, wait_for_subscribers=wait_for_subscribers,
        reliable=True, **parameters))
    return command + (['-r', f'__ns:=/{namespace}'] if namespace else [])


@dataclass
class Observer:
    """Records the node's outputs (message, ROS receive time in ns) from a spinning thread."""

    node: rclpy.node.Node
    images: list[tuple[Image, int]] = field(default_factory=list)
    fused: list[tuple[Detection2DArray, int]] = field(default_factory=list)
    local: list[tuple[Detection2DArray, int]] = field(default_factory=list)
    cloud: list[tuple[Detection2DArray, int]] = field(default_factory=list)
    decisions: list[tuple[dict[str, str], int]] = field(default_factory=list)
    diagnostics: list[dict[str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Subscribe to everything; the image subscription makes the camera start."""
        def keep(store: list, msg: object) -> None:
            store.append((msg, self.node.get_clock().now().nanoseconds))

        self.node.create_subscription(Image, 'image', lambda m: keep(self.images, m), 100)
        self.node.create_subscription(Detection2DArray, 'detections',
                                      lambda m: keep(self.fused, m), 100)
        self.node.create_subscription(Detection2DArray, 'detections/local',
                                      lambda m: keep(self.local, m), 100)
        self.node.create_subscription(Detection2DArray, 'detections/cloud',
                                      lambda m: keep(self.cloud, m), 100)
        self.node.create_subscription(DiagnosticStatus, 'speculation/decisions',
                                      self._on_decision, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)

    def _on_decision(self, msg: DiagnosticStatus) -> None:
        values = {kv.key: kv.value for kv in msg.values}
        values['hardware_id'] = msg.hardware_id
        self.decisions.append((values, self.node.get_clock().now().nanoseconds))

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        self.diagnostics.append(
            {s.name.split(': ')[-1]: {kv.key: kv.value for kv in s.values} for s in msg.status})

    def outcomes(self) -> list[str]:
        """Return one line per decided frame with every source's outcome, for failure output."""
        shown = ('winner', 'source', 'cloud_lat', 'local_lat')
        return [' '.join(f'{k}={v}' for k, v in d.items() if k.startswith(shown))
                for d, _ in self.decisions]

    def winners(self, since: int = 0) -> list[str]:
        """Return the fused winner kind of each decided frame after index ``since``."""
        return [d['winner'] for d, _ in self.decisions[since:]]

    def wait_for_decisions(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` frames have been decided in total."""
        wait_until(lambda: len(self.decisions) >= count, timeout, f'{count} decisions')


@contextlib.contextmanager
def observer(name: str = 'planning_observer') -> Iterator[Observer]:
    """Spin an :class:`Observer` node in a background thread for the block's duration."""
    with frozen_heap(), background_node(name) as node:
        yield Observer(node)


@contextlib.contextmanager
def detector(**parameters: object) -> Iterator[subprocess.Popen[str]]:
    """Run the node; on exit make sure it stopped cleanly (exit code 0)."""
    process = subprocess.Popen(detector_command(**parameters), text=True)
    try:
        yield process
        assert process.poll() is None, f'detector exited early with {process.returncode}'
    finally:
        code = stop(process, timeout=20)
    assert code == 0, f'detector exited with {code}'
