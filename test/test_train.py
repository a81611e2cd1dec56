"""The training tool, model_kwargs and int8 checkpoints, and the committed trained detectors."""
from __future__ import annotations

import hashlib
from pathlib import Path
import statistics
import time

import pytest
from speculative_av.detectors.torchvision_detector import (build_model, save_checkpoint,
                                                           TorchvisionDetector)
from speculative_av.scenes import CATEGORIES, generate_scene
from speculative_av.tools import train
from speculative_av.tools.coco_metrics import coco_map
from speculative_av.tools.dataset import encode_jpeg, Sample, write_dataset
import torch

REPO = Path(__file__).resolve().parents[1]
SSDLITE = 'ssdlite320_mobilenet_v3_large'
COMMITTED = {'local_ssdlite320.pt': SSDLITE,
             'cloud_frcnn.pt': 'fasterrcnn_mobilenet_v3_large_320_fpn'}
MAX_CHECKPOINT_BYTES = 25 * 1024 * 1024
SMOKE_ARGS = ['--iterations', '2', '--batch-size', '2', '--eval-scenes', '2', '--image-width',
              '320', '--image-height', '240', '--threads', '2', '--model-kwarg',
              'detections_per_img=50']


@pytest.fixture(scope='module')
def smoke_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp('train') / 'smoke.pt'
    assert train.main(['--out', str(path), *SMOKE_ARGS]) == 0
    return path


def test_smoke_run_writes_a_checkpoint_with_its_provenance(smoke_checkpoint: Path) -> None:
    detector = TorchvisionDetector(SSDLITE, str(smoke_checkpoint), score_threshold=0.0)
    assert detector.categories == CATEGORIES
    meta = detector.metadata
    assert meta['training_command'] == ' '.join(
        ['python -m speculative_av.tools.train --out', str(smoke_checkpoint), *SMOKE_ARGS])
    assert meta['architecture'] == SSDLITE and meta['data_seed'] == 0
    assert meta['images_seen'] == 4 and meta['train_seeds'] == [0, 4]
    assert meta['heldout_seeds'] == [train.HELDOUT_SEED_BASE, train.HELDOUT_SEED_BASE + 2]
    assert meta['train_seconds'] > 0 and meta['image_size'] == [320, 240]
    assert {'mAP', 'mAP50', 'mAP_small', 'mAP_medium', 'mAP_large'} <= set(
        meta['heldout_metrics'])
    detections = detector.detect(generate_scene(1, 320, 240).image)
    assert set(detections.labels.tolist()) <= set(range(1, len(CATEGORIES)))


def test_model_kwargs_are_stored_and_honoured_on_load(smoke_checkpoint: Path) -> None:
    detector = TorchvisionDetector(SSDLITE, str(smoke_checkpoint))
    assert detector.metadata['model_kwargs'] == {'detections_per_img': 50}
    assert detector.module.detections_per_img == 50


