"""Lint as ROS packages do (ament_flake8, ament_pep257) and type-check the package with mypy."""
from pathlib import Path

from ament_flake8.main import main_with_errors as flake8_main
from ament_pep257.main import main as pep257_main
from mypy import api as mypy_api
import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [str(REPO / p) for p in ('speculative_av', 'test', 'launch', 'setup.py')]
GENERATED = ['*_pb2.py', '*_pb2_grpc.py', '*_pb2.pyi']  # protoc's output, as it writes it


@pytest.mark.linter
def test_flake8():
    rc, errors = flake8_main(argv=[*SOURCES, '--exclude', *GENERATED])
    assert rc == 0, f'{len(errors)} flake8 errors:\n' + '\n'.join(errors)


@pytest.mark.linter
def test_pep257():
    generated = [str(path) for pattern in GENERATED for path in REPO.rglob(pattern)]
    assert generated, 'the generated gRPC modules moved: update GENERATED'
    # ament_pep257 excludes paths, not patterns; and it must be given paths before --exclude.
    assert pep257_main(argv=[*SOURCES, '--exclude', *generated]) == 0, 'pep257 errors (above)'


@pytest.mark.linter
def test_mypy():
    out, err, rc = mypy_api.run(['--config-file', str(REPO / 'setup.cfg'),
                                 str(REPO / 'speculative_av')])
    assert rc == 0, out + err
