"""Matching two detectors' answers: same class, IoU threshold, each object once, best first."""
import numpy as np
import pytest

from speculative_av.core.detections import Detections
from speculative_av.core.matching import box_iou, match


def dets(*rows):
    """Build detections from (x1, y1, x2, y2, score, label) rows."""
    array = np.array(rows, np.float64).reshape(-1, 6)
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(np.int64))


def test_iou_of_known_boxes():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    assert box_iou(a, b).tolist() == [[pytest.approx(50 / 150), 0.0, 1.0]]
    assert box_iou(np.zeros((0, 4), np.float32), b).shape == (0, 3)
    degenerate = np.array([[3, 3, 3, 3]], np.float32)
    assert box_iou(degenerate, degenerate).tolist() == [[0.0]]


def test_same_class_and_enough_overlap_make_a_pair():
    local = dets((0, 0, 10, 10, 0.9, 1), (50, 50, 60, 60, 0.8, 2))
    cloud = dets((1, 0, 11, 10, 0.7, 1), (50, 50, 60, 60, 0.9, 3), (100, 100, 120, 120, 0.9, 1))
    result = match(local, cloud, iou=0.5)
    assert result.pairs == [(0, 0)]
    assert result.only_a == [1] and result.only_b == [1, 2]
    assert result.agreement == pytest.approx(2 / 5)


def test_each_object_matches_once_and_the_better_overlap_wins():
    a = dets((0, 0, 10, 10, 0.9, 1), (2, 0, 12, 10, 0.8, 1))
    b = dets((2, 0, 12, 10, 0.9, 1))
    result = match(a, b, iou=0.5)
    assert result.pairs == [(1, 0)] and result.only_a == [0] and result.only_b == []


def test_threshold_is_inclusive_and_validated():
    a, b = dets((0, 0, 10, 10, 1, 1)), dets((0, 0, 10, 20, 1, 1))  # IoU exactly 0.5
    assert match(a, b, iou=0.5).pairs == [(0, 0)]
    assert match(a, b, iou=0.51).pairs == []
    for bad in (0.0, -1.0, 1.5, float('nan')):
        with pytest.raises(ValueError, match='iou must be in'):
            match(a, b, iou=bad)


def test_two_empty_answers_agree_fully():
    assert match(Detections.empty(), Detections.empty()).agreement == 1.0
    assert match(dets((0, 0, 1, 1, 1, 1)), Detections.empty()).agreement == 0.0
