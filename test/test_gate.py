"""The gate command: real checkpoints on real held-out frames; the exit code is the verdict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from speculative_av.detectors.torchvision_detector import build_model, save_checkpoint
from speculative_av.scenes import CATEGORIES
from speculative_av.tools import gate
import torch

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / 'models' / 'local_ssdlite320.pt'
SSDLITE = 'ssdlite320_mobilenet_v3_large'
SMALL_RUN = ['--drives-per-period', '1', '--frames', '2', '--min-boxes', '1', '--threads', '1']


@pytest.fixture(scope='module')
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Save an untrained ssdlite with the scenes' label map: what a trained model must beat."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('gate') / 'untrained.pt'
    save_checkpoint(build_model(SSDLITE, len(CATEGORIES)), path, num_classes=len(CATEGORIES),
                    categories=CATEGORIES, architecture=SSDLITE, model_kwargs={})
    return path


def test_a_trained_candidate_replacing_an_untrained_model_is_accepted(
        untrained: Path, tmp_path: Path) -> None:
    out = tmp_path / 'gate'
    code = gate.main(['--deployed', str(untrained), '--candidate', str(TRAINED),
                      '--out', str(out), *SMALL_RUN])
    assert code == gate.ACCEPTED
    report = json.loads((out / 'gate.json').read_text())
    assert report['accepted'] is True and report['frames'] == 6
    assert report['frames_per_period'] == {'day': 2, 'dusk': 2, 'night': 2}
    total = report['rows'][0]
    assert total['condition'] == 'total' and total['after'] > total['before']
    assert {r['condition'] for r in report['rows']} >= {
        'period:night', 'size:small', 'occlusion:occluded', 'class:car'}
    assert (out / 'gate.png').stat().st_size > 10_000


def test_the_reverse_swap_is_rejected_and_said_why(untrained: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = gate.main(['--deployed', str(TRAINED), '--candidate', str(untrained),
                      '--out', str(tmp_path), *SMALL_RUN])
    assert code == gate.REJECTED
    printed = capsys.readouterr().out
    assert 'REJECTED: total mAP did not improve' in printed and 'class:car' in printed
    assert json.loads((tmp_path / 'gate.json').read_text())['accepted'] is False


def test_checkpoints_that_cannot_be_gated_exit_2(untrained: Path, tmp_path: Path) -> None:
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'\x80\x04 not a checkpoint')
    coco = tmp_path / 'coco.pt'
    save_checkpoint(build_model(SSDLITE, 3), coco, num_classes=3,
                    categories=['__background__', 'a', 'b'], architecture=SSDLITE)
    bare = tmp_path / 'bare.pt'
    torch.save(build_model(SSDLITE, len(CATEGORIES)).state_dict(), bare)
    for bad in (junk, coco, bare, tmp_path / 'missing.pt'):
        assert gate.main(['--deployed', str(untrained), '--candidate', str(bad),
                          '--out', str(tmp_path / 'out'), *SMALL_RUN]) == gate.FAILED, bad
    for bad in (['--tolerance', '-1'], ['--tolerance', 'nan'], ['--drives-per-period', '0'],
                ['--drives-per-period', '1000000000'], ['--fps', 'inf'], ['--frames', '0']):
        with pytest.raises(SystemExit):
            gate.parse_args(['--deployed', 'a', '--candidate', 'b', *bad])
