"""Lint as ROS packages do (ament_flake8, ament_pep257) and type-check the package with mypy."""
from pathlib import Path
import subprocess
import sys

from ament_pep257.main import main as pep257_main
from mypy import api as mypy_api
import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [str(REPO / p) for p in ('speculative_av', 'test', 'launch', 'setup.py')]
GENERATED = ['*_pb2.py', '*_pb2_grpc.py', '*_pb2.pyi']  # protoc's output, as it writes it


@pytest.mark.linter
def test_flake8():
    # In a process of its own: flake8 forks workers, and forking this process (rclpy and torch
    # threads already running in other tests) can deadlock them.
    result = subprocess.run([sys.executable, '-m', 'ament_flake8.main', *SOURCES,
                             '--exclude', *GENERATED], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


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
