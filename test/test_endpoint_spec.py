"""The ``cloud.endpoints`` syntax: both protocols, and what it refuses."""
from __future__ import annotations

import pytest
from speculative_av.cloud.endpoints import (DEFAULT_CLOUD_PRIORITY, EndpointSpec, KSERVE,
                                            NATIVE, parse_endpoints)


@pytest.mark.parametrize('text, expected', [
    ('localhost:50051', EndpointSpec('cloud', 'localhost:50051', DEFAULT_CLOUD_PRIORITY)),
    ('edge=10.0.0.5:50051@20', EndpointSpec('edge', '10.0.0.5:50051', 20)),
    ('  grpc://host.example.com:1@-3 ', EndpointSpec('cloud', 'host.example.com:1', -3)),
    ('v6=[::1]:8001', EndpointSpec('v6', '[::1]:8001', DEFAULT_CLOUD_PRIORITY)),
    ('triton=kserve://10.0.0.5:8001/speculative_detector@20',
     EndpointSpec('triton', '10.0.0.5:8001', 20, KSERVE, 'speculative_detector')),
    ('kserve://[fe80::1]:65535/model-v1.2', EndpointSpec(
        'cloud', '[fe80::1]:65535', DEFAULT_CLOUD_PRIORITY, KSERVE, 'model-v1.2')),
])
def test_valid_entries(text: str, expected: EndpointSpec) -> None:
    assert EndpointSpec.parse(text) == expected


@pytest.mark.parametrize('text, message', [
    ('localhost', 'is not'),  # no port
    ('localhost:', 'is not'),
    ('localhost:0', 'port 0 is not in 1..65535'),
    ('localhost:65536', 'port 65536 is not in 1..65535'),
    ('localhost:123456', 'is not'),
    ('localhost:-1', 'is not'),
    ('kserve://localhost:8001', 'kserve:// needs the model name'),
    ('kserve://localhost:8001/', 'is not'),  # empty model
    ('kserve://localhost:8001/a b', 'is not'),
    ('kserve://localhost:8001/m/1', 'is not'),
    ('localhost:50051/model', 'only kserve:// endpoints name a model'),
    ('grpc://localhost:50051/model', 'only kserve:// endpoints name a model'),
    ('http://localhost:8000/model', 'is not'),
    ('KSERVE://localhost:8001/m', 'is not'),
    ('my cloud=localhost:50051', 'is not'),
    ('local host:50051', 'is not'),
    ('localhost:50051 @5', 'is not'),
    ('localhost:50051@', 'is not'),
    ('localhost:50051@high', 'is not'),
    ('localhost:50051@99999999999', 'is not'),
    ('wölfe=localhost:50051', 'is not'),
    ('hôst:50051', 'is not'),
    ('localhost:５００５１', 'is not'),  # full-width digits
    ('[::1:50051', 'is not'),
    ('::1:50051', 'is not'),  # IPv6 needs brackets
    ('[zz::1]:50051', 'is not'),
    ('-host:50051', 'is not'),
    ('=localhost:50051', 'is not'),
    ('a=b=localhost:50051', 'is not'),
    ('dns:///localhost:50051', 'is not'),
    ('localhost:50051\n@5', 'is not'),
    ('x' * 10_000, 'is not'),
])
def test_hostile_entries_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EndpointSpec.parse(text)


def test_names_default_by_position_and_must_be_unique() -> None:
    specs = parse_endpoints(['localhost:1', '', 'kserve://localhost:2/m'])
    assert [(s.name, s.protocol) for s in specs] == [('cloud', NATIVE), ('cloud1', KSERVE)]
    with pytest.raises(ValueError, match='unique'):
        parse_endpoints(['a=localhost:1', 'a=kserve://localhost:2/m'])
    with pytest.raises(ValueError, match="'local' names the on-board detector"):
        parse_endpoints(['local=localhost:1'])
