"""The ``cloud.endpoints`` syntax: ``[name=]host:port[@priority]``, one string per endpoint."""
from __future__ import annotations

from dataclasses import dataclass
import re

DEFAULT_CLOUD_PRIORITY = 10  # above the local detector's 0: the cloud model is more accurate

_SPEC = re.compile(r'^(?:(?P<name>[A-Za-z_][\w-]*)=)?(?P<target>[^=@\s]+:\d+)'
                   r'(?:@(?P<priority>-?\d+))?$')


@dataclass(frozen=True)
class EndpointSpec:
    """One configured cloud endpoint."""

    name: str
    target: str  # host:port as gRPC expects it
    priority: int

    @classmethod
    def parse(cls, text: str, index: int = 0) -> EndpointSpec:
        """
        Parse ``[name=]host:port[@priority]``; the name defaults to ``cloud`` (``cloud<i>``).

        >>> EndpointSpec.parse('edge=10.0.0.5:50051@20')
        EndpointSpec(name='edge', target='10.0.0.5:50051', priority=20)
        """
        match = _SPEC.match(text.strip())
        if match is None:
            raise ValueError(
                f'cloud endpoint {text!r} is not [name=]host:port[@priority], '
                "e.g. 'localhost:50051' or 'datacenter=10.0.0.5:50051@20'")
        name = match['name'] or ('cloud' if index == 0 else f'cloud{index}')
        priority = int(match['priority']) if match['priority'] else DEFAULT_CLOUD_PRIORITY
        return cls(name, match['target'], priority)


def parse_endpoints(texts: list[str]) -> list[EndpointSpec]:
    """Parse every entry, rejecting duplicate names and the reserved name ``local``."""
    specs = [EndpointSpec.parse(text, i) for i, text in enumerate(t for t in texts if t.strip())]
    names = [s.name for s in specs]
    if 'local' in names:
        raise ValueError("'local' names the on-board detector; pick another endpoint name")
    if len(set(names)) != len(names):
        raise ValueError(f'cloud endpoint names must be unique, got {names}')
    return specs
