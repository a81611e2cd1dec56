"""
Play a rosbag2 recording (mcap or sqlite3) into ROS 2 topics, like ``ros2 bag play``.

Messages go out as the recorded CDR bytes, so header stamps and payloads are exactly as
recorded. Message ``i`` is published at the wall time of the start plus ``(t_i - t_0) / rate``,
``t`` being the recorded log time; ``/clock`` carries that bag time, ticking at ``--clock-hz``
between messages, so nodes can run with ``use_sim_time``. With ``--loop`` each pass starts over
at ``t_0`` (the clock jumps back, as with ``ros2 bag play --loop``).

    replay BAG [--rate R] [--loop] [--topics T ...] [--remap OLD:=NEW] [--no-clock]
           [--clock-hz HZ] [--qos sensor_data|reliable] [--wait-for-subscribers N]
           [--ros-args ...]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import math
from pathlib import Path
import signal
import sys
import threading
import time
from typing import Iterable, Sequence

import rclpy
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.qos import (DurabilityPolicy, qos_profile_sensor_data, QoSProfile,
                       ReliabilityPolicy)
from rclpy.signals import SignalHandlerOptions
from rosbags.interfaces import (Connection, ConnectionExtRosbag2, QosDurability,
                                QosReliability)
from rosbags.rosbag2 import Reader, ReaderError
from rosgraph_msgs.msg import Clock
from speculative_av.tools.bag_types import IMAGE_TYPES, message_class, typestore
from tqdm import tqdm

# How long the end of playback waits for reliable subscribers to acknowledge the last messages.
_ACK_TIMEOUT_S = 5.0


def _absolute(topic: str) -> str:
    return topic if topic.startswith('/') else f'/{topic}'


def _remap(text: str) -> tuple[str, str]:
    old, separator, new = text.partition(':=')
    if not (separator and old and new):
        raise argparse.ArgumentTypeError(f'expected OLD:=NEW, got {text!r}')
    return _absolute(old), _absolute(new)


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
    return value


def split_ros_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """
    Split ``argv`` into this tool's arguments and the program name plus ``--ros-args`` blocks.

    rclpy's ``remove_ros_args`` would take ``OLD:=NEW`` of ``--remap`` for a (deprecated) ROS
    remapping rule outside ``--ros-args``.
    """
    own: list[str] = []
    ros = list(argv[:1])
    in_ros = False
    for arg in argv[1:]:
        if arg == '--ros-args':
            in_ros = True
            ros.append(arg)
        elif in_ros and arg == '--':
            in_ros = False
        else:
            (ros if in_ros else own).append(arg)
    return own, ros


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line (without ROS arguments)."""
    parser = argparse.ArgumentParser(
        prog='replay', description='Play a rosbag2 recording into ROS 2 topics.')
    parser.add_argument('bag', type=Path, help='bag directory, or one .mcap / .db3 file')
    parser.add_argument('--rate', type=_non_negative, default=1.0,
                        help='playback speed: 1 = real time, 0 = as fast as possible')
    parser.add_argument('--loop', action='store_true', help='start over at the end, until stopped')
    parser.add_argument('--topics', nargs='+', type=_absolute, metavar='TOPIC',
                        help='play only these bag topics (default: all)')
    parser.add_argument('--remap', action='append', type=_remap, default=[], metavar='OLD:=NEW',
                        help='publish bag topic OLD on NEW (repeatable)')
    parser.add_argument('--clock', action=argparse.BooleanOptionalAction, default=True,
                        help='publish the bag time on /clock, for nodes with use_sim_time')
    parser.add_argument('--clock-hz', type=_positive, default=100.0,
                        help='/clock messages per wall-clock second (default 100)')
    parser.add_argument('--qos', choices=('sensor_data', 'reliable'), default='sensor_data',
                        help='QoS of image topics: sensor_data (best effort, like camera '
                             'drivers; default) or reliable (depth 10)')
    parser.add_argument('--wait-for-subscribers', type=int, default=0, metavar='N',
                        help='hold playback until the first image topic (the first topic if '
                             'none is an image) has N matched subscriptions')
    return parser.parse_args(argv)


