"""Run a node's callbacks in a background thread while the caller does something else."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node


@contextlib.contextmanager
def background_node(name: str) -> Iterator[Node]:
    """Init rclpy, spin a new node ``name`` in a daemon thread, and tear both down after."""
    rclpy.init()
    node = rclpy.create_node(name)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name=f'{name}-spin', daemon=True)
    spinner.start()
    try:
        yield node
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        spinner.join(5)
