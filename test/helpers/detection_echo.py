"""Test process: receive one vision_msgs/Detection2DArray on ``detections``, print it as JSON."""
import json
import sys
import time

import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from vision_msgs.msg import Detection2DArray


def main() -> int:
    """Print the first message received within 30 s; exit 1 if none came."""
    rclpy.init()
    node = rclpy.create_node('detection_echo')
    received: list[Detection2DArray] = []
    node.create_subscription(
        Detection2DArray, 'detections', received.append,
        QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    give_up = time.monotonic() + 30
    while not received and time.monotonic() < give_up:
        rclpy.spin_once(node, timeout_sec=0.1)
    if received:
        msg = received[0]
        print(json.dumps({
            'stamp': [msg.header.stamp.sec, msg.header.stamp.nanosec],
            'frame_id': msg.header.frame_id,
            'detections': [{
                'id': d.id,
                'center': [d.bbox.center.position.x, d.bbox.center.position.y,
                           d.bbox.center.theta],
                'size': [d.bbox.size_x, d.bbox.size_y],
                'results': [[r.hypothesis.class_id, r.hypothesis.score] for r in d.results],
            } for d in msg.detections],
        }), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0 if received else 1


if __name__ == '__main__':
    sys.exit(main())
