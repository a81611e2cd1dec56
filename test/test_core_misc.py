"""Deadline policy, backpressure slots and the detections type."""
import threading

import numpy as np
import pytest

from speculative_av.core.backpressure import LatestFrameSlots
from speculative_av.core.deadline import DeadlinePolicy, DeadlineReference
from speculative_av.core.detections import Detections
from speculative_av.core.throttled_log import ThrottledErrors


def test_deadline_counts_from_stamp_or_arrival():
    assert DeadlinePolicy.from_ms(100).deadline_ns(1_000, 5_000) == 1_000 + 100_000_000
    arrival = DeadlinePolicy.from_ms(100, 'arrival')
    assert arrival.reference is DeadlineReference.ARRIVAL
    assert arrival.deadline_ns(1_000, 5_000) == 5_000 + 100_000_000


@pytest.mark.parametrize('ms, ref', [(0, 'stamp'), (-5, 'stamp'), (100, 'receipt')])
def test_deadline_policy_rejects_bad_parameters(ms, ref):
    with pytest.raises(ValueError, match=f'got {ref!r}' if ms > 0 else 'must be positive'):
        DeadlinePolicy.from_ms(ms, ref)


@pytest.mark.parametrize('ms', [float('nan'), float('inf')])
def test_deadline_policy_rejects_a_non_finite_deadline(ms):
    with pytest.raises(ValueError, match=f'finite number of ms, got {ms}'):
        DeadlinePolicy.from_ms(ms)


def test_the_smallest_deadline_budget_is_one_nanosecond():
    assert DeadlinePolicy(1).deadline_ns(10, 20) == 11
    with pytest.raises(ValueError, match='must be positive, got 0 ns'):
        DeadlinePolicy(0)


def test_newest_frame_replaces_a_waiting_one_and_is_counted():
    slots: LatestFrameSlots[int] = LatestFrameSlots()
    assert slots.put('front', 1) is None
    assert slots.put('front', 2) == 1
    assert slots.put('front', 3) == 2
    assert slots.take(0) == ('front', 3)
    assert slots.take(0) is None
    assert slots.dropped == {'front': 2}


def test_cameras_are_served_round_robin():
    slots: LatestFrameSlots[str] = LatestFrameSlots()
    slots.put('front', 'f1')
    slots.put('rear', 'r1')
    slots.put('front', 'f2')  # front moves behind rear
    assert [slots.take(0), slots.take(0)] == [('rear', 'r1'), ('front', 'f2')]


def test_close_wakes_a_blocked_take():
    slots: LatestFrameSlots[int] = LatestFrameSlots()
    result = []
    worker = threading.Thread(target=lambda: result.append(slots.take()))
    worker.start()
    slots.close()
    worker.join(5)
    assert result == [None]


def test_detections_normalise_and_transform():
    d = Detections([[10, 20, 30, 40], [0, 0, 1, 1]], [0.9, 0.2], [3, 1])
    assert d.boxes.dtype == np.float32 and d.labels.dtype == np.int64 and len(d) == 2
    assert d.above(0.5).labels.tolist() == [3]
    assert d.scaled(2, 0.5).boxes[0].tolist() == [20, 10, 60, 20]
    assert len(Detections.empty()) == 0
    with pytest.raises(ValueError, match='one score and label per box, got 1 boxes, 2 scores'):
        Detections([[0, 0, 1, 1]], [0.5, 0.6], [1])


def test_detections_flatten_columns_and_fix_dtypes():
    d = Detections(np.array([0, 0, 2, 2, 1, 1, 3, 3], np.int32), [[0.5], [0.25]],
                   np.array([[1], [2]], np.int32))
    assert d.boxes.shape == (2, 4) and d.scores.shape == (2,) and d.labels.shape == (2,)
    assert (d.boxes.dtype, d.scores.dtype, d.labels.dtype) == (np.float32, np.float32, np.int64)
    empty = Detections.empty()
    assert (empty.boxes.shape, empty.scores.shape, empty.labels.shape) == ((0, 4), (0,), (0,))


def test_a_score_equal_to_the_threshold_is_kept():
    d = Detections([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]], [0.5, 0.25, 0.75], [1, 2, 3])
    kept = d.above(0.5)
    assert kept.labels.tolist() == [1, 3] and kept.scores.tolist() == [0.5, 0.75]
    assert kept.boxes[:, 0].tolist() == [0, 2]


def test_relabeling_keeps_class_zero_and_drops_ids_outside_the_mapping():
    mapping = np.array([2, 0, 1], np.int64)  # old 0 -> 2, old 1 -> 0, old 2 -> 1
    d = Detections([[0, 0, 1, 1]] * 5, [0.9, 0.8, 0.7, 0.6, 0.5], [0, 1, 2, 3, -1])
    out = d.relabeled(mapping)
    assert out.labels.tolist() == [2, 0, 1] and out.scores.tolist() == pytest.approx(
        [0.9, 0.8, 0.7])


def test_detections_survive_the_vision_msgs_round_trip():
    from std_msgs.msg import Header

    from speculative_av.ros.messages import detections_from_msg, detections_msg
    original = Detections([[10, 20, 30, 60], [1.5, 2.5, 3.5, 4.5]], [0.9, 0.4], [3, 1])
    msg = detections_msg(original, Header(frame_id='cam'))
    assert msg.detections[0].bbox.center.position.x == 20 and msg.detections[0].bbox.size_y == 40
    back = detections_from_msg(msg)
    np.testing.assert_allclose(back.boxes, original.boxes)
    np.testing.assert_allclose(back.scores, original.scores, rtol=1e-6)
    assert back.labels.tolist() == [3, 1]


def test_labels_are_translated_by_class_name_and_unknown_ones_dropped():
    from speculative_av.core.detections import label_mapping
    mapping = label_mapping(['bg', 'person', 'car', 'boat'], ['bg', 'car', 'person'])
    assert mapping.tolist() == [0, 2, 1, -1]
    d = Detections([[0, 0, 1, 1]] * 4, [0.9, 0.8, 0.7, 0.6], [1, 2, 3, 7])
    out = d.relabeled(mapping)
    assert out.labels.tolist() == [2, 1] and out.scores.tolist() == pytest.approx([0.9, 0.8])


def test_errors_are_logged_at_most_once_per_interval():
    class Log:
        def __init__(self):
            self.lines = []

        def error(self, message):
            self.lines.append(message)

    now = [100.0]
    log = Log()
    errors = ThrottledErrors(log, interval_s=1.0, clock=lambda: now[0])
    errors('first')
    now[0] = 100.999
    errors('dropped')
    now[0] = 101.0
    errors('second')
    assert log.lines == ['first', 'second']
    ThrottledErrors(None)('nowhere to go')  # no logger: nothing, no error