def topic_qos(msgtype: str, connections: Iterable[Connection], image_qos: str) -> QoSProfile:
    """
    Return the publisher QoS of a bag topic.

    Image topics get ``image_qos``; other topics are reliable unless recorded as best effort
    only, and transient local (keeping the recorded depth) when recorded so, e.g. label maps.
    """
    if msgtype in IMAGE_TYPES:
        if image_qos == 'sensor_data':
            return qos_profile_sensor_data
        return QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    offered = [qos for connection in connections
               if isinstance(connection.ext, ConnectionExtRosbag2)
               for qos in connection.ext.offered_qos_profiles]
    best_effort = bool(offered) and all(
        qos.reliability == QosReliability.BEST_EFFORT for qos in offered)
    latched = bool(offered) and all(
        qos.durability == QosDurability.TRANSIENT_LOCAL for qos in offered)
    return QoSProfile(
        depth=max([10, *(qos.depth for qos in offered)]),
        reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


@dataclass
class Topic:
    """A bag topic to play: where it goes and the publisher that sends it."""

    name: str
    msgtype: str
    connections: list[Connection]
    publisher: Publisher


def _unplayable(msgtype: str | None, connections: list[Connection]) -> str | None:
    """Return why a bag topic cannot be played, or None when it can."""
    if msgtype is None:
        return 'it holds more than one message type'
    store = typestore()
    if msgtype in store.fielddefs:
        expected = store.hash_rihs01(msgtype)
        if any(c.digest and c.digest != expected for c in connections):
            return f'it was recorded with another definition of {msgtype}'
    try:
        message_class(msgtype)
    except (ImportError, AttributeError):
        return f'{msgtype} is not installed'
    return None


def create_topics(node: Node, reader: Reader, options: argparse.Namespace) -> list[Topic]:
    """Create a publisher for every selected, playable topic of the bag."""
    remaps = dict(options.remap)
    topics = []
    for bag_name, info in reader.topics.items():
        if options.topics and bag_name not in options.topics:
            continue
        reason = _unplayable(info.msgtype, info.connections)
        if reason:
            node.get_logger().warning(f'not playing {bag_name}: {reason}')
            continue
        assert info.msgtype is not None
        name = remaps.get(bag_name, bag_name)
        qos = topic_qos(info.msgtype, info.connections, options.qos)
        topics.append(Topic(name, info.msgtype, info.connections,
                            node.create_publisher(message_class(info.msgtype), name, qos)))
    return topics


class SimClock:
    """Publishes the bag time on ``/clock``, at most ``hz`` times per wall-clock second."""

    def __init__(self, node: Node, hz: float) -> None:
        """Create the ``/clock`` publisher (best effort, depth 1, as ``ros2 bag play``)."""
        self._publisher = node.create_publisher(
            Clock, '/clock', QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        self._period = 1.0 / hz
        self.next_due = -math.inf  # monotonic time of the next tick

    def advance(self, bag_time_ns: int) -> None:
        """Publish ``bag_time_ns`` if a tick is due."""
        now = time.monotonic()
        if now < self.next_due:
            return
        self.next_due = now + self._period
        message = Clock()
        message.clock.sec, message.clock.nanosec = divmod(bag_time_ns, 1_000_000_000)
        self._publisher.publish(message)


class Player:
    """Publishes bag messages at their recorded pace, scaled by ``rate``, until stopped."""

    def __init__(self, topics: list[Topic], clock: SimClock | None, rate: float,
                 stop: threading.Event, progress: tqdm) -> None:
        """Play ``topics``; ``stop`` being set ends playback at the next message or tick."""
        self._publishers = {c.id: t.publisher for t in topics for c in t.connections}
        self._clock = clock
        self._rate = rate
        self._stop = stop
        self._progress = progress
        self.published = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def play(self, messages: Iterable[tuple[Connection, int, bytes]]) -> bool:
        """Play one pass of ``messages``; return False if stopped before the end."""
        start_wall = time.monotonic()
        start_ns: int | None = None
        for connection, bag_time_ns, data in messages:
            if start_ns is None:
                start_ns = bag_time_ns
            if self._rate and not self._wait_until(
                    start_wall + (bag_time_ns - start_ns) / 1e9 / self._rate,
                    start_wall, start_ns):
                return False
            if self._stop.is_set():
                return False
            if self._clock is not None:
                self._clock.advance(bag_time_ns)
            self._publishers[connection.id].publish(
                data if isinstance(data, bytes) else bytes(data))
            self._count(bag_time_ns)
        return True

    def _wait_until(self, due: float, start_wall: float, start_ns: int) -> bool:
        """Sleep until the monotonic time ``due``, ticking the clock; False if stopped."""
        while (now := time.monotonic()) < due:
            wake = due
            if self._clock is not None:
                self._clock.advance(start_ns + int((now - start_wall) * self._rate * 1e9))
                wake = min(due, self._clock.next_due)
            if self._stop.wait(max(0.0, wake - now)):
                return False
        return True

    def _count(self, bag_time_ns: int) -> None:
        self.published += 1
        self.first_ns = min(bag_time_ns, self.first_ns or bag_time_ns)
        self.last_ns = max(bag_time_ns, self.last_ns or bag_time_ns)
        self._progress.update()
        self._progress.set_postfix_str(f'bag time {bag_time_ns / 1e9:.3f} s', refresh=False)


def wait_for_subscribers(topics: list[Topic], count: int, stop: threading.Event,
                         node: Node) -> bool:
    """Hold until the first image topic has ``count`` matched subscriptions; False if stopped."""
    target = next((t for t in topics if t.msgtype in IMAGE_TYPES), topics[0])
    if target.publisher.get_subscription_count() < count:
        node.get_logger().info(f'waiting for {count} subscriber(s) on {target.name}')
    while target.publisher.get_subscription_count() < count:
        if stop.wait(0.01):
            return False
    return True


def _wait_for_acknowledgements(topics: list[Topic], stop: threading.Event) -> None:
    """Give reliable subscribers up to ``_ACK_TIMEOUT_S`` to acknowledge what was published."""
    deadline = time.monotonic() + _ACK_TIMEOUT_S
    pending = [topic.publisher for topic in topics]
    while pending and not stop.is_set() and time.monotonic() < deadline:
        pending = [p for p in pending if not p.wait_for_all_acked(Duration(seconds=0.05))]


def _stop_on_signals() -> threading.Event:
    """Return an event that SIGINT and SIGTERM set."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _summary(player: Player, topics: list[Topic], elapsed: float, stopped: bool) -> str:
    text = (f'replay: {player.published} messages on {len(topics)} topics in {elapsed:.2f} s '
            f'({player.published / max(elapsed, 1e-9):.1f} msg/s)')
    if player.first_ns is not None and player.last_ns is not None:
        text += f', bag time {player.first_ns / 1e9:.3f} .. {player.last_ns / 1e9:.3f} s'
    return text + (', stopped' if stopped else '')


def _play(node: Node, reader: Reader, topics: list[Topic], options: argparse.Namespace,
          stop: threading.Event) -> int:
    if options.wait_for_subscribers and not wait_for_subscribers(
            topics, options.wait_for_subscribers, stop, node):
        return 0
    connections = [c for t in topics for c in t.connections]
    per_pass = sum(c.msgcount for c in connections)
    clock = SimClock(node, options.clock_hz) if options.clock else None
    start = time.monotonic()
    with tqdm(total=None if options.loop else per_pass, unit='msg', file=sys.stderr,
              disable=None, dynamic_ncols=True) as progress:
        player = Player(topics, clock, options.rate, stop, progress)
        while player.play(reader.messages(connections)) and options.loop and per_pass:
            pass
    _wait_for_acknowledgements(topics, stop)
    print(_summary(player, topics, time.monotonic() - start, stop.is_set()), flush=True)
    return 0


def main(args: list[str] | None = None) -> int:
    """Play the bag; exit 0 at its end (or when stopped with SIGINT/SIGTERM)."""
    own, ros = split_ros_args(args if args is not None else sys.argv)
    options = parse_args(own)
    try:
        reader = Reader(options.bag)
    except (FileNotFoundError, ReaderError) as error:
        print(f'replay: {error}', file=sys.stderr)
        return 2
    with reader:
        missing = set(options.topics or ()) - set(reader.topics)
        if missing:
            print(f'replay: {", ".join(sorted(missing))} not in {options.bag} '
                  f'(it has {", ".join(sorted(reader.topics))})', file=sys.stderr)
            return 2
        rclpy.init(args=ros, signal_handler_options=SignalHandlerOptions.NO)
        stop = _stop_on_signals()
        node = rclpy.create_node('replay')
        try:
            topics = create_topics(node, reader, options)
            if not topics:
                node.get_logger().error('nothing to play')
                return 1
            return _play(node, reader, topics, options, stop)
        finally:
            node.destroy_node()
            rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
