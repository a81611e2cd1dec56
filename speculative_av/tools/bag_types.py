"""
Message types of bags: the rosbags typestore and the rclpy classes, by ROS type name.

The typestore holds ROS 2 Kilted's standard types plus vision_msgs, registered from the
``.msg`` definitions of the installed vision_msgs package, so the definitions and type hashes
written into bags are those of the interfaces nodes actually use.
"""
from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
import sys

from ament_index_python.packages import get_package_share_directory
from rosbags.typesys import get_types_from_msg, get_typestore, Stores
from rosbags.typesys.store import Typestore

IMAGE_TYPES = frozenset({'sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage'})


def vision_msgs_share() -> Path:
    """Return the share directory of the installed vision_msgs package."""
    if os.environ.get('AMENT_PREFIX_PATH'):
        return Path(get_package_share_directory('vision_msgs'))
    return Path(sys.prefix) / 'share' / 'vision_msgs'


@functools.cache
def typestore() -> Typestore:
    """Return the typestore of ROS 2 Kilted with the installed vision_msgs registered."""
    store = get_typestore(Stores.ROS2_KILTED)
    definitions = sorted((vision_msgs_share() / 'msg').glob('*.msg'))
    if not definitions:
        raise FileNotFoundError(f'no vision_msgs .msg definitions in {vision_msgs_share()}')
    types = {}
    for path in definitions:
        types.update(get_types_from_msg(path.read_text(), f'vision_msgs/msg/{path.stem}'))
    store.register(types)
    return store


def message_class(msgtype: str) -> type:
    """
    Return the rclpy message class of ``msgtype`` (``package/msg/Name``).

    Raises ImportError when the package's Python interfaces are not installed, AttributeError
    when the package has no such message.
    """
    package, _, name = msgtype.split('/')
    cls: type = getattr(importlib.import_module(f'{package}.msg'), name)
    return cls
