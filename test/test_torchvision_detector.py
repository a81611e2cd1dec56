"""TorchvisionDetector: model and weights selection, checkpoints, coordinates (offline, CPU)."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
import socket

import numpy as np
import pytest
from speculative_av.detectors import torchvision_detector
from speculative_av.detectors.torchvision_detector import save_checkpoint, TorchvisionDetector
import torch
import torchvision

MODEL = 'ssdlite320_mobilenet_v3_large'


@pytest.fixture(scope='module')
def detector() -> TorchvisionDetector:
    return TorchvisionDetector(MODEL, 'random', score_threshold=0.0)


@pytest.fixture(scope='module')
def checkpoint(detector: TorchvisionDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the path of a checkpoint holding the random detector's weights."""
    path = tmp_path_factory.mktemp('checkpoints') / 'coco.pt'
    save_checkpoint(detector.module, path, num_classes=91, categories=detector.categories,
                    dataset='coco-random', epoch=3)
    return path


@pytest.fixture(scope='module')
def image() -> np.ndarray:
    """Return a 320x240 frame with some structure (random models need no realism)."""
    rng = np.random.default_rng(7)
    frame = np.full((240, 320, 3), 90, np.uint8)
    frame[60:180, 40:160] = (200, 30, 30)
    frame[100:220, 200:300] = rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)
    return frame


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match='unknown torchvision detection model') as info:
        TorchvisionDetector('yolo_v99', 'random')
    assert MODEL in str(info.value) and 'fasterrcnn_mobilenet_v3_large_fpn' in str(info.value)


def test_bad_weights_and_device_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='existing checkpoint file'):
        TorchvisionDetector(MODEL, str(tmp_path / 'missing.pt'))
    with pytest.raises(ValueError, match='device'):
        TorchvisionDetector(MODEL, 'random', device='tpu')
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA is not available'):
            TorchvisionDetector(MODEL, 'random', device='cuda:0')


def test_random_weights_warn_and_are_deterministic(detector: TorchvisionDetector,
                                                   image: np.ndarray,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=torchvision_detector.__name__):
        again = TorchvisionDetector(MODEL, 'random', score_threshold=0.0)
    assert any('random weights' in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert again.model_version == 'random' and again.model_name == MODEL
    assert again.categories == detector.categories and len(detector.categories) == 91
    assert detector.categories[1] == 'person'
    first, second = detector.detect(image), again.detect(image)
    assert len(first) > 0
    np.testing.assert_array_equal(first.boxes, second.boxes)
    np.testing.assert_array_equal(first.scores, second.scores)
    np.testing.assert_array_equal(first.labels, second.labels)
    # Not a constant answer: another image gets other boxes and scores.
    other = detector.detect(np.ascontiguousarray(image[::-1]))
    assert not np.array_equal(other.scores, first.scores)
    assert len(np.unique(first.scores)) > len(first) // 2


def test_boxes_in_input_pixels(detector: TorchvisionDetector, image: np.ndarray) -> None:
    for frame in (image, np.ascontiguousarray(image[:100, :300])):
        height, width = frame.shape[:2]
        found = detector.detect(frame)
        assert len(found) > 0
        x1, y1, x2, y2 = found.boxes.T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (
            y2 <= height).all()
        assert (x1 <= x2).all() and (y1 <= y2).all()
        # Boxes span the input, not the model's 320x320 resize.
        assert x2.max() > 0.5 * width and y2.max() > 0.5 * height
    with pytest.raises(ValueError, match='uint8 RGB'):
        detector.detect(image.astype(np.float32))


def test_batch_of_different_sizes_matches_one_by_one(detector: TorchvisionDetector,
                                                     image: np.ndarray) -> None:
    """One forward pass over several images answers each as if it were alone."""
    frames = [image, np.ascontiguousarray(image[:100, :300]), np.ascontiguousarray(image[::-1])]
    batched = detector.detect_batch(frames)
    assert len(batched) == len(frames) and detector.detect_batch([]) == []
    for frame, found in zip(frames, batched):
        alone = detector.detect(frame)
        assert len(found) == len(alone) > 0
        np.testing.assert_allclose(found.boxes, alone.boxes, atol=0.05, rtol=0)
        np.testing.assert_allclose(found.scores, alone.scores, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(found.labels, alone.labels)
        assert found.boxes[:, 2].max() <= frame.shape[1]
    with pytest.raises(ValueError, match='uint8 RGB'):
        detector.detect_batch([image, image[:, :, 0]])


def test_score_threshold_filters(detector: TorchvisionDetector, checkpoint: Path,
                                 image: np.ndarray) -> None:
    everything = detector.detect(image)
    threshold = float(np.median(everything.scores))
    strict = TorchvisionDetector(MODEL, str(checkpoint), score_threshold=threshold)
    kept = strict.detect(image)
    assert 0 < len(kept) == int((everything.scores >= threshold).sum()) < len(everything)


def test_checkpoint_round_trip(detector: TorchvisionDetector, checkpoint: Path,
                               image: np.ndarray, tmp_path: Path) -> None:
    loaded = TorchvisionDetector(MODEL, str(checkpoint), score_threshold=0.0)
    assert loaded.model_version == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    assert loaded.categories == detector.categories
    assert loaded.metadata == {'dataset': 'coco-random', 'epoch': 3}
    expected, actual = detector.detect(image), loaded.detect(image)
    np.testing.assert_array_equal(actual.boxes, expected.boxes)
    np.testing.assert_array_equal(actual.scores, expected.scores)
    np.testing.assert_array_equal(actual.labels, expected.labels)

    plain = tmp_path / 'plain.pt'
    torch.save(detector.module.state_dict(), plain)
    from_state_dict = TorchvisionDetector(MODEL, str(plain), score_threshold=0.0)
    assert from_state_dict.categories == [f'class_{i}' for i in range(91)]
    np.testing.assert_array_equal(from_state_dict.detect(image).boxes, expected.boxes)


def test_checkpoint_with_own_classes(image: np.ndarray, tmp_path: Path) -> None:
    net = torchvision.models.get_model(MODEL, weights=None, weights_backbone=None, num_classes=3)
    path = tmp_path / 'three.pt'
    save_checkpoint(net, path, num_classes=3, categories=['background', 'car', 'person'])
    loaded = TorchvisionDetector(MODEL, str(path), score_threshold=0.0)
    assert loaded.categories == ['background', 'car', 'person']
    assert set(loaded.detect(image).labels.tolist()) <= {1, 2}
    with pytest.raises(ValueError, match='does not fit'):
        TorchvisionDetector('fasterrcnn_mobilenet_v3_large_320_fpn', str(path))


def test_default_weights_offline_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Download into an empty hub cache from a loopback port nobody listens on: fails fast."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        dead_url = f'http://127.0.0.1:{probe.getsockname()[1]}/weights.pth'
    real_download = torch.hub.download_url_to_file
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path))
    monkeypatch.setattr(torch.hub, 'download_url_to_file',
                        lambda url, *args, **kwargs: real_download(dead_url, *args, **kwargs))
    with pytest.raises(RuntimeError, match='could not download the pretrained') as info:
        TorchvisionDetector(MODEL, 'DEFAULT')
    assert 'local checkpoint path' in str(info.value)
