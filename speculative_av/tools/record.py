"""
Record ROS 2 topics into a rosbag2 bag (mcap or sqlite3), like ``ros2 bag record``.

Messages are written as received, in CDR (raw subscriptions), stamped with their receive time
on the node's clock (``use_sim_time`` applies). A topic's type comes from the ROS graph (its
first publisher) unless given as ``topic:type``; the bag carries the message definition and type
hash from :mod:`speculative_av.tools.bag_types` (only the graph's hash for types it lacks). The
subscription matches the publishers' QoS: reliable if every publisher is reliable, best effort
otherwise (so camera drivers with sensor-data QoS are recorded as they publish), transient local
if every publisher is.

    record TOPIC[:TYPE] ... [-o BAG] [--storage mcap|sqlite3] [--duration-s S] [--count N]
           [--ros-args ...]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
import sys
import time
from typing import Sequence

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.subscription import Subscription
from rclpy.utilities import remove_ros_args
from rosbags.interfaces import (Connection, Qos, QosDurability, QosHistory, QosLiveliness,
                                QosReliability, QosTime)
from rosbags.rosbag2 import StoragePlugin, Writer
from speculative_av.tools.bag_types import message_class, typestore

_STORAGE = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
_UNSET = QosTime(0, 0)  # rosbag2's "default" for deadline, lifespan and lease duration


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line (without ROS arguments)."""
    parser = argparse.ArgumentParser(
        prog='record', description='Record ROS 2 topics into a rosbag2 bag.')
    parser.add_argument('topics', nargs='+', metavar='TOPIC[:TYPE]',
                        help='topics to record; TYPE (e.g. sensor_msgs/msg/Image) defaults to '
                             'the type the ROS graph shows')
    parser.add_argument('-o', '--output', type=Path,
                        default=Path(datetime.now().strftime('rosbag2_%Y_%m_%d-%H_%M_%S')),
                        help='bag directory to create (default: rosbag2_<date>-<time>)')
    parser.add_argument('--storage', choices=sorted(_STORAGE), default='mcap',
                        help='storage format (default: mcap)')
    parser.add_argument('--duration-s', type=float, default=0.0,
                        help='stop after this many seconds (default 0: no limit)')
    parser.add_argument('--count', type=int, default=0,
                        help='stop after this many messages in all (default 0: no limit)')
    return parser.parse_args(argv)


def subscription_qos(offered: Sequence[QoSProfile]) -> QoSProfile:
    """Return a subscription QoS compatible with every profile in ``offered`` (depth 100)."""
    reliable = bool(offered) and all(
        p.reliability == ReliabilityPolicy.RELIABLE for p in offered)
    latched = bool(offered) and all(
        p.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in offered)
    return QoSProfile(
        depth=100,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def bag_qos(profile: QoSProfile) -> Qos:
    """Return ``profile`` as the offered QoS a rosbag2 connection records (policies, depth)."""
    # rclpy's policy enums and rosbags' share rmw's numbering.
    return Qos(QosHistory(int(profile.history)), profile.depth,
               QosReliability(int(profile.reliability)), QosDurability(int(profile.durability)),
               _UNSET, _UNSET, QosLiveliness(int(profile.liveliness)), _UNSET, False)


@dataclass
class RecordedTopic:
    """A topic to record: its type once known, then its bag connection and subscription."""

    name: str
    msgtype: str | None
    connection: Connection | None = None
    subscription: Subscription | None = None


class Recorder:
    """Subscribes to topics as their types become known and writes what arrives."""

    def __init__(self, node: Node, writer: Writer, topics: Sequence[str], count: int) -> None:
        """Record ``topics`` (``name`` or ``name:type``) until ``count`` messages (0: forever)."""
        self._node = node
        self._writer = writer
        self._count = count
        self.written = 0
        self.topics = []
        for spec in topics:
            name, _, msgtype = spec.partition(':')
            self.topics.append(RecordedTopic(node.resolve_topic_name(name), msgtype or None))

    @property
    def done(self) -> bool:
        """Whether ``count`` messages have been written."""
        return bool(self._count) and self.written >= self._count

    def subscribe_discovered(self) -> None:
        """Subscribe to every topic not yet subscribed whose type (and hash) is now known."""
        for topic in self.topics:
            if topic.subscription is None:
                self._subscribe(topic)

    def _subscribe(self, topic: RecordedTopic) -> None:
        publishers = self._node.get_publishers_info_by_topic(topic.name)
        msgtype = topic.msgtype or (publishers[0].topic_type if publishers else None)
        if msgtype is None:
            return
        offered = [p.qos_profile for p in publishers if p.topic_type == msgtype]
        qos_profiles = [bag_qos(p) for p in offered]
        store = typestore()
        if msgtype in store.fielddefs:
            connection = self._writer.add_connection(
                topic.name, msgtype, typestore=store, offered_qos_profiles=qos_profiles)
        elif offered:
            self._node.get_logger().warning(
                f'{msgtype} is not in the typestore: {topic.name} is recorded without its '
                'message definition')
            connection = self._writer.add_connection(
                topic.name, msgtype, msgdef='', offered_qos_profiles=qos_profiles,
                rihs01=str(next(p.topic_type_hash for p in publishers
                                if p.topic_type == msgtype)))
        else:
            return  # the type hash of an unknown type comes from a publisher
        topic.msgtype, topic.connection = msgtype, connection
        topic.subscription = self._node.create_subscription(
            message_class(msgtype), topic.name, lambda data: self._write(connection, data),
            subscription_qos(offered), raw=True)
        self._node.get_logger().info(f'recording {topic.name} ({msgtype})')

    def _write(self, connection: Connection, data: bytes) -> None:
        if self.done:
            return
        self._writer.write(connection, self._node.get_clock().now().nanoseconds, data)
        self.written += 1


def main(args: list[str] | None = None) -> int:
    """Record until ``--count`` / ``--duration-s`` is reached or the process is interrupted."""
    argv = args if args is not None else sys.argv
    options = parse_args(remove_ros_args(argv)[1:])
    if options.output.exists():
        print(f'record: {options.output} exists already', file=sys.stderr)
        return 2
    rclpy.init(args=argv)
    node = rclpy.create_node('record')
    writer = Writer(options.output, version=Writer.VERSION_LATEST,
                    storage_plugin=_STORAGE[options.storage])
    writer.open()
    recorder = Recorder(node, writer, options.topics, options.count)
    start = time.monotonic()
    end = start + options.duration_s if options.duration_s > 0 else float('inf')
    try:
        while rclpy.ok() and not recorder.done and time.monotonic() < end:
            recorder.subscribe_discovered()
            rclpy.spin_once(node, timeout_sec=min(0.05, max(0.0, end - time.monotonic())))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        writer.close()
        node.destroy_node()
        rclpy.try_shutdown()
    recorded = sum(1 for t in recorder.topics if t.connection is not None)
    print(f'record: {recorder.written} messages on {recorded} topics in '
          f'{time.monotonic() - start:.2f} s to {options.output}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
