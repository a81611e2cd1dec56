"""Per-condition mAP against hand-made truths and predictions, and the gate's decisions."""
from __future__ import annotations

import math

import numpy as np
import pytest
from speculative_av.core.detections import Detections
from speculative_av.scenes import CATEGORIES, render_drive
from speculative_av.tools import conditions
from speculative_av.tools.conditions import ConditionScore, FrameTruth, gate, TOTAL

CAR, PEDESTRIAN = CATEGORIES.index('car'), CATEGORIES.index('pedestrian')
SIZE = (640, 480)


def _detections(rows: list[tuple[float, float, float, float, int]],
                score: float = 1.0) -> Detections:
    boxes = np.array([r[:4] for r in rows], np.float32).reshape(-1, 4)
    return Detections(boxes, np.full(len(rows), score, np.float32),
                      np.array([r[4] for r in rows], np.int64))


# Two frames: a large visible car and a small half-hidden pedestrian by day; a medium car and
# a medium, slightly hidden pedestrian by night.
DAY = [(10, 10, 210, 160, CAR), (300, 300, 320, 340, PEDESTRIAN)]
NIGHT = [(400, 50, 460, 100, CAR), (100, 300, 130, 360, PEDESTRIAN)]
TRUTHS = [FrameTruth(_detections(DAY), np.array([1.0, 0.5], np.float32), 'day'),
          FrameTruth(_detections(NIGHT), np.array([1.0, 0.95], np.float32), 'night')]


def _score(predictions: list[list[tuple[float, float, float, float, int]]]
           ) -> dict[str, float]:
    scores = conditions.condition_map([_detections(p) for p in predictions], TRUTHS,
                                      CATEGORIES, SIZE)
    return {name: round(score.mAP, 9) for name, score in scores.items()}  # pycocotools' sums


def test_perfect_predictions_score_one_where_there_are_boxes_and_nan_elsewhere() -> None:
    scores = conditions.condition_map([t.truth for t in TRUTHS], TRUTHS, CATEGORIES, SIZE)
    boxes = {name: score.boxes for name, score in scores.items()}
    assert boxes == {TOTAL: 4, 'period:day': 2, 'period:dusk': 0, 'period:night': 2,
                     'size:small': 1, 'size:medium': 2, 'size:large': 1,
                     'occlusion:visible': 3, 'occlusion:occluded': 1, 'class:car': 2,
                     'class:pedestrian': 2, 'class:cyclist': 0, 'class:traffic_light': 0,
                     'class:traffic_sign': 0}
    for name, score in scores.items():
        if score.boxes:
            assert score.mAP == pytest.approx(1.0), name
        else:
            assert math.isnan(score.mAP), name


def test_missing_the_occluded_object_costs_only_the_occluded_condition() -> None:
    scores = _score([DAY[:1], NIGHT])
    assert scores['occlusion:visible'] == 1.0
    assert scores['occlusion:occluded'] == 0.0
    assert scores['size:small'] == 0.0 and scores['size:large'] == 1.0
    assert scores['period:night'] == 1.0 and scores['period:day'] < 1.0
    assert 0.0 < scores[TOTAL] < 1.0


def test_finding_out_of_condition_objects_is_no_false_positive() -> None:
    """The occluded pedestrian's detection falls in an ignore region of 'visible'."""
    only_visible = _score([DAY[:1], NIGHT])['occlusion:visible']
    with_occluded = _score([DAY, NIGHT])['occlusion:visible']
    assert only_visible == with_occluded == 1.0


def test_a_blind_night_shows_in_the_night_condition_only() -> None:
    scores = _score([DAY, []])
    assert scores['period:day'] == 1.0 and scores['period:night'] == 0.0


def test_a_class_never_found_scores_zero_and_the_others_keep_theirs() -> None:
    cars_only = [[r for r in frame if r[4] == CAR] for frame in (DAY, NIGHT)]
    scores = _score(cars_only)
    assert scores['class:car'] == 1.0 and scores['class:pedestrian'] == 0.0


def test_a_false_positive_ranked_first_lowers_precision() -> None:
    rows = [(500, 400, 560, 460, CAR)] + DAY  # a ghost car, scoring highest
    day = Detections(np.array([r[:4] for r in rows], np.float32),
                     np.array([1.0, 0.5, 0.5], np.float32), np.array([r[4] for r in rows]))
    scores = conditions.condition_map([day, _detections(NIGHT)], TRUTHS, CATEGORIES, SIZE)
    assert scores['class:car'].mAP < 0.9 and scores['class:pedestrian'].mAP == pytest.approx(1)


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match='predictions'):
        conditions.condition_map([TRUTHS[0].truth], TRUTHS, CATEGORIES, SIZE)
    with pytest.raises(ValueError, match='visible'):
        FrameTruth(_detections(DAY), np.ones(3, np.float32), 'day')
    with pytest.raises(ValueError, match='period'):
        FrameTruth(_detections(DAY), np.ones(2, np.float32), 'noon')


