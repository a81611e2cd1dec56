"""Declaring ROS parameters with descriptions, the one way nodes of this package do it."""
from __future__ import annotations

from typing import TypeVar

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node

T = TypeVar('T', bool, int, float, str, list)


def declare(node: Node, name: str, default: T, description: str, *,
            read_only: bool = False) -> T:
    """Declare ``name`` with a description and return its (possibly overridden) value."""
    descriptor = ParameterDescriptor(description=description, read_only=read_only)
    value: T = node.declare_parameter(name, default, descriptor).value
    return value
