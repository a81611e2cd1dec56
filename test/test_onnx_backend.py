"""The onnxruntime backend gives eager PyTorch's detections and exports each model only once."""
from __future__ import annotations

import logging
from pathlib import Path
import sys

import numpy as np
import pytest
from speculative_av.core.detections import Detections
from speculative_av.detectors import onnx_backend
from speculative_av.detectors.onnx_backend import OnnxSettings
from speculative_av.detectors.torchvision_detector import save_checkpoint, TorchvisionDetector
from speculative_av.scenes.generator import generate_scene
import torch

MODEL = 'ssdlite320_mobilenet_v3_large'
# Stated tolerance of the onnxruntime backend against eager PyTorch (measured: scores 6e-6,
# boxes 1.2e-3 px): same count and labels, scores within SCORE_ATOL, box corners within BOX_ATOL.
SCORE_ATOL = 1e-4
BOX_ATOL = 0.05  # pixels
SEEDS = (1, 2, 5)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp('onnx_cache')


def _pair(cache_dir: Path, threshold: float) -> tuple[TorchvisionDetector, TorchvisionDetector]:
    eager = TorchvisionDetector(MODEL, 'random', score_threshold=threshold, threads=1)
    onnx = TorchvisionDetector(MODEL, 'random', score_threshold=threshold, threads=1,
                               backend='onnxruntime', onnx=OnnxSettings(cache_dir=cache_dir))
    return eager, onnx


@pytest.fixture(scope='module')
def all_scores(cache_dir: Path) -> tuple[TorchvisionDetector, TorchvisionDetector]:
    """Compare every one of the model's 300 detections (threshold 0)."""
    return _pair(cache_dir, 0.0)


@pytest.fixture(scope='module')
def thresholded(cache_dir: Path) -> tuple[TorchvisionDetector, TorchvisionDetector]:
    """Compare at the node's default threshold, which the export applies before NMS."""
    return _pair(cache_dir, 0.3)


def assert_same(actual: Detections, expected: Detections) -> None:
    """Match every expected detection to its own actual one (tied scores may swap order)."""
    assert len(actual) == len(expected) > 0
    unmatched = list(range(len(actual)))
    for i in range(len(expected)):
        match = next((j for j in unmatched if actual.labels[j] == expected.labels[i]
                      and abs(actual.scores[j] - expected.scores[i]) <= SCORE_ATOL
                      and np.all(np.abs(actual.boxes[j] - expected.boxes[i]) <= BOX_ATOL)),
                     None)
        assert match is not None, f'expected detection {i} has no match in onnxruntime output'
        unmatched.remove(match)


@pytest.mark.parametrize('seed', SEEDS)
def test_every_detection_matches_eager(all_scores, seed: int) -> None:
    eager, onnx = all_scores
    image = generate_scene(seed).image
    assert_same(onnx.detect(image), eager.detect(image))


@pytest.mark.parametrize('seed', SEEDS)
def test_threshold_applied_before_nms_changes_nothing_above_it(thresholded, seed: int) -> None:
    eager, onnx = thresholded
    image = generate_scene(seed).image
    expected = eager.detect(image)
    assert expected.scores.min() >= 0.3
    assert_same(onnx.detect(image), expected)


def test_batch_of_two_sizes_matches_eager_one_by_one(thresholded) -> None:
    eager, onnx = thresholded
    images = [generate_scene(1).image, generate_scene(2, width=320, height=240).image]
    for actual, image in zip(onnx.detect_batch(images), images):
        assert_same(actual, eager.detect(image))
    assert len(list(onnx.onnx_model.model_path(240, 320).parent.glob('*.onnx'))) >= 2


def test_faster_rcnn_outputs_keep_their_meaning(cache_dir: Path) -> None:
    """
    Faster R-CNN's outputs come in another order than SSD's (boxes, labels, scores).

    Its random weights saturate many scores near 1, so NMS near-ties may keep a different one
    of two overlapping boxes: the count, labels and scores are compared, not every box.
    """
    model = 'fasterrcnn_mobilenet_v3_large_320_fpn'
    eager = TorchvisionDetector(model, 'random', score_threshold=0.0, threads=1)
    onnx = TorchvisionDetector(model, 'random', score_threshold=0.0, threads=1,
                               backend='onnxruntime', onnx=OnnxSettings(cache_dir=cache_dir))
    image = generate_scene(SEEDS[0]).image
    actual, expected = onnx.detect(image), eager.detect(image)
    assert len(actual) == len(expected) > 0
    assert sorted(actual.labels.tolist()) == sorted(expected.labels.tolist())
    np.testing.assert_allclose(np.sort(actual.scores), np.sort(expected.scores), atol=1e-3)


