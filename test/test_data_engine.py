"""
The data engine's loop, small, with the trained models and real processes.

Mining drives go through the vehicle's engine, snippets to a real collector process, then
curation, a real fine-tuning run and the gate. The gate sees too few held-out boxes here to
accept anything, so nothing is shipped; the over-the-air swap into a running node is tested
in test_model_updates.py, the whole loop with its figures is `make data-engine` (README, "The
fleet data engine").
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
from speculative_av.fleet.snippets import read_snippet
from speculative_av.tools import data_engine
from speculative_av.tools.dataset import load_dataset
import torch


@pytest.fixture(autouse=True)
def own_process_state():
    """Give back the torch threads and the ROS environment the loop sets for itself."""
    threads, environ = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environ)


def test_a_small_loop_mines_uploads_curates_trains_and_gates(tmp_path, capsys):
    out = tmp_path / 'engine'
    code = data_engine.main([
        '--out', str(out), '--mining-drives-per-period', '1', '--mining-frames', '8',
        '--train-iterations', '2', '--gate-per-period', '1', '--gate-frames', '2',
        '--threads', '1'])
    assert code == 1  # rejected: not shipped
    steps = json.loads((out / 'report.json').read_text())
    mining, sent, kept = steps['mining'], steps['upload'], steps['curate']
    assert mining['frames'] == 24
    assert sum(mining['decisions'].values()) == 24
    recorder = mining['recorder']
    assert recorder['written'] > 0 and recorder['write_errors'] == 0
    assert recorder['triggered'] == recorder['written'] + recorder['rate_limited']
    # Every written snippet reached the collector, stored under its content hash.
    stored = sorted((out / 'cloud' / 'collector' / 'snippets').glob('*.mcap'))
    assert sent['uploaded'] == sent['snippets'] == recorder['written'] == len(stored)
    for path in stored:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
        assert read_snippet(path).reasons
    dataset = load_dataset(out / 'cloud' / 'curated')
    assert len(dataset) == kept['images'] == kept['kept'] > 0
    assert kept['kept'] + kept['near_duplicates'] + kept['exact_duplicates'] + kept[
        'malformed'] + kept['no_cloud_answer'] == len(stored)
    candidate = torch.load(out / 'cloud' / 'candidate_ssdlite320.pt', weights_only=True)
    assert candidate['iterations'] == 2 and candidate['architecture'] == data_engine.LOCAL_MODEL
    gate = steps['gate']
    assert not gate['accepted'] and 'boxes in total' in gate['reasons'][0]
    control = torch.load(out / 'cloud' / 'control_generated_only.pt', weights_only=True)
    assert control['iterations'] == 2 and control['dataset_images_seen'] == 0
    assert steps['control']['frames'] == gate['frames']  # the same gate drives
    assert 'swap' not in steps and 'drive_b' not in steps
    report = (out / 'report.md').read_text()
    assert '| gate | REJECTED' in report and '| total |' in report
    assert report in capsys.readouterr().out
    assert (out / 'gate' / 'gate.png').stat().st_size > 0
