"""
Shadow mode's contract, with a manual timer and scripted candidates, and its period estimate.

The runner is driven by hand (``run_once``) unless a test is about its thread: what it runs,
what it skips (every Nth, the CPU budget, newest wins), how answers pair with a cloud result
that comes later or never, and that the engine's fused output is the same with or without it.
"""
from __future__ import annotations

import numpy as np
import pytest
from ros_harness import wait_until
from speculative_av.core.arbiter import FrameRecord
from speculative_av.core.detections import Detections, label_mapping
from speculative_av.engine.engine import Frame, LOCAL_SOURCE
from speculative_av.engine.shadow import (DUSK_BELOW, image_brightness,
                                          image_period, NIGHT_BELOW, ShadowRunner,
                                          ShadowSettings)
from speculative_av.tools import period_calibration as calibration
from test_engine import RecordingLogger, RecordingSink, Rig, same

DAY = np.full((48, 64, 3), 200, np.uint8)
NIGHT = np.full((48, 64, 3), 20, np.uint8)
CAR = Detections(np.array([[10.0, 10.0, 40.0, 30.0]], np.float32), np.array([0.9], np.float32),
                 np.array([1], np.int64))
TWO_CARS = Detections(np.array([[10.0, 10.0, 40.0, 30.0], [50.0, 5.0, 60.0, 20.0]], np.float32),
                      np.array([0.9, 0.8], np.float32), np.array([1, 1], np.int64))


