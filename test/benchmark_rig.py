"""
What `make benchmark` measures the node with, from outside: topics, /diagnostics and /proc.

The node is a black box here: a subscriber records when each fused result arrives and what
the node reports on /diagnostics; the node's process is read through /proc/<pid>.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import os
import threading
import time
from typing import Iterator

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from fault_rig import decision_stamp_ns
import numpy as np
import rclpy
from ros_harness import frozen_heap
from speculative_av.ros.spinning import background_node
from vision_msgs.msg import Detection2DArray

SCALE = float(os.environ.get('BENCHMARK_SCALE', '1'))
PAGE_BYTES = os.sysconf('SC_PAGE_SIZE')
CLOCK_TICKS = os.sysconf('SC_CLK_TCK')


def scaled(value: float, least: float = 1) -> float:
    """Return ``value`` shortened by BENCHMARK_SCALE (development runs), at least ``least``."""
    return max(least, value * SCALE)


@dataclass(frozen=True)
class Arrival:
    """One fused result as the receiver saw it: the frame's stamp and the receive time (ns)."""

    stamp_ns: int
    received_ns: int


@dataclass
class Receiver:
    """
    A planning node's view: fused results, decisions and /diagnostics, with receive times.

    It keeps stamps and counters only (no images), so a 10-minute run at 1080p stays small.
    """

    node: rclpy.node.Node
    fused: list[Arrival] = field(default_factory=list)
    winners: dict[int, str] = field(default_factory=dict)  # by stamp (ns)
    diagnostics: list[dict[str, dict[str, str]]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        """Subscribe to the fused topic, the decisions and /diagnostics."""
        self.node.create_subscription(Detection2DArray, 'detections', self._on_fused, 100)
        self.node.create_subscription(DiagnosticStatus, 'speculation/decisions',
                                      self._on_decision, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)

    def _on_fused(self, msg: Detection2DArray) -> None:
        received = self.node.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self._changed:
            self.fused.append(Arrival(stamp, received))
            self._changed.notify_all()

    def _on_decision(self, msg: DiagnosticStatus) -> None:
        values = {kv.key: kv.value for kv in msg.values}
        with self._changed:
            self.winners[decision_stamp_ns(values)] = values['winner']

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        entry = {s.name.split(': ')[-1]: {kv.key: kv.value for kv in s.values}
                 for s in msg.status}
        with self._changed:
            self.diagnostics.append(entry)
            self._changed.notify_all()

    def wait(self, condition: object, timeout: float, what: str) -> None:
        """Wait (woken by each message, no polling) until ``condition()`` holds, or raise."""
        assert callable(condition)
        with self._changed:
            if not self._changed.wait_for(condition, timeout):
                raise TimeoutError(f'timed out after {timeout:.0f} s waiting for {what}')

    def wait_quietly(self, condition: object, timeout: float) -> bool:
        """Wait like :meth:`wait`, but return whether ``condition()`` came true in time."""
        try:
            self.wait(condition, timeout, '')
        except TimeoutError:
            return False
        return True

    def summary(self) -> dict[str, str]:
        """Return the node's newest counters (the 'speculation' status), {} before any."""
        with self._changed:
            return next((d['speculation'] for d in reversed(self.diagnostics)
                         if 'speculation' in d), {})

    def fresh_summary(self) -> dict[str, str]:
        """Return counters published after this call (so they include what happened before)."""
        with self._changed:
            seen = len(self.diagnostics)
        self.wait(lambda: len(self.diagnostics) > seen + 1 and self.summary(), 10,
                  'fresh diagnostics')
        return self.summary()

    def health(self, source: str) -> str:
        """Return ``source``'s newest health on /diagnostics ('' before it appears)."""
        with self._changed:
            return next((d[source]['health'] for d in reversed(self.diagnostics)
                         if source in d), '')

    def wait_for_health(self, source: str, serving: bool, timeout: float = 60) -> None:
        """Wait until /diagnostics reports ``source`` SERVING (or, with ``serving`` False, not)."""
        self.wait(lambda: any(source in d for d in self.diagnostics[-1:])
                  and (self.diagnostics[-1][source]['health'] == 'SERVING') == serving,
                  timeout, f'{source} {"" if serving else "not "}SERVING')

    def winner(self, arrival: Arrival) -> str:
        """Return the winner the node's decision names for ``arrival``'s frame."""
        with self._changed:
            return self.winners.get(arrival.stamp_ns, 'unknown')

    def arrivals_since(self, stamp_ns: int) -> list[Arrival]:
        """Return the fused results of frames stamped at or after ``stamp_ns``."""
        with self._changed:
            return [a for a in self.fused if a.stamp_ns >= stamp_ns]

    def wait_for_frames(self, stamp_ns: int, count: int, timeout: float) -> list[Arrival]:
        """Wait for ``count`` fused results of frames stamped from ``stamp_ns``; return them."""
        self.wait(lambda: sum(a.stamp_ns >= stamp_ns for a in self.fused[-count - 200:])
                  >= count, timeout, f'{count} fused results')
        return self.arrivals_since(stamp_ns)[:count]


@contextlib.contextmanager
def receiver(name: str = 'benchmark_receiver') -> Iterator[Receiver]:
    """Spin a :class:`Receiver` in a background thread for the block's duration."""
    with frozen_heap(), background_node(name) as node:
        yield Receiver(node)


def now_ns(node: rclpy.node.Node) -> int:
    """Return ``node``'s ROS time (the clock the camera stamps frames with)."""
    return node.get_clock().now().nanoseconds


def lateness_ms(arrivals: list[Arrival], deadline_ms: float) -> np.ndarray:
    """Return each result's receive time minus its frame's deadline (stamp + deadline_ms)."""
    return np.array([(a.received_ns - a.stamp_ns) / 1e6 - deadline_ms for a in arrivals])


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time process ``pid`` has used so far."""
    with open(f'/proc/{pid}/stat') as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Return the resident set size of process ``pid`` in MB."""
    with open(f'/proc/{pid}/statm') as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES / 1e6


@dataclass
class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread: (monotonic s, MB) pairs."""

    pid: int
    interval_s: float = 1.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        """Sample until stopped or until the process is gone."""
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_mb(self.pid)))
            except FileNotFoundError:
                return
            self._stop.wait(self.interval_s)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[RssSampler]:
        """Sample for the duration of the block."""
        thread = threading.Thread(target=self.run, name='rss-sampler', daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def report(self, since: float = 0.0) -> dict[str, float]:
        """Return start, end, max (MB) and the least-squares growth in MB per minute."""
        kept = [(t, v) for t, v in self.samples if t >= since]
        times = np.array([t for t, _ in kept])
        values = np.array([v for _, v in kept])
        slope = np.polyfit(times - times[0], values, 1)[0] if len(values) > 1 else 0.0
        return {'start_mb': round(values[0], 1), 'end_mb': round(values[-1], 1),
                'max_mb': round(values.max(), 1), 'growth_mb_per_min': round(60 * slope, 2),
                'duration_s': round(times[-1] - times[0], 1), 'samples': len(values)}
