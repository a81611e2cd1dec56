"""Declaring ROS parameters with descriptions, the one way nodes of this package do it."""
from __future__ import annotations

from typing import TypeVar

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node

T = TypeVar('T', bool, int, float, str, list)


def declare(node: Node, name: str, default: T, description: str, *, read_only: bool = False,
            value_range: tuple[float, float] | None = None) -> T:
    """
    Declare ``name`` with a description and return its (possibly overridden) value.

    ``value_range`` (inclusive) bounds an integer or floating-point parameter: rclpy then
    refuses values outside it, from YAML, the command line or ``ros2 param set`` alike, and
    ``ros2 param describe`` shows it.
    """
    descriptor = ParameterDescriptor(description=description, read_only=read_only)
    if value_range is not None and isinstance(default, int) and not isinstance(default, bool):
        descriptor.integer_range = [IntegerRange(
            from_value=int(value_range[0]), to_value=int(value_range[1]), step=1)]
    elif value_range is not None and isinstance(default, float):
        descriptor.floating_point_range = [FloatingPointRange(
            from_value=float(value_range[0]), to_value=float(value_range[1]), step=0.0)]
    elif value_range is not None:
        raise TypeError(f'parameter {name}: a range needs an int or float default')
    value: T = node.declare_parameter(name, default, descriptor).value
    return value
