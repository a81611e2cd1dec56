"""coco_map: pycocotools' box mAP over Detections, quiet, nan for absent size ranges."""
from __future__ import annotations

import math

import numpy as np
import pytest
from speculative_av.core.detections import Detections
from speculative_av.scenes import CATEGORIES, generate_scene
from speculative_av.tools.coco_metrics import coco_map

SIZE = (640, 480)
KEYS = {'mAP', 'mAP50', 'mAP75', 'mAP_small', 'mAP_medium', 'mAP_large', 'AR100'}


@pytest.fixture(scope='module')
def truth() -> list[Detections]:
    return [generate_scene(seed).ground_truth() for seed in range(10)]


def _shifted(detections: list[Detections], pixels: float) -> list[Detections]:
    return [Detections(d.boxes + pixels, d.scores, d.labels) for d in detections]


def test_ground_truth_against_itself_is_perfect(truth: list[Detections],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    metrics = coco_map(truth, truth, CATEGORIES, SIZE)
    assert set(metrics) == KEYS
    assert all(value == pytest.approx(1.0) for value in metrics.values())
    assert capsys.readouterr().out == '', 'pycocotools printed'


def test_shifted_boxes_score_lower_and_small_objects_suffer_most(
        truth: list[Detections]) -> None:
    metrics = coco_map(_shifted(truth, 3.0), truth, CATEGORIES, SIZE)
    assert metrics['mAP'] < metrics['mAP50'] < 1.0
    assert metrics['mAP_small'] < metrics['mAP_medium'] < metrics['mAP_large']


def test_wrong_labels_and_no_predictions_score_zero(truth: list[Detections]) -> None:
    relabelled = [Detections(d.boxes, d.scores, d.labels % 5 + 1) for d in truth]
    assert coco_map(relabelled, truth, CATEGORIES, SIZE)['mAP50'] < 0.05
    empty = coco_map([Detections.empty()] * len(truth), truth, CATEGORIES, SIZE)
    assert empty['mAP'] == 0.0 and empty['AR100'] == 0.0


def test_size_ranges_without_objects_are_nan() -> None:
    large = [Detections(np.array([[10, 10, 300, 300]]), np.ones(1), np.array([1]))]
    metrics = coco_map(large, large, CATEGORIES, SIZE)
    assert metrics['mAP_large'] == pytest.approx(1.0)
    assert math.isnan(metrics['mAP_small']) and math.isnan(metrics['mAP_medium'])


def test_a_higher_scoring_false_positive_lowers_precision() -> None:
    truth = [Detections(np.array([[10, 10, 60, 60]]), np.ones(1), np.array([1]))]
    found = [Detections(np.array([[200, 200, 250, 250], [10, 10, 60, 60]]),
                        np.array([0.9, 0.5]), np.array([1, 1]))]
    assert coco_map(found, truth, CATEGORIES, SIZE)['mAP50'] == pytest.approx(0.5, abs=0.01)


def test_background_and_unknown_labels_are_ignored() -> None:
    truth = [Detections(np.array([[10, 10, 60, 60]]), np.ones(1), np.array([2]))]
    found = [Detections(np.array([[10, 10, 60, 60]] * 3), np.array([0.9, 0.8, 0.7]),
                        np.array([0, 99, 2]))]
    assert coco_map(found, truth, CATEGORIES, SIZE)['mAP'] == pytest.approx(1.0)


def test_one_prediction_per_image_is_required(truth: list[Detections]) -> None:
    with pytest.raises(ValueError, match='predictions for'):
        coco_map(truth[:-1], truth, CATEGORIES, SIZE)