def test_held_out_drive_seeds_cover_every_period_and_match_the_rendered_drives() -> None:
    seeds = conditions.heldout_drive_seeds(2)
    periods = [conditions.drive_period(s) for s in seeds]
    assert sorted(periods) == ['day', 'day', 'dusk', 'dusk', 'night', 'night']
    assert min(seeds) >= conditions.HELDOUT_DRIVE_SEED_BASE
    for seed, period in zip(seeds[:3], periods):
        assert next(render_drive(seed, 1, 64, 48)).period == period


def test_run_detectors_renders_each_frame_once_for_every_detector() -> None:
    drives = conditions.HeldoutDrives(conditions.heldout_drive_seeds(1), frames=2, width=160,
                                      height=120)
    seen: list[int] = []
    truths, predictions, seconds = conditions.run_detectors(
        {'oracle': lambda rgb: Detections.empty(), 'again': lambda rgb: Detections.empty()},
        drives, progress=seen.append)
    assert len(truths) == 6 and seen == list(range(1, 7))
    assert {len(p) for p in predictions.values()} == {6} and set(seconds) == {'oracle', 'again'}
    assert sorted(t.period for t in truths) == ['day'] * 2 + ['dusk'] * 2 + ['night'] * 2


def _scores(total: float, night: float, night_boxes: int = 400,
            small: float = 0.2) -> dict[str, ConditionScore]:
    return {TOTAL: ConditionScore(5000, total),
            'period:night': ConditionScore(night_boxes, night),
            'size:small': ConditionScore(3000, small)}


def test_gate_accepts_a_better_total_with_no_condition_worse_than_the_tolerance() -> None:
    verdict = gate(_scores(0.30, 0.20), _scores(0.32, 0.195), tolerance=0.01)
    assert verdict.accepted and verdict.reasons == ()
    assert [r.status for r in verdict.conditions] == ['held', 'held']
    assert verdict.total.status == 'improved'
    assert verdict.total.change == pytest.approx(0.02)


def test_gate_rejects_when_the_total_does_not_improve() -> None:
    verdict = gate(_scores(0.30, 0.20), _scores(0.30, 0.25))
    assert not verdict.accepted and 'total mAP did not improve' in verdict.reasons[0]


def test_gate_rejects_one_condition_regressing_beyond_the_tolerance() -> None:
    verdict = gate(_scores(0.30, 0.20), _scores(0.35, 0.18), tolerance=0.01)
    assert not verdict.accepted
    assert verdict.reasons == ('period:night regressed 0.2000 -> 0.1800 (tolerance 0.0100)',)
    assert gate(_scores(0.30, 0.20), _scores(0.35, 0.18), tolerance=0.03).accepted


def test_gate_reports_but_does_not_gate_conditions_with_too_few_boxes() -> None:
    verdict = gate(_scores(0.30, 0.20, night_boxes=10), _scores(0.35, 0.0, night_boxes=10),
                   min_boxes=50)
    assert verdict.accepted
    night = next(r for r in verdict.conditions if r.name == 'period:night')
    assert night.status == 'too_few_boxes' and night.after == 0.0
    assert 'too_few_boxes' in conditions.format_table(verdict)


def test_gate_refuses_scores_of_different_frames_or_settings() -> None:
    with pytest.raises(ValueError, match='same held-out frames'):
        gate(_scores(0.3, 0.2, night_boxes=100), _scores(0.4, 0.2, night_boxes=99))
    with pytest.raises(ValueError, match='same conditions'):
        gate(_scores(0.3, 0.2), {TOTAL: ConditionScore(500, 0.4)})
    with pytest.raises(ValueError, match='nan'):
        gate(_scores(0.3, 0.2), _scores(0.4, math.nan))
    with pytest.raises(ValueError, match='tolerance'):
        gate(_scores(0.3, 0.2), _scores(0.4, 0.2), tolerance=-0.1)
    with pytest.raises(ValueError, match='min_boxes'):
        gate(_scores(0.3, 0.2), _scores(0.4, 0.2), min_boxes=0)


def test_verdict_as_dict_lists_total_first() -> None:
    data = gate(_scores(0.30, 0.20), _scores(0.32, 0.21)).as_dict()
    assert data['accepted'] is True
    assert [r['condition'] for r in data['rows']] == [TOTAL, 'period:night', 'size:small']
