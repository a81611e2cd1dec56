"""
Write a synthetic driving recording: camera images and ground-truth detections in a rosbag2.

Frames come from the scene generator's temporally coherent drives; the ground truth is a
vision_msgs/Detection2DArray on its own topic with the image's exact header, so evaluation and
the demo can pair them by stamp.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

from rclpy.serialization import serialize_message
from rosbags.rosbag2 import StoragePlugin, Writer
from speculative_av.ros.image_conversion import rgb_to_compressed_msg, rgb_to_image_msg
from speculative_av.ros.messages import detections_msg
from speculative_av.scenes.generator import render_drive
from speculative_av.tools.bag_types import typestore
from std_msgs.msg import Header
from tqdm import tqdm

START_NS = 1_700_000_000_000_000_000  # a fixed epoch keeps recordings byte-reproducible
_STORAGE = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}


def make_recording(out: Path, *, frames: int, fps: float, seed: int, width: int, height: int,
                   storage: str = 'mcap', compressed: bool = False, image_topic: str = '/image',
                   truth_topic: str = '/ground_truth', frame_id: str = 'camera',
                   progress: bool = True) -> Path:
    """Write ``frames`` frames of drive ``seed`` to a new bag at ``out`` and return its path."""
    store = typestore()
    image_type = 'sensor_msgs/msg/' + ('CompressedImage' if compressed else 'Image')
    with Writer(out, version=Writer.VERSION_LATEST, storage_plugin=_STORAGE[storage]) as writer:
        images = writer.add_connection(image_topic, image_type, typestore=store)
        truths = writer.add_connection(truth_topic, 'vision_msgs/msg/Detection2DArray',
                                       typestore=store)
        scenes = render_drive(seed, frames, width, height, fps)
        for index, scene in enumerate(tqdm(scenes, total=frames, desc='recording',
                                           unit='frame', disable=not progress,
                                           file=sys.stderr)):
            stamp_ns = START_NS + round(index * 1e9 / fps)
            header = Header(frame_id=frame_id)
            header.stamp.sec, header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
            image = (rgb_to_compressed_msg(scene.image, header) if compressed
                     else rgb_to_image_msg(scene.image, header))
            writer.write(images, stamp_ns, serialize_message(image))
            writer.write(truths, stamp_ns,
                         serialize_message(detections_msg(scene.ground_truth(), header)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the recording."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('out', type=Path, help='bag directory to create')
    parser.add_argument('--frames', type=int, default=100)
    parser.add_argument('--fps', type=float, default=10.0)
    parser.add_argument('--seed', type=int, default=7, help='which drive')
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--storage', choices=sorted(_STORAGE), default='mcap')
    parser.add_argument('--compressed', action='store_true',
                        help='JPEG sensor_msgs/CompressedImage instead of raw rgb8 Image')
    parser.add_argument('--image-topic', default='/image')
    parser.add_argument('--truth-topic', default='/ground_truth')
    parser.add_argument('--frame-id', default='camera')
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f'{args.out} exists already')
    make_recording(args.out, frames=args.frames, fps=args.fps, seed=args.seed,
                   width=args.width, height=args.height, storage=args.storage,
                   compressed=args.compressed, image_topic=args.image_topic,
                   truth_topic=args.truth_topic, frame_id=args.frame_id)
    print(f'wrote {args.frames} frames to {args.out}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
