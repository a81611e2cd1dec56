"""Declaring ROS parameters with descriptions, the one way nodes of this package do it."""
from __future__ import annotations

from typing import Any, TypeVar

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node
from speculative_av.cloud.security import ChannelSecurity

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


def declare_link_security(node: Node, prefix: str, peer: str) -> None:
    """
    Declare ``<prefix>.insecure``, ``.tls.*`` and ``.token_file``: how a gRPC link is secured.

    ``peer`` names the other end in the descriptions ('server', 'collector').
    """
    declare(node, f'{prefix}.insecure', False,
            f'Plaintext gRPC without TLS or token to the {peer} (logs a warning): only for one '
            'on this machine or a trusted network. Otherwise the link uses TLS.', read_only=True)
    declare(node, f'{prefix}.tls.ca_file', '',
            f"PEM CA bundle the {peer}'s certificate must chain to ('' = system roots).",
            read_only=True)
    declare(node, f'{prefix}.tls.cert_file', '',
            f"PEM client certificate for mutual TLS ('' = none; needs {prefix}.tls.key_file).",
            read_only=True)
    declare(node, f'{prefix}.tls.key_file', '',
            f"PEM private key of {prefix}.tls.cert_file ('' = none).", read_only=True)
    declare(node, f'{prefix}.tls.server_name', '',
            f"Name expected in the {peer}'s certificate when it differs from the host, e.g. "
            "when connecting by IP ('' = the host).", read_only=True)
    declare(node, f'{prefix}.token_file', '',
            f"File holding this vehicle's bearer token for the {peer}, sent as 'authorization: "
            "Bearer' metadata over TLS ('' = no token).", read_only=True)


def link_security(node: Node, prefix: str) -> ChannelSecurity:
    """Return the link security :func:`declare_link_security` parameters say (SecurityError)."""
    def value(name: str) -> Any:
        return node.get_parameter(f'{prefix}.{name}').value

    return ChannelSecurity.from_settings(
        insecure=value('insecure'), ca_file=value('tls.ca_file'),
        cert_file=value('tls.cert_file'), key_file=value('tls.key_file'),
        token_file=value('token_file'), server_name=value('tls.server_name'))
