"""Test process: subscribe to ``image`` and print one JSON line per received frame."""
import argparse
import hashlib
import json
import sys
import time

import rclpy
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image


def main() -> int:
    """Receive ``--count`` frames (or give up after ``--timeout`` seconds)."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--count', type=int, required=True)
    parser.add_argument('--timeout', type=float, default=60.0)
    parser.add_argument('--qos', choices=['reliable', 'sensor_data'], default='reliable')
    options = parser.parse_args()
    rclpy.init()
    node = rclpy.create_node('image_sink')
    received = 0

    def on_image(msg: Image) -> None:
        nonlocal received
        received += 1
        print(json.dumps({
            'sha256': hashlib.sha256(bytes(msg.data)).hexdigest(),
            'width': msg.width, 'height': msg.height, 'step': msg.step,
            'encoding': msg.encoding, 'frame_id': msg.header.frame_id,
            'latency_ms': (node.get_clock().now().nanoseconds
                           - rclpy.time.Time.from_msg(msg.header.stamp).nanoseconds) / 1e6,
        }), flush=True)

    qos = (QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
           if options.qos == 'reliable' else qos_profile_sensor_data)
    node.create_subscription(Image, 'image', on_image, qos)
    give_up = time.monotonic() + options.timeout
    while received < options.count and time.monotonic() < give_up:
        rclpy.spin_once(node, timeout_sec=0.1)
    node.destroy_node()
    rclpy.shutdown()
    return 0 if received >= options.count else 1


if __name__ == '__main__':
    sys.exit(main())