def test_same_identity_as_eager(all_scores) -> None:
    eager, onnx = all_scores
    assert (onnx.backend, eager.backend) == ('onnxruntime', 'torch')
    assert (onnx.categories, onnx.model_name, onnx.model_version) == (
        eager.categories, eager.model_name, eager.model_version)
    assert onnx.onnx_model.providers == ['CPUExecutionProvider']
    assert eager.onnx_model is None


def test_cache_hit_exports_nothing(all_scores, cache_dir: Path, monkeypatch) -> None:
    eager, onnx = all_scores
    image = generate_scene(SEEDS[0]).image
    onnx.detect(image)  # exported by now, whatever ran first
    before = {path: path.stat().st_mtime_ns for path in cache_dir.iterdir()}

    def no_export(*args, **kwargs):
        raise AssertionError('exported although the cache holds the model')

    monkeypatch.setattr(torch.onnx, 'export', no_export)
    _, again = _pair(cache_dir, 0.0)  # a new detector, as in a new process
    assert_same(again.detect(image), eager.detect(image))
    assert {path: path.stat().st_mtime_ns for path in cache_dir.iterdir()} == before
    assert not list(cache_dir.glob('*.tmp'))


def test_cache_key_follows_the_weights(all_scores, tmp_path: Path) -> None:
    _, onnx = all_scores
    checkpoint = tmp_path / 'perturbed.pt'
    net = onnx.module
    state = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    first = next(name for name, tensor in state.items() if tensor.is_floating_point())
    state[first].add_(1e-3)
    twin = TorchvisionDetector(MODEL, 'random')
    twin.module.load_state_dict(state)
    save_checkpoint(twin.module, checkpoint, num_classes=len(onnx.categories),
                    categories=onnx.categories)
    other = TorchvisionDetector(MODEL, str(checkpoint), score_threshold=0.0,
                                backend='onnxruntime', onnx=OnnxSettings(cache_dir=tmp_path))
    same = TorchvisionDetector(MODEL, 'random', score_threshold=0.0,
                               backend='onnxruntime', onnx=OnnxSettings(cache_dir=tmp_path))
    shifted = TorchvisionDetector(MODEL, 'random', score_threshold=0.5,
                                  backend='onnxruntime', onnx=OnnxSettings(cache_dir=tmp_path))
    # random weights are fixed-seed: the same file name in every process
    assert same.onnx_model.model_path(480, 640).name == onnx.onnx_model.model_path(480, 640).name
    assert len({d.onnx_model.model_path(480, 640).name for d in (other, same, shifted)}) == 3
    assert same.onnx_model.model_path(480, 640) != same.onnx_model.model_path(480, 320)


def test_corrupt_cache_file_is_exported_again(thresholded, tmp_path: Path, caplog) -> None:
    eager, _ = thresholded
    _, onnx = _pair(tmp_path, 0.3)
    image = generate_scene(SEEDS[0]).image
    path = onnx.onnx_model.model_path(*image.shape[:2])
    path.write_bytes(b'half a model')
    with caplog.at_level(logging.WARNING):
        assert_same(onnx.detect(image), eager.detect(image))
    assert 'unreadable' in caplog.text
    assert path.stat().st_size > 1_000_000


def test_configuration_errors_are_clear(monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; valid: torch, onnxruntime"):
        TorchvisionDetector(MODEL, 'random', backend='tensorrt')
    with pytest.raises(ValueError, match='TensorrtExecutionProvider.*not available'):
        TorchvisionDetector(MODEL, 'random', backend='onnxruntime',
                            onnx=OnnxSettings(providers=('TensorrtExecutionProvider',)))
    with pytest.raises(ValueError, match='not available'):
        TorchvisionDetector(MODEL, 'random', backend='onnxruntime',
                            onnx=OnnxSettings(providers=()))
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    with pytest.raises(RuntimeError, match="backend 'onnxruntime' needs the onnxruntime"):
        TorchvisionDetector(MODEL, 'random', backend='onnxruntime')


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert onnx_backend.default_cache_dir() == tmp_path / 'speculative_av' / 'onnx'
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert onnx_backend.default_cache_dir() == Path.home() / '.cache' / 'speculative_av' / 'onnx'
