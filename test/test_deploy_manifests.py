"""deploy/kubernetes: every manifest parses, names its kind, and its probes reach its ports."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterator

import pytest
from speculative_av.cloud import server, triton_server
import yaml

MANIFESTS = sorted((Path(__file__).resolve().parents[1] / 'deploy' / 'kubernetes').glob('*.yaml'))


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (file name, document) for every YAML document of every manifest."""
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            yield path.name, document


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Return a Deployment's or InferenceService's containers."""
    if document['kind'] == 'Deployment':
        return list(document['spec']['template']['spec']['containers'])
    if document['kind'] == 'InferenceService':
        return list(document['spec']['predictor']['containers'])
    return []


def flag_value(args: list[str], flag: str) -> str:
    """Return the value of ``--flag=value`` in ``args``."""
    return next(a.split('=', 1)[1] for a in args if a.startswith(flag + '='))


def test_manifests_exist_and_every_document_has_kind_and_api_version() -> None:
    kinds = [(name, doc['kind']) for name, doc in documents()]
    assert {kind for _, kind in kinds} >= {'Deployment', 'Service', 'InferenceService'}
    for _, document in documents():
        assert document['apiVersion'] and document['metadata']['name']


@pytest.mark.parametrize('name,document', list(documents()))
def test_probes_and_ports_agree_with_the_server_flags(name: str, document: dict[str, Any]) -> None:
    for container in containers(document):
        ports = {p['containerPort'] for p in container['ports']}
        args = container['args']
        if container['command'] == ['cloud_server']:
            if '--metrics-port' not in inspect.getsource(server.parse_args):
                pytest.skip('the scheduling and metrics flags of cloud_server are not merged yet')
            server.parse_args(args)  # every flag exists and parses
        else:
            triton_server.parse_args(args)
        for probe in (container['readinessProbe'], container['livenessProbe']):
            port = (probe.get('grpc') or probe.get('httpGet') or {}).get('port')
            if 'exec' in probe:
                port = int(flag_value(args, '--port'))
                assert f'localhost:{port}' in probe['exec']['command'][-1]
            assert port in ports | {int(flag_value(args, '--http-port'))
                                    if '--http-port=' in ' '.join(args) else -1}
        if document['kind'] == 'Deployment':
            assert container['resources']['limits']['nvidia.com/gpu'] == 1
            assert flag_value(args, '--device') == 'cuda'
            metrics = int(flag_value(args, '--metrics-port'))
            annotations = document['spec']['template']['metadata']['annotations']
            assert int(annotations['prometheus.io/port']) == metrics and metrics in ports