class ManualTimer:
    """Seconds, moved only by the test and by scripted inference."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class ScriptedCandidate:
    """A candidate taking ``inference_s`` of the manual timer; raises on chosen calls."""

    def __init__(self, timer: ManualTimer, result: Detections = CAR,
                 inference_s: float = 0.05) -> None:
        self.timer = timer
        self.result = result
        self.inference_s = inference_s
        self.images: list[np.ndarray] = []
        self.fail_calls: set[int] = set()

    def detect(self, rgb: np.ndarray) -> Detections:
        self.images.append(rgb)
        self.timer.now_s += self.inference_s
        if len(self.images) in self.fail_calls:
            raise RuntimeError('candidate weights are broken')
        return self.result


def runner(timer: ManualTimer | None = None, **settings: object) -> ShadowRunner:
    timer = timer or ManualTimer()
    return ShadowRunner(ScriptedCandidate(timer), ShadowSettings(**settings),  # type: ignore
                        timer=timer, logger=RecordingLogger())


# What runs ----------------------------------------------------------------------------------

def test_every_nth_frame_runs_and_the_rest_are_counted():
    shadow = runner(every_nth=4, cpu_share=1.0)
    taken = [shadow.offer(i, DAY, CAR) for i in range(12)]
    assert taken == [i % 4 == 0 for i in range(12)]
    while shadow.run_once(0):
        pass
    stats = shadow.snapshot()
    assert (stats['offered'], stats['skipped_nth'], stats['ran'], stats['replaced']) == (
        12, 9, 1, 2)  # the thread was busy elsewhere: the newest of the three waiting ran


def test_the_newest_frame_wins_the_slot_and_replacements_are_counted():
    shadow = runner(cpu_share=1.0)
    images = [np.full((48, 64, 3), value, np.uint8) for value in (150, 160, 170)]
    for i, image in enumerate(images):
        shadow.offer(i, image, CAR)
    assert shadow.run_once(0)
    assert not shadow.run_once(0)
    candidate = shadow.candidate
    assert isinstance(candidate, ScriptedCandidate)
    assert len(candidate.images) == 1 and candidate.images[0] is images[2]
    assert shadow.counters['replaced'] == 2
    shadow.settled(0, CAR)  # a replaced frame's cloud result has nothing to pair with
    assert shadow.snapshot()['day_cloud_frames'] == 0


def test_the_cpu_budget_is_respected_over_time():
    timer = ManualTimer()
    shadow = ShadowRunner(ScriptedCandidate(timer, inference_s=0.1),
                          ShadowSettings(cpu_share=0.2, burst_s=1.0), timer=timer)
    duration_s, frame_s = 20.0, 0.05
    began = timer()
    for i in range(int(duration_s / frame_s)):
        shadow.offer(i, DAY, CAR)
        shadow.run_once(0)
        timer.now_s += frame_s
    elapsed = timer() - began
    busy = shadow.counters['ran'] * 0.1
    # Never more than the share plus the one burst kept; not much less either.
    assert busy <= 0.2 * elapsed + 0.2 * 1.0 + 0.1
    assert busy >= 0.2 * elapsed - 0.2
    assert shadow.counters['skipped_budget'] > 0
    assert shadow.snapshot()['cpu_share_used'] == pytest.approx(busy / elapsed, abs=0.01)


def test_an_expensive_candidate_waits_until_its_budget_refills():
    timer = ManualTimer()
    shadow = ShadowRunner(ScriptedCandidate(timer, inference_s=1.0),
                          ShadowSettings(cpu_share=0.1, burst_s=1.0), timer=timer)
    assert shadow.offer(0, DAY, CAR) and shadow.run_once(0)  # spends 1 s of a 0.1 s budget
    timer.now_s += 5.0  # refills 0.5 s: still in debt
    assert not shadow.offer(1, DAY, CAR)
    timer.now_s += 4.1
    assert shadow.offer(2, DAY, CAR)
    assert shadow.counters['skipped_budget'] == 1


# Agreement per condition --------------------------------------------------------------------

def test_agreement_with_deployed_and_cloud_per_period():
    shadow = runner(cpu_share=1.0)
    shadow.offer('day', DAY, CAR)  # candidate says CAR: agrees with deployed
    shadow.run_once(0)
    shadow.settled('day', TWO_CARS)  # cloud saw two: F1 = 2 * 1 / (2 + 1) = 2/3
    shadow.run_once(0)
    shadow.offer('night', NIGHT, Detections.empty())
    shadow.run_once(0)
    shadow.settled('night', CAR)
    shadow.run_once(0)
    stats = shadow.snapshot()
    assert (stats['day_frames'], stats['day_agreement_deployed'],
            stats['day_agreement_cloud']) == (1, 1.0, pytest.approx(2 / 3, abs=1e-4))
    assert (stats['night_frames'], stats['night_agreement_deployed'],
            stats['night_agreement_cloud']) == (1, 0.0, 1.0)
    assert stats['day_inference_ms'] == pytest.approx(50.0)
    assert stats['dusk_frames'] == 0


def test_a_cloud_result_settled_before_the_candidate_ran_still_pairs():
    shadow = runner(cpu_share=1.0)
    shadow.offer('k', DAY, CAR)
    shadow.settled('k', CAR)  # the frame settled while the candidate was still busy
    shadow.run_once(0)
    stats = shadow.snapshot()
    assert (stats['day_cloud_frames'], stats['day_agreement_cloud']) == (1, 1.0)


def test_a_cloud_that_never_answers_is_counted_and_unsettled_frames_are_given_up():
    shadow = runner(cpu_share=1.0, max_pending=3)
    shadow.offer('silent', DAY, CAR)
    shadow.run_once(0)
    shadow.settled('silent', None)  # the frame settled; no cloud result ever came
    shadow.run_once(0)
    assert shadow.snapshot()['day_cloud_missing'] == 1
    for i in range(5):  # frames whose account never comes (an engine stopped mid-frame)
        shadow.offer(i, DAY, CAR)
        shadow.run_once(0)
    assert shadow.counters['unpaired'] == 2  # the pending table stays bounded
    assert shadow.snapshot()['day_frames'] == 6


def test_candidate_labels_are_translated_into_the_deployed_label_map():
    timer = ManualTimer()
    candidate = ScriptedCandidate(timer, result=Detections(CAR.boxes, CAR.scores, [2]))
    mapping = label_mapping(['bg', 'pedestrian', 'car'], ['bg', 'car', 'pedestrian'])
    shadow = ShadowRunner(candidate, ShadowSettings(cpu_share=1.0), label_map=mapping,
                          timer=timer)
    shadow.offer(0, DAY, CAR)
    shadow.run_once(0)
    assert shadow.snapshot()['day_agreement_deployed'] == 1.0


# Supervision --------------------------------------------------------------------------------

def test_a_raising_candidate_is_logged_and_counted_and_the_thread_lives_on():
    timer = ManualTimer()
    candidate = ScriptedCandidate(timer)
    candidate.fail_calls = {2, 3}
    log = RecordingLogger()
    shadow = ShadowRunner(candidate, ShadowSettings(cpu_share=1.0), timer=timer, logger=log)
    shadow.start()
    try:
        for i in range(5):
            shadow.offer(i, DAY, CAR)
            wait_until(lambda i=i: len(candidate.images) > i, 10, f'the candidate on frame {i}')
        wait_until(lambda: shadow.counters['ran'] == 3, 10, 'the frames after the failures')
    finally:
        shadow.stop()
    assert shadow.counters['candidate_errors'] == 2
    assert not shadow.fatal
    assert any('candidate weights are broken' in t for t in log.texts('error'))


def test_a_malformed_image_is_counted_not_run():
    shadow = runner(cpu_share=1.0)
    shadow.offer(0, np.zeros((0, 64, 3), np.uint8), CAR)
    shadow.run_once(0)
    assert (shadow.counters['errors'], shadow.counters['ran']) == (1, 0)
    shadow.settled(0, CAR)
    assert not shadow.run_once(0)


def test_settings_that_bound_nothing_are_refused():
    for bad in ({'every_nth': 0}, {'cpu_share': 0.0}, {'cpu_share': 1.5}, {'iou': 0.0},
                {'min_score': -0.1}, {'burst_s': 0.0}, {'max_pending': 0}):
        with pytest.raises(ValueError):
            ShadowSettings(**bad)  # type: ignore[arg-type]


# The engine's fused output ------------------------------------------------------------------

class ShadowedSink(RecordingSink):
    """A recording sink that feeds a shadow runner the way the node does."""

    def __init__(self, rig: Rig, shadow: ShadowRunner) -> None:
        super().__init__(rig.clock, keep_images=True)
        self.shadow = shadow

    def local(self, frame: Frame[str], detections: Detections) -> None:
        super().local(frame, detections)
        assert frame.rgb is not None
        self.shadow.offer((frame.camera, frame.stamp_ns), frame.rgb, detections)

    def settled(self, frame: Frame[str], record: FrameRecord) -> None:
        super().settled(frame, record)
        cloud_sources = [name for name in record.attempts if name != LOCAL_SOURCE]
        self.shadow.settled((frame.camera, frame.stamp_ns), record.cloud_answer(cloud_sources)[1])


def _drive(rig: Rig, shadow: ShadowRunner | None) -> None:
    """Frames the cloud answers, never answers and fails; the shadow runs in between."""
    for i in range(12):
        stamp = rig.frame()
        call = rig.call('cloud')
        if i % 3 == 0:
            rig.clock.advance_ms(30)
            call.reply(TWO_CARS)
        elif i % 3 == 1:  # the cloud never answers: cancelled at the deadline
            rig.at_ms(150, stamp)
        else:
            call.fail('UNAVAILABLE: connection refused')
        if shadow is not None:
            shadow.run_once(0)
        rig.clock.advance_ms(10)


def test_the_fused_output_is_the_same_with_and_without_the_shadow():
    plain = Rig({'cloud': 10})
    plain.sink.keep_images = True
    _drive(plain, None)
    shadowed = Rig({'cloud': 10})
    timer = ManualTimer()
    candidate = ScriptedCandidate(timer, result=TWO_CARS)
    candidate.fail_calls = {4}
    shadow = ShadowRunner(candidate, ShadowSettings(every_nth=2, cpu_share=1.0), timer=timer)
    shadowed.sink = ShadowedSink(shadowed, shadow)
    shadowed.engine._sink = shadowed.sink  # the rig's engine, with the node's wiring
    _drive(shadowed, shadow)
    assert len(plain.sink.decisions) == len(shadowed.sink.decisions) == 12
    for a, b in zip(plain.sink.decisions, shadowed.sink.decisions):
        assert (a.stamp_ns, a.winner, a.late, a.decided_ns, a.released_ns) == (
            b.stamp_ns, b.winner, b.late, b.decided_ns, b.released_ns)
        assert same(a.detections, b.detections)
    stats = shadow.snapshot()
    assert (stats['ran'], stats['candidate_errors']) == (5, 1)
    # The candidate answered frames 0, 2, 4, 8, 10 (not 6); the cloud only 0 (and 6). The
    # rig's flat grey image (90) is as bright as dusk.
    assert (stats['dusk_frames'], stats['dusk_cloud_frames'], stats['dusk_cloud_missing']) == (
        5, 1, 4)


def test_cloud_answer_is_the_most_trusted_arrived_cloud_result():
    rig = Rig({'near': 10, 'far': 20})
    stamp = rig.frame()
    rig.call('near').reply(CAR)
    rig.call('far').reply(TWO_CARS)
    rig.at_ms(150, stamp)
    record = rig.sink.settled_frames[-1][1]
    answer = record.cloud_answer(['near', 'far'])[1]
    assert answer is not None and same(answer, TWO_CARS)


# The period estimate ------------------------------------------------------------------------

def test_image_period_refuses_what_is_not_an_rgb_image():
    for bad in (np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4), np.uint8),
                np.zeros((4, 4, 4), np.uint8)):
        with pytest.raises(ValueError):
            image_period(bad)
    assert image_period(DAY) == 'day' and image_period(NIGHT) == 'night'
    assert image_brightness(np.full((8, 8, 3), 255, np.uint8)) == pytest.approx(255.0, abs=0.1)


def test_thresholds_are_the_calibration_and_hold_on_held_out_seeds():
    brightness, periods = calibration.brightness_and_periods(range(0, 400))
    assert calibration.fit_thresholds(brightness, periods) == pytest.approx(
        (NIGHT_BELOW, DUSK_BELOW), abs=0.1)
    held_brightness, held_periods = calibration.brightness_and_periods(range(100_000, 100_300))
    predicted = calibration.classify(held_brightness, NIGHT_BELOW, DUSK_BELOW)
    accuracy = calibration.accuracy(predicted, held_periods)
    print(f'period estimate on held-out seeds 100000-100299: accuracy {accuracy:.3f}, '
          f'{calibration.confusion(predicted, held_periods)}')
    assert accuracy >= 0.95
    assert {'day', 'dusk', 'night'} <= set(held_periods)  # every period was tested
