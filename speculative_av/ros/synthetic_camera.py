"""
A camera driver stand-in that publishes a deterministic moving road scene.

Frame ``i`` is a pure function of ``i`` and the image size, so a receiver can check that every
frame arrived intact, and demos and tests need no recording.
"""
from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from speculative_av.ros.image_conversion import rgb_to_compressed_msg, rgb_to_image_msg
from speculative_av.ros.parameters import declare
from std_msgs.msg import Header

# (color RGB, lane y as a fraction of the height, size as a fraction of the height, speed px/frame)
_VEHICLES = (
    ((200, 30, 30), 0.62, 0.16, 7),
    ((30, 90, 200), 0.72, 0.22, -5),
    ((230, 200, 40), 0.57, 0.10, 3),
)


def render_frame(index: int, width: int, height: int) -> npt.NDArray[np.uint8]:
    """Return frame ``index`` of the scene as an (height, width, 3) RGB array."""
    frame = np.empty((height, width, 3), np.uint8)
    horizon = height // 2
    frame[:horizon] = (135, 190, 235)  # sky
    frame[horizon:] = (70, 70, 75)  # road
    dash = max(2, height // 120)
    stripe = (np.arange(width) + 4 * index) % 64 < 32
    frame[horizon + height // 4: horizon + height // 4 + dash, stripe] = 240  # lane marking
    for color, lane, size, speed in _VEHICLES:
        box_h = max(2, int(size * height))
        box_w = box_h * 2
        x = int((speed * index) % (width + box_w)) - box_w
        y = int(lane * height) - box_h // 2
        frame[max(0, y): y + box_h, max(0, x): max(0, x + box_w)] = color
    return frame


class SyntheticCamera(Node):
    """Publish :func:`render_frame` images on ``image`` at a fixed rate."""

    def __init__(self) -> None:
        """Declare parameters and start the frame timer."""
        super().__init__('synthetic_camera')
        self._width = declare(self, 'width', 640, 'Image width in pixels.')
        self._height = declare(self, 'height', 480, 'Image height in pixels.')
        rate_hz = declare(self, 'rate_hz', 30.0, 'Frames per second.')
        self._count = declare(self, 'count', 0, 'Frames to publish before exiting; 0 = forever.')
        self._frame_id = declare(self, 'frame_id', 'camera', 'header.frame_id of every image.')
        self._encoding = declare(self, 'encoding', 'rgb8', 'Image encoding: rgb8, bgr8 or mono8.')
        self._compressed = declare(
            self, 'transport', 'raw',
            "'raw' publishes sensor_msgs/Image on image; 'compressed' publishes JPEG "
            'sensor_msgs/CompressedImage on image/compressed.') == 'compressed'

        reliable = declare(
            self, 'reliable', False,
            'Publish with reliable QoS instead of the sensor-data (best effort) profile.')
        self._wait_for = declare(
            self, 'wait_for_subscribers', 0,
            'Hold the first frame until this many subscriptions have matched.')
        qos = (QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
               if reliable else qos_profile_sensor_data)
        self._publisher = (self.create_publisher(CompressedImage, 'image/compressed', qos)
                           if self._compressed else self.create_publisher(Image, 'image', qos))
        self._index = 0
        self.done = False
        self.create_timer(1.0 / rate_hz, self._tick)

    def _tick(self) -> None:
        if self.done or self._publisher.get_subscription_count() < self._wait_for:
            return
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self._frame_id)
        frame = render_frame(self._index, self._width, self._height)
        self._publisher.publish(rgb_to_compressed_msg(frame, header) if self._compressed
                                else rgb_to_image_msg(frame, header, self._encoding))
        self._index += 1
        if self._count and self._index >= self._count:
            self._publisher.wait_for_all_acked()
            self.get_logger().info(f'published {self._index} frames')
            self.done = True


def main(args: list[str] | None = None) -> int:
    """Run the camera until ``count`` frames are out or the process is interrupted."""
    rclpy.init(args=args if args is not None else sys.argv)
    camera = SyntheticCamera()
    try:
        while rclpy.ok() and not camera.done:
            rclpy.spin_once(camera, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        camera.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
