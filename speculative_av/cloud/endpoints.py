"""
The ``cloud.endpoints`` syntax, one string per endpoint.

* ``[name=]host:port[@priority]`` or ``[name=]grpc://host:port[@priority]``: the native protocol
  (``speculative_av.v1.CloudDetector``, e.g. ``cloud_server``);
* ``[name=]kserve://host:port/model[@priority]``: the Open Inference Protocol (KServe v2) over
  gRPC, e.g. Triton, KServe or MLServer serving ``model``.

``host`` is a DNS name, an IPv4 address or a bracketed IPv6 address (``[::1]``).
"""
from __future__ import annotations

from dataclasses import dataclass
import re

DEFAULT_CLOUD_PRIORITY = 10  # above the local detector's 0: the cloud model is more accurate
NATIVE = 'native'
KSERVE = 'kserve'

_SPEC = re.compile(
    r'(?:(?P<name>[A-Za-z_][A-Za-z0-9_-]*)=)?'
    r'(?:(?P<scheme>grpc|kserve)://)?'
    r'(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])'
    r':(?P<port>[0-9]{1,5})'
    r'(?:/(?P<model>[A-Za-z0-9_][A-Za-z0-9_.-]*))?'
    r'(?:@(?P<priority>-?[0-9]{1,9}))?', re.ASCII)
_FORMS = ("'[name=]host:port[@priority]' (native) or '[name=]kserve://host:port/model"
          "[@priority]' (Open Inference Protocol), e.g. 'localhost:50051' or "
          "'triton=kserve://10.0.0.5:8001/speculative_detector@20'")


@dataclass(frozen=True)
class EndpointSpec:
    """One configured cloud endpoint."""

    name: str
    target: str  # host:port as gRPC expects it
    priority: int
    protocol: str = NATIVE  # NATIVE or KSERVE
    model: str = ''  # the v2 model name (KSERVE only)

    @classmethod
    def parse(cls, text: str, index: int = 0) -> EndpointSpec:
        """
        Parse one entry; the name defaults to ``cloud`` (``cloud<i>`` for the i-th entry).

        >>> EndpointSpec.parse('edge=kserve://10.0.0.5:8001/detector@20')
        EndpointSpec(name='edge', target='10.0.0.5:8001', priority=20, protocol='kserve', \
model='detector')
        """
        match = _SPEC.fullmatch(text.strip())
        if match is None:
            raise ValueError(f'cloud endpoint {text!r} is not {_FORMS}')
        port = int(match['port'])
        if not 1 <= port <= 65_535:
            raise ValueError(f'cloud endpoint {text!r}: port {port} is not in 1..65535')
        protocol = KSERVE if match['scheme'] == 'kserve' else NATIVE
        if protocol == KSERVE and not match['model']:
            raise ValueError(f'cloud endpoint {text!r}: kserve:// needs the model name, '
                             'kserve://host:port/model')
        if protocol == NATIVE and match['model']:
            raise ValueError(f'cloud endpoint {text!r}: only kserve:// endpoints name a model')
        name = match['name'] or ('cloud' if index == 0 else f'cloud{index}')
        priority = int(match['priority']) if match['priority'] else DEFAULT_CLOUD_PRIORITY
        return cls(name, f'{match["host"]}:{port}', priority, protocol, match['model'] or '')


def parse_endpoints(texts: list[str]) -> list[EndpointSpec]:
    """Parse every entry, rejecting duplicate names and the reserved name ``local``."""
    specs = [EndpointSpec.parse(text, i) for i, text in enumerate(t for t in texts if t.strip())]
    names = [s.name for s in specs]
    if 'local' in names:
        raise ValueError("'local' names the on-board detector; pick another endpoint name")
    if len(set(names)) != len(names):
        raise ValueError(f'cloud endpoint names must be unique, got {names}')
    return specs