def test_int8_checkpoints_are_smaller_and_load_close_to_the_original(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model(SSDLITE, len(CATEGORIES)).eval()
    full, packed = tmp_path / 'full.pt', tmp_path / 'int8.pt'
    for path, int8 in ((full, False), (packed, True)):
        save_checkpoint(net, path, num_classes=len(CATEGORIES), categories=CATEGORIES, int8=int8)
    assert packed.stat().st_size < 0.4 * full.stat().st_size
    loaded = TorchvisionDetector(SSDLITE, str(packed)).module.state_dict()
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            step = tensor.abs().max() / 127
            assert (loaded[name] - tensor).abs().max() <= step / 2 + 1e-6, name


def test_arguments_need_a_budget_and_parse_literal_kwargs() -> None:
    with pytest.raises(SystemExit):
        train.parse_args(['--out', 'x.pt'])
    with pytest.raises(SystemExit):
        train.parse_args(['--out', 'x.pt', '--iterations', '1', '--model-kwarg', 'oops'])
    args = train.parse_args(['--out', 'x.pt', '--minutes', '1', '--model-kwarg', 'min_size=480',
                             '--model-kwarg', 'name=plain'])
    assert args.model_kwargs == {'min_size': 480, 'name': 'plain'}


def test_heldout_seeds_are_out_of_reach_of_training() -> None:
    seeds = train.heldout_seeds(500)
    assert len(seeds) == 500 and seeds.start == train.HELDOUT_SEED_BASE
    assert train.HELDOUT_SEED_BASE >= 100 * train.TRAIN_SEED_STRIDE  # data seeds 0..99


def _committed(name: str) -> Path:
    path = REPO / 'models' / name
    if not path.is_file():
        pytest.skip(f'{path} is not committed')
    return path


@pytest.mark.parametrize('name, model', COMMITTED.items())
def test_committed_checkpoint_is_small_and_loads(name: str, model: str) -> None:
    path = _committed(name)
    assert path.stat().st_size < MAX_CHECKPOINT_BYTES
    detector = TorchvisionDetector(model, str(path))
    assert detector.categories == CATEGORIES
    assert detector.metadata['architecture'] == model
    assert detector.metadata['training_command'].startswith(
        'python -m speculative_av.tools.train')
    if 'min_size' in detector.metadata['model_kwargs']:  # the cloud model's input resolution
        assert detector.module.transform.min_size == (
            detector.metadata['model_kwargs']['min_size'],)


def test_committed_cloud_model_beat_the_local_one_on_the_same_heldout_scenes() -> None:
    local, cloud = (torch.load(_committed(name), weights_only=True) for name in COMMITTED)
    assert local['heldout_seeds'] == cloud['heldout_seeds']
    for key in ('mAP', 'mAP_small'):
        assert cloud['heldout_metrics'][key] > local['heldout_metrics'][key], key


@pytest.mark.benchmark
def test_committed_checkpoints_heldout_accuracy_and_cpu_latency() -> None:
    """Re-evaluate both committed models on 200 held-out scenes; time 640x480 frames on CPU."""
    scenes = [generate_scene(seed) for seed in train.heldout_seeds(200)]
    truth = [scene.ground_truth() for scene in scenes]
    results = {}
    for name, model in COMMITTED.items():
        detector = TorchvisionDetector(model, str(_committed(name)), score_threshold=0.0,
                                       threads=2)
        found = [detector.detect(scene.image) for scene in scenes]
        metrics = coco_map(found, truth, CATEGORIES, (640, 480))
        for label, category in enumerate(CATEGORIES[1:], start=1):
            alone = [c if i == label else '__background__' for i, c in enumerate(CATEGORIES)]
            metrics[f'mAP50_{category}'] = coco_map(found, truth, alone, (640, 480))['mAP50']
        timings = []
        for scene in scenes[:23]:
            start = time.perf_counter()
            detector.detect(scene.image)
            timings.append(time.perf_counter() - start)
        metrics['latency_ms'] = 1e3 * statistics.median(timings[3:])
        results[name] = metrics
    print(f'\nheld-out seeds {train.HELDOUT_SEED_BASE}..{train.HELDOUT_SEED_BASE + 199}')
    for name, metrics in results.items():
        print(name, ', '.join(f'{k} {v:.3f}' for k, v in metrics.items()))
    local, cloud = results.values()
    assert cloud['mAP'] > local['mAP'] and cloud['mAP_small'] > local['mAP_small']
    assert cloud['latency_ms'] < 400


@pytest.fixture(scope='module')
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write a two-image curated set: generated frames with their ground truth as labels."""
    scenes = [generate_scene(seed, 320, 240) for seed in (3, 4)]
    samples = [Sample(encode_jpeg(s.image), s.boxes, s.labels, {'seed': seed})
               for seed, s in zip((3, 4), scenes)]
    directory = tmp_path_factory.mktemp('curated') / 'set'
    write_dataset(directory, samples, CATEGORIES, {'teacher': 'ground truth (test)'})
    return directory


def test_fine_tuning_from_a_checkpoint_on_a_curated_set(smoke_checkpoint: Path, curated: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / 'tuned.pt'
    argv = ['--init', str(smoke_checkpoint), '--dataset', str(curated), '--mix-generated',
            '0.5', '--out', str(out), '--iterations', '3', '--batch-size', '2',
            '--eval-scenes', '0', '--image-width', '320', '--image-height', '240',
            '--threads', '1', '--lr', '1e-4']
    assert train.main(argv) == 0
    detector = TorchvisionDetector(SSDLITE, str(out), score_threshold=0.0)
    meta = detector.metadata
    assert detector.categories == CATEGORIES
    assert meta['model_kwargs'] == {'detections_per_img': 50}  # taken from --init
    assert detector.module.detections_per_img == 50
    assert meta['init']['path'] == str(smoke_checkpoint)
    assert meta['init']['sha256'] == hashlib.sha256(smoke_checkpoint.read_bytes()).hexdigest()
    assert meta['init']['training_command'].startswith('python -m speculative_av.tools.train')
    assert meta['dataset']['images'] == 2 and meta['dataset']['path'] == str(curated.resolve())
    assert meta['dataset']['provenance'] == {'teacher': 'ground truth (test)'}
    assert meta['mix_generated'] == 0.5
    assert meta['images_seen'] == 6 and meta['dataset_images_seen'] == 3
    assert meta['train_seeds'] == [0, 3] and meta['heldout_metrics'] == {}
    before = torch.load(smoke_checkpoint, weights_only=True)['model']
    after = torch.load(out, weights_only=True)['model']
    assert any(not torch.equal(before[k], after[k])
               for k in before if before[k].is_floating_point())
    detections = detector.detect(generate_scene(1, 320, 240).image)
    assert set(detections.labels.tolist()) <= set(range(1, len(CATEGORIES)))


def test_fine_tuning_refuses_mismatched_inputs(smoke_checkpoint: Path, curated: Path,
                                               tmp_path: Path) -> None:
    budget = ['--out', str(tmp_path / 'x.pt'), '--iterations', '1', '--eval-scenes', '0']
    with pytest.raises(SystemExit):
        train.parse_args([*budget, '--mix-generated', '0.5'])  # no --dataset
    with pytest.raises(SystemExit):
        train.parse_args([*budget, '--dataset', str(curated), '--mix-generated', '1.5'])
    with pytest.raises(SystemExit):
        train.parse_args([*budget, '--init', str(smoke_checkpoint), '--model-kwarg', 'a=1'])
    with pytest.raises(ValueError, match='is a ssdlite'):
        train.run([*budget, '--init', str(smoke_checkpoint), '--model',
                   'fasterrcnn_mobilenet_v3_large_320_fpn'])
    not_a_checkpoint = tmp_path / 'junk.pt'
    not_a_checkpoint.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='cannot load'):
        train.run([*budget, '--init', str(not_a_checkpoint)])
    other = tmp_path / 'other'
    write_dataset(other, [], ['__background__', 'cat'], {})
    with pytest.raises(ValueError, match='categories'):
        train.run([*budget, '--dataset', str(other)])
    assert not (tmp_path / 'x.pt').exists()
