"""
The speculative engine's contract, with an injected clock, a scripted detector and endpoints.

The engine is driven by hand: ``process`` runs the waiting frames, the test delivers cloud
replies and moves the clock, ``tick`` applies deadlines. What the sink receives is the contract:
exactly one fused result per processed frame, in stamp order, carrying the winner's detections,
never later than the deadline unless the local detector itself was, and each frame's account
with that frame's own deadline.
"""
from __future__ import annotations

from dataclasses import dataclass
import threading
from typing import Callable, Sequence

import numpy as np
import pytest
from ros_harness import wait_until
from speculative_av.cloud.codec import decode_rgb, EncodedFrame
from speculative_av.cloud.dispatch import CloudDispatcher
from speculative_av.cloud.reply import CloudReply
from speculative_av.core.arbiter import Decision, FrameRecord, SourceState
from speculative_av.core.deadline import DeadlinePolicy
from speculative_av.core.detections import Detections
from speculative_av.core.uplink import AdaptiveUplink, Encoding
from speculative_av.engine.engine import EngineSettings, Frame, SpeculativeEngine

MS = 1_000_000
IMAGE = np.full((48, 64, 3), 90, np.uint8)
LARGE_IMAGE = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
LOCAL_RESULT = Detections(np.array([[1.0, 2.0, 10.0, 20.0]], np.float32),
                          np.array([0.9], np.float32), np.array([1], np.int64))
CLOUD_RESULT = Detections(np.array([[5.0, 5.0, 30.0, 40.0], [0.0, 0.0, 8.0, 8.0]], np.float32),
                          np.array([0.8, 0.7], np.float32), np.array([3, 3], np.int64))
BETTER_CLOUD_RESULT = Detections(np.array([[6.0, 6.0, 31.0, 41.0]], np.float32),
                                 np.array([0.95], np.float32), np.array([2], np.int64))


class ManualClock:
    """The engine's clock, moved only by the test (and by scripted inference)."""

    def __init__(self, start_ns: int = 1_000 * MS) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance_ms(self, ms: float) -> None:
        self.now_ns += round(ms * MS)


class ScriptedDetector:
    """A local detector that takes ``inference_ms`` of the manual clock and returns a result."""

    def __init__(self, clock: ManualClock, inference_ms: float = 20.0,
                 result: Detections = LOCAL_RESULT) -> None:
        self.clock = clock
        self.inference_ms = inference_ms
        self.result = result
        self.batches: list[int] = []
        self.calls: list[str] = []  # 'detect' or 'batch'
        self.images: list[np.ndarray] = []
        self.fail_next = False

    def detect(self, rgb: np.ndarray) -> Detections:
        self.calls.append('detect')
        return self._run([rgb])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        self.calls.append('batch')
        return self._run(images)

    def _run(self, images: Sequence[np.ndarray]) -> list[Detections]:
        self.images += images
        self.batches.append(len(images))
        self.clock.advance_ms(self.inference_ms)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError('CUDA error: an illegal memory access was encountered')
        return [self.result for _ in images]


@dataclass
class ScriptedCall:
    """A call the test finishes; cancelling resolves it CANCELLED, like a real endpoint."""

    endpoint: ScriptedEndpoint
    frame: EncodedFrame
    frame_id: str
    timeout_s: float
    deadline_unix_ns: int
    on_done: Callable[[CloudReply], None]
    stamp_ns: int = 0
    finished: bool = False
    cancelled: bool = False
    resolves_on_cancel: bool = True  # a real call reports CANCELLED; a stuck one may not

    def reply(self, detections: Detections) -> None:
        self._finish(CloudReply(self.endpoint.name, True, detections, frame_id=self.frame_id,
                                round_trip_ms=5.0))

    def fail(self, error: str) -> None:
        self._finish(CloudReply(self.endpoint.name, False, error=error, frame_id=self.frame_id))

    def fail_after(self, error: str, round_trip_ms: float) -> None:
        self._finish(CloudReply(self.endpoint.name, False, error=error, frame_id=self.frame_id,
                                round_trip_ms=round_trip_ms))

    def cancel(self) -> bool:
        self.cancelled = True
        if not self.finished and self.resolves_on_cancel:
            self.fail('CANCELLED')
        return True

    def _finish(self, reply: CloudReply) -> None:
        assert not self.finished, 'a call is finished once'
        self.finished = True
        self.on_done(reply)


class ScriptedEndpoint:
    """A cloud endpoint whose calls finish when the test says so."""

    def __init__(self, name: str, healthy: bool = True) -> None:
        self.name = name
        self.healthy = healthy
        self.resolves_on_cancel = True
        self.calls: list[ScriptedCall] = []

    def submit(self, frame: EncodedFrame, frame_id: str, stamp_ns: int, timeout_s: float,
               deadline_unix_ns: int, on_done: Callable[[CloudReply], None]) -> ScriptedCall:
        call = ScriptedCall(self, frame, frame_id, timeout_s, deadline_unix_ns, on_done, stamp_ns,
                            resolves_on_cancel=self.resolves_on_cancel)
        self.calls.append(call)
        return call


class RecordingSink:
    """Records everything the engine hands out, checking that outputs come once per frame."""

    def __init__(self, clock: ManualClock, keep_images: bool = False) -> None:
        self.clock = clock
        self.keep_images = keep_images
        self.local_results: list[tuple[int, Detections]] = []
        self.cloud_results: list[tuple[int, str, Detections]] = []
        self.fused_results: list[tuple[Frame[str], Decision, int]] = []  # clock at output
        self.settled_frames: list[tuple[Frame[str], FrameRecord]] = []
        self.fused_event = threading.Event()
        self.failing_outputs = 0  # raise on this many fused outputs (a broken publisher)
        self.failing_cloud_outputs = 0
        self.failing_accounts = 0
        self.publish_ms = 0.0  # what handing out a local result costs, on the manual clock
        self.asked_for_images: list[str] = []

    def wants_image(self, camera: str) -> bool:
        self.asked_for_images.append(camera)
        return self.keep_images

    def local(self, frame: Frame[str], detections: Detections) -> None:
        self.clock.advance_ms(self.publish_ms)
        self.local_results.append((frame.stamp_ns, detections))

    def cloud(self, frame: Frame[str], endpoint: str, detections: Detections) -> None:
        if self.failing_cloud_outputs:
            self.failing_cloud_outputs -= 1
            raise RuntimeError('cloud publisher gone')
        self.cloud_results.append((frame.stamp_ns, endpoint, detections))

    def fused(self, frame: Frame[str], decision: Decision) -> None:
        if self.failing_outputs:
            self.failing_outputs -= 1
            raise RuntimeError('publisher gone')
        assert all(f is not frame for f, _, _ in self.fused_results), 'one result per frame'
        self.fused_results.append((frame, decision, self.clock()))
        self.fused_event.set()

    def settled(self, frame: Frame[str], record: FrameRecord) -> None:
        if self.failing_accounts:
            self.failing_accounts -= 1
            raise RuntimeError('decisions publisher gone')
        self.settled_frames.append((frame, record))

    @property
    def decisions(self) -> list[Decision]:
        return [decision for _, decision, _ in self.fused_results]


class RecordingLogger:
    """Collects what the engine logs, as (level, text)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, message: str) -> None:
        self.lines.append(('info', message))

    def warning(self, message: str) -> None:
        self.lines.append(('warning', message))

    def error(self, message: str) -> None:
        self.lines.append(('error', message))

    def texts(self, level: str) -> list[str]:
        return [text for lvl, text in self.lines if lvl == level]


def identity(rgb: np.ndarray) -> np.ndarray:
    """Convert a frame that is already an image, refusing what is not one."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'not an RGB image: {type(rgb).__name__}')
    return rgb


class Rig:
    """An engine over a manual clock, a scripted detector and scripted endpoints."""

    def __init__(self, endpoints: dict[str, int] | None = None, *, deadline_ms: float = 100.0,
                 reference: str = 'stamp', inference_ms: float = 20.0,
                 engine_options: dict[str, object] | None = None, **settings: object
                 ) -> None:
        self.clock = ManualClock()
        self.detector = ScriptedDetector(self.clock, inference_ms)
        self.endpoints = {name: ScriptedEndpoint(name) for name in (endpoints or {})}
        self.sink = RecordingSink(self.clock)
        self.log = RecordingLogger()
        dispatcher = (CloudDispatcher(list(self.endpoints.values()), dict(endpoints),
                                      clock=lambda: self.clock() / 1e9)
                      if endpoints else None)
        self.engine: SpeculativeEngine[np.ndarray, str] = SpeculativeEngine(
            self.detector, identity, self.sink, cloud=dispatcher,
            settings=EngineSettings(DeadlinePolicy.from_ms(deadline_ms, reference),
                                    **settings),  # type: ignore[arg-type]
            clock=self.clock, wall_clock=lambda: 1_700_000_000 * 10**9 + self.clock(),
            timer=lambda: self.clock() / 1e9, logger=self.log,
            **(engine_options or {}))  # type: ignore[arg-type]

    def frame(self, camera: str = 'front', stamp_ns: int | None = None,
              image: object = IMAGE) -> int:
        """Submit a frame stamped now (by default) and run it; return its stamp."""
        stamp = self.clock() if stamp_ns is None else stamp_ns
        self.engine.submit(camera, image, stamp, f'{camera}_optical', camera)  # type: ignore
        self.engine.process(timeout_s=0)
        return stamp

    def call(self, endpoint: str, index: int = -1) -> ScriptedCall:
        return self.endpoints[endpoint].calls[index]

    def at_ms(self, ms_after_stamp: float, stamp_ns: int) -> None:
        """Move the clock to ``ms_after_stamp`` after ``stamp_ns`` and apply deadlines."""
        self.clock.now_ns = stamp_ns + round(ms_after_stamp * MS)
        self.engine.tick()


def same(a: Detections, b: Detections) -> bool:
    return (np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
            and np.array_equal(a.labels, b.labels))


# Deadlines ----------------------------------------------------------------------------------

def test_without_a_reply_only_the_deadline_tick_releases_the_local_result():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    stamp = rig.frame()
    assert len(rig.sink.local_results) == 1 and rig.sink.fused_results == []
    rig.at_ms(99.0, stamp)
    assert rig.sink.fused_results == []  # before the deadline the cloud may still win
    rig.at_ms(100.0, stamp)
    (frame, decision, released_ns), = rig.sink.fused_results
    assert decision.winner == 'local' and not decision.late
    assert same(decision.detections, LOCAL_RESULT)
    assert released_ns == decision.deadline_ns == stamp + 100 * MS
    assert rig.call('cloud').cancelled  # the decided frame's call is not left running


def test_the_deadline_thread_alone_decides_a_frame_whose_cloud_never_answers():
    """With real time and no call timeout, only the engine's deadline thread can decide."""
    sink = RecordingSink(ManualClock())
    endpoint = ScriptedEndpoint('cloud')
    engine: SpeculativeEngine[np.ndarray, str] = SpeculativeEngine(
        ScriptedDetector(ManualClock(), 0.0), identity, sink,
        cloud=CloudDispatcher([endpoint], {'cloud': 10}),
        settings=EngineSettings(DeadlinePolicy.from_ms(200.0, 'arrival')))
    engine.start()
    try:
        engine.submit('front', IMAGE, 0, 'f', 'front')
        wait_until(sink.fused_event.is_set, 10.0, 'the fused result')
        (_, decision, _), = sink.fused_results
        assert decision.winner == 'local' and not decision.late
        assert decision.released_ns >= decision.deadline_ns  # held for the cloud until then
        assert not endpoint.calls[0].finished or endpoint.calls[0].cancelled
    finally:
        engine.stop()


def test_a_cloud_reply_in_time_is_published_at_once_not_at_the_deadline():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    stamp = rig.frame()
    rig.clock.now_ns = stamp + 60 * MS
    rig.call('cloud').reply(CLOUD_RESULT)
    (_, decision, released_ns), = rig.sink.fused_results
    assert decision.winner == 'cloud' and same(decision.detections, CLOUD_RESULT)
    assert released_ns == stamp + 60 * MS


def test_a_cloud_reply_after_the_deadline_does_not_change_the_published_result():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    stamp = rig.frame()
    rig.at_ms(100.0, stamp)
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'local'
    assert len(rig.sink.settled_frames) == 1  # the call was cancelled, so the frame is settled


def test_a_local_detector_slower_than_the_deadline_makes_the_frame_late_not_lost():
    rig = Rig({'cloud': 10}, deadline_ms=100.0, inference_ms=150.0)
    stamp = rig.frame()  # the scripted inference moves the clock 150 ms
    (_, decision, released_ns), = rig.sink.fused_results
    assert decision.winner == 'local' and decision.late
    assert released_ns == stamp + 150 * MS  # the moment local arrived, not later
    assert rig.engine.snapshot()['late'] == 1


def test_all_sources_failing_after_the_deadline_marks_the_frame_late():
    rig = Rig({'cloud': 10}, deadline_ms=100.0, inference_ms=150.0)
    rig.detector.fail_next = True
    rig.frame()
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner is None and decision.late
    assert rig.engine.counters['frame_errors'] == 1


def test_a_frame_already_past_its_deadline_is_not_sent_to_the_cloud():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    rig.frame(stamp_ns=rig.clock() - 200 * MS)
    assert rig.endpoints['cloud'].calls == []
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'local' and decision.late
    (_, record), = rig.sink.settled_frames
    assert 'no time left' in record.attempts['cloud'].error


def test_the_call_timeout_and_the_unix_deadline_are_the_time_left():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    rig.clock.advance_ms(30.0)  # the frame waited 30 ms since its stamp
    stamp = rig.clock() - 30 * MS
    rig.engine.submit('front', IMAGE, stamp, 'f', 'front')
    rig.engine.process(timeout_s=0)
    call = rig.call('cloud')
    assert call.timeout_s == pytest.approx(0.070)
    assert call.deadline_unix_ns == 1_700_000_000 * 10**9 + stamp + 100 * MS


def test_deadline_reference_arrival_counts_from_reception_not_from_the_stamp():
    rig = Rig({'cloud': 10}, deadline_ms=100.0, reference='arrival')
    arrival = rig.clock()
    rig.frame(stamp_ns=arrival - 10_000 * MS)  # captured long ago (a replay)
    assert len(rig.endpoints['cloud'].calls) == 1  # still time for the cloud
    rig.at_ms(100.0, arrival)
    (_, decision, _), = rig.sink.fused_results
    assert decision.deadline_ns == arrival + 100 * MS and not decision.late


def test_a_run_time_deadline_change_applies_to_frames_that_start_afterwards():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    first = rig.frame()
    rig.engine.update(deadline=DeadlinePolicy.from_ms(300.0))
    rig.clock.advance_ms(10.0)
    second = rig.frame()
    rig.at_ms(100.0, first)
    assert [d.stamp_ns for d in rig.sink.decisions] == [first]
    rig.at_ms(300.0, second)
    assert [d.deadline_ns - d.stamp_ns for d in rig.sink.decisions] == [100 * MS, 300 * MS]
    # Each frame's account reports its own deadline, not the one in force when it settles.
    assert [frame.deadline_ms for frame, _ in rig.sink.settled_frames] == [100.0, 300.0]


# What wins ----------------------------------------------------------------------------------

def test_the_fused_result_is_the_winners_detections_and_the_winner_is_named():
    rig = Rig({'cloud': 10})
    stamp = rig.frame()
    rig.clock.advance_ms(10.0)
    rig.call('cloud').reply(CLOUD_RESULT)
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'cloud' and same(decision.detections, CLOUD_RESULT)
    assert rig.sink.cloud_results == [(stamp, 'cloud', CLOUD_RESULT)]
    assert same(rig.sink.local_results[0][1], LOCAL_RESULT)  # local has its own output


def test_two_endpoints_the_higher_priority_wins_even_arriving_second():
    rig = Rig({'near': 10, 'far': 20})
    stamp = rig.frame()
    rig.clock.advance_ms(10.0)
    rig.call('near').reply(CLOUD_RESULT)
    assert rig.sink.fused_results == []  # the better source is still pending before the deadline
    rig.clock.advance_ms(10.0)
    rig.call('far').reply(BETTER_CLOUD_RESULT)
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'far' and same(decision.detections, BETTER_CLOUD_RESULT)
    assert decision.released_ns == stamp + 20 * MS + 20 * MS  # inference 20 + two replies


def test_two_endpoints_the_lower_priority_wins_when_the_higher_misses_the_deadline():
    rig = Rig({'near': 10, 'far': 20}, deadline_ms=100.0)
    stamp = rig.frame()
    rig.call('near').reply(CLOUD_RESULT)
    rig.at_ms(100.0, stamp)
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'near' and same(decision.detections, CLOUD_RESULT)
    assert rig.call('far').cancelled


def test_two_endpoints_the_lower_priority_wins_at_once_when_the_higher_fails():
    rig = Rig({'near': 10, 'far': 20}, deadline_ms=100.0)
    stamp = rig.frame()
    rig.call('near').reply(CLOUD_RESULT)
    rig.clock.advance_ms(5.0)
    rig.call('far').fail('UNAVAILABLE: connection reset')
    (_, decision, released_ns), = rig.sink.fused_results
    assert decision.winner == 'near' and released_ns < stamp + 100 * MS


def test_an_unhealthy_endpoint_is_skipped_and_local_is_published_without_waiting():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    rig.endpoints['cloud'].healthy = False
    stamp = rig.frame()
    assert rig.endpoints['cloud'].calls == []
    (_, decision, released_ns), = rig.sink.fused_results
    assert decision.winner == 'local' and released_ns == stamp + 20 * MS


def test_a_paced_endpoint_is_skipped_and_counted():
    rig = Rig({'cloud': 10}, deadline_ms=1000.0)
    for _ in range(5):  # the dispatcher allows 4 outstanding calls per endpoint
        rig.frame()
        rig.clock.advance_ms(5.0)
    assert len(rig.endpoints['cloud'].calls) == 4
    assert rig.engine.counters['cloud_skipped'] == 1


def test_cloud_disabled_at_run_time_sends_nothing_and_decides_on_local():
    rig = Rig({'cloud': 10})
    rig.engine.update(cloud_enabled=False)
    rig.frame()
    assert rig.endpoints['cloud'].calls == []
    assert rig.sink.decisions[0].winner == 'local'


# What is sent -------------------------------------------------------------------------------

def test_max_image_side_downscales_what_is_sent_and_keeps_the_original_size():
    rig = Rig({'cloud': 10}, max_image_side=32)
    rig.frame(image=np.full((48, 64, 3), 90, np.uint8))
    sent = rig.call('cloud').frame
    assert (sent.width, sent.height, sent.original_width, sent.original_height) == (32, 24, 64, 48)
    assert decode_rgb(sent.data, 'jpeg').shape == (24, 32, 3)


def test_jpeg_quality_is_what_the_frame_is_encoded_with():
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    sizes = {}
    for quality in (20, 95):
        rig = Rig({'cloud': 10}, jpeg_quality=quality)
        rig.frame(image=noisy)
        sizes[quality] = rig.call('cloud').frame.nbytes
    assert sizes[20] < sizes[95] / 2


# Counting, ordering, batching ---------------------------------------------------------------

def test_every_processed_frame_gets_exactly_one_fused_result_in_stamp_order():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    stamps = []
    for i in range(12):
        stamps.append(rig.frame())
        call = rig.call('cloud')
        if i % 3 == 0:
            call.reply(CLOUD_RESULT)
        elif i % 3 == 1:
            call.fail('UNAVAILABLE')
        rig.clock.advance_ms(40.0)
        rig.engine.tick()
    rig.at_ms(1_000.0, stamps[-1])
    assert [d.stamp_ns for d in rig.sink.decisions] == stamps
    assert rig.engine.counters['frames_processed'] == 12 == len(rig.sink.settled_frames)
    assert [d.winner for d in rig.sink.decisions] == ['cloud', 'local', 'local'] * 4


def test_frames_of_several_cameras_waiting_together_share_one_forward_pass():
    rig = Rig()
    stamp = rig.clock()
    for camera in ('front', 'left', 'right'):
        rig.engine.submit(camera, IMAGE, stamp, camera, camera)
    assert rig.engine.process(timeout_s=0) == 3
    assert rig.detector.batches == [3]
    assert sorted(f.camera for f, _, _ in rig.sink.fused_results) == ['front', 'left', 'right']
    assert rig.engine.counters['local_batched_frames'] == 3


def test_without_camera_batching_each_frame_has_its_own_pass():
    rig = Rig()
    rig.engine._batch_cameras = False
    for camera in ('front', 'left'):
        rig.engine.submit(camera, IMAGE, rig.clock(), camera, camera)
    rig.engine.process(timeout_s=0)
    assert rig.detector.batches == [1, 1]


def test_a_newer_frame_replaces_the_one_still_waiting_and_the_drop_is_counted():
    rig = Rig()
    stamp = rig.clock()
    rig.engine.submit('front', IMAGE, stamp, 'f', 'front')
    rig.engine.submit('front', IMAGE, stamp + 1, 'f', 'front')
    rig.engine.process(timeout_s=0)
    assert [d.stamp_ns for d in rig.sink.decisions] == [stamp + 1]
    assert rig.engine.snapshot()['dropped_frames'] == 1


def test_a_frame_stamped_before_the_cameras_newest_is_stale_and_dropped():
    rig = Rig()
    stamp = rig.frame()
    rig.frame(stamp_ns=stamp - 1)
    assert len(rig.sink.fused_results) == 1 and rig.engine.counters['stale_frames'] == 1


# Bad input and failures ---------------------------------------------------------------------

@pytest.mark.parametrize('bad', [None, b'\xff\xd8', np.zeros((4, 4), np.uint8)])
def test_a_malformed_frame_is_counted_and_the_engine_goes_on(bad):
    rig = Rig({'cloud': 10})
    rig.frame(image=bad)
    assert rig.engine.counters['invalid_images'] == 1 and rig.sink.fused_results == []
    rig.frame()
    assert len(rig.sink.local_results) == 1


def test_a_failing_inference_resolves_its_frame_and_the_next_frame_is_served():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    rig.detector.fail_next = True
    stamp = rig.frame()
    (_, decision, _), = rig.sink.fused_results  # abandoned: decided at once, its call cancelled
    assert decision.winner is None and rig.call('cloud').cancelled
    rig.clock.now_ns = stamp + 200 * MS
    rig.frame()
    rig.call('cloud').reply(CLOUD_RESULT)
    assert [d.winner for d in rig.sink.decisions] == [None, 'cloud']
    assert rig.engine.counters['frame_errors'] == 1


def test_an_output_that_raises_on_one_frame_does_not_stop_the_next():
    rig = Rig()
    rig.sink.failing_outputs = 1
    rig.frame()
    rig.clock.advance_ms(10.0)
    rig.frame()
    assert rig.engine.counters['frame_errors'] == 1
    assert len(rig.sink.fused_results) == 1 and len(rig.sink.settled_frames) == 2


def test_stop_decides_every_open_frame_with_the_results_in_hand():
    rig = Rig({'cloud': 10}, deadline_ms=10_000.0)
    rig.frame()
    assert rig.sink.fused_results == []
    rig.engine.stop('node deactivated')
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'local' and rig.call('cloud').cancelled


def test_the_debug_image_is_kept_only_when_the_sink_wants_it():
    for keep in (False, True):
        rig = Rig()
        rig.sink.keep_images = keep
        rig.frame()
        frame, _, _ = rig.sink.fused_results[0]
        assert (frame.rgb is IMAGE) is keep


def test_a_clock_jump_keeps_open_frames_budget():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    stamp = rig.frame()
    rig.clock.now_ns -= 5_000 * MS  # simulated time jumped back 5 s
    rig.engine.shift_clock(-5_000 * MS)
    rig.at_ms(100.0 - 5_000.0, stamp)
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'local' and not decision.late
    assert rig.engine.counters['clock_resets'] == 1


# The uplink ---------------------------------------------------------------------------------

def _slow_link_rig(probe_interval_s: float = 10.0) -> Rig:
    """Return a rig whose uplink has learned a 0.4 s, 100 kB/s link to the cloud."""
    rig = Rig({'cloud': 10}, deadline_ms=150.0, uplink='adaptive')
    rig.engine.uplink = AdaptiveUplink(clock=lambda: rig.clock() / 1e9,
                                       probe_interval_s=probe_interval_s)
    for nbytes in (5_000, 20_000, 40_000) * 4:
        rig.engine.uplink.replied('cloud', nbytes, 0.4 + nbytes / 100_000, 0.05)
    return rig


def test_the_adaptive_uplink_skips_a_frame_predicted_to_arrive_late_and_local_wins_at_once():
    rig = _slow_link_rig()
    rig.engine.uplink._last_send_s = rig.clock() / 1e9  # a frame went out just now: no probe
    stamp = rig.frame(image=LARGE_IMAGE)
    assert rig.endpoints['cloud'].calls == []
    (_, decision, released_ns), = rig.sink.fused_results
    assert decision.winner == 'local' and released_ns == stamp + 20 * MS  # no wait for nothing
    assert rig.engine.counters['cloud_skipped_uplink'] == 1
    (_, record), = rig.sink.settled_frames
    assert record.attempts['cloud'].error.startswith('SKIPPED')


def test_the_adaptive_uplink_still_probes_a_slow_link_at_the_smallest_size():
    rig = _slow_link_rig(probe_interval_s=1.0)
    rig.frame(image=LARGE_IMAGE)  # nothing was sent for longer than the probe interval
    smallest = rig.engine.uplink.ladder[-1]
    sent = rig.call('cloud').frame
    assert max(sent.width, sent.height) == smallest.max_image_side
    rig.clock.advance_ms(100.0)
    rig.frame(image=LARGE_IMAGE)  # within the interval: skipped
    assert len(rig.endpoints['cloud'].calls) == 1
    assert rig.engine.counters['cloud_skipped_uplink'] == 1


def test_the_adaptive_uplink_sends_full_quality_over_a_fast_link():
    rig = Rig({'cloud': 10}, deadline_ms=300.0, uplink='adaptive')
    for nbytes in (5_000, 20_000, 40_000) * 4:
        rig.engine.uplink.replied('cloud', nbytes, 0.005 + nbytes / 50_000_000, 0.01)
    rig.frame(image=LARGE_IMAGE)
    sent = rig.call('cloud').frame
    assert (sent.width, sent.height) == (640, 480)
    fixed = Rig({'cloud': 10})
    fixed.frame(image=LARGE_IMAGE)
    assert sent.nbytes == fixed.call('cloud').frame.nbytes  # the best rung is quality 80


def test_every_reply_and_timeout_teaches_the_uplink_and_bytes_are_counted():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    for reply in range(3):
        stamp = rig.frame(image=LARGE_IMAGE)
        rig.call('cloud').reply(CLOUD_RESULT)
        rig.at_ms(100.0, stamp)
    rig.frame(image=LARGE_IMAGE)
    rig.call('cloud').fail_after('DEADLINE_EXCEEDED: Deadline Exceeded', 80.0)
    snapshot = rig.engine.snapshot()
    assert snapshot['uplink_cloud_rtt_ms'] >= 0 and snapshot['uplink_cloud_throughput_kbps'] > 0
    assert rig.engine.uplink._links['cloud'].samples == 4  # three replies and one timeout
    sent = [c.frame.nbytes for c in rig.endpoints['cloud'].calls]
    assert snapshot['cloud_bytes_sent'] == sum(sent) and snapshot['cloud_frames_sent'] == 4


def test_an_unknown_uplink_setting_is_refused():
    with pytest.raises(ValueError, match='uplink'):
        EngineSettings(uplink='psychic')
    with pytest.raises(ValueError):
        EngineSettings(jpeg_quality=0)


# Sending on the sender thread ---------------------------------------------------------------

def _concurrent_rig() -> tuple[SpeculativeEngine[np.ndarray, str], RecordingSink,
                               ScriptedEndpoint]:
    clock = ManualClock()
    sink = RecordingSink(clock)
    endpoint = ScriptedEndpoint('cloud')
    engine: SpeculativeEngine[np.ndarray, str] = SpeculativeEngine(
        ScriptedDetector(clock, 20.0), identity, sink,
        cloud=CloudDispatcher([endpoint], {'cloud': 10}), clock=clock,
        settings=EngineSettings(DeadlinePolicy.from_ms(100.0)), concurrent_send=True)
    return engine, sink, endpoint


def test_with_a_sender_thread_the_frame_is_sent_before_process_returns_and_the_cloud_wins():
    engine, sink, endpoint = _concurrent_rig()
    engine.submit('front', LARGE_IMAGE, 1_000 * MS, 'f', 'front')
    engine.process(timeout_s=0)
    (call,) = endpoint.calls  # the send was waited for: no frame's send outlives its turn
    assert call.frame.width == 640 and sink.fused_results == []
    call.reply(CLOUD_RESULT)
    assert sink.decisions[0].winner == 'cloud'
    assert engine.snapshot()['node_overhead_ms_p50'] > 0
    engine.stop()
    assert engine._sender is None


def test_with_a_sender_thread_a_failing_submit_fails_only_the_cloud_source():
    engine, sink, endpoint = _concurrent_rig()

    def broken(*args: object) -> ScriptedCall:
        raise ConnectionError('socket closed')

    endpoint.submit = broken  # type: ignore[method-assign]
    engine.submit('front', IMAGE, 1_000 * MS, 'f', 'front')
    engine.process(timeout_s=0)
    (_, decision, released_ns), = sink.fused_results
    assert decision.winner == 'local' and released_ns == 1_020 * MS  # not held to the deadline
    (_, record), = sink.settled_frames
    assert 'socket closed' in record.attempts['cloud'].error
    engine.stop()


# What the engine logs and counts ------------------------------------------------------------

def test_a_malformed_frame_is_logged_with_its_camera_and_repeats_are_throttled():
    rig = Rig()
    rig.frame(camera='', image=None)
    rig.frame(camera='front', image=None)
    assert rig.log.texts('error') == [
        "dropping image of camera 'image': not an RGB image: NoneType"]
    assert rig.engine.counters['invalid_images'] == 2


def test_stale_frames_and_clock_resets_are_counted_and_a_reset_is_logged():
    rig = Rig()
    stamp = rig.frame(camera='front')
    rig.frame(camera='front', stamp_ns=stamp - 1_000_000_000)  # within the default 1 s: stale
    rig.frame(camera='front', stamp_ns=stamp - 1_000_000_000)
    assert rig.engine.counters['stale_frames'] == 2
    rig.frame(camera='front', stamp_ns=stamp - 1_000_000_001)  # beyond it: the clock reset
    rig.frame(camera='', stamp_ns=5_000_000_000)
    rig.frame(camera='', stamp_ns=2_000_000_000)
    assert rig.engine.counters['clock_resets'] == 2
    assert rig.log.texts('warning') == [
        f'camera front: stamp stepped back to {(stamp - 1_000_000_001) / 1e9:.3f} s; its frame '
        'ordering restarts',
        'camera image: stamp stepped back to 2.000 s; its frame ordering restarts']
    assert len(rig.sink.fused_results) == 4


def test_a_zero_stamp_tolerance_makes_any_step_back_a_reset():
    rig = Rig(engine_options={'stamp_backstep_tolerance_ns': 0})
    stamp = rig.frame()
    rig.frame(stamp_ns=stamp - 1)
    assert rig.engine.counters['clock_resets'] == 1 and rig.engine.counters['stale_frames'] == 0


def test_a_failing_inference_is_logged_and_its_frame_is_abandoned_with_the_error():
    rig = Rig({'cloud': 10})
    rig.endpoints['cloud'].resolves_on_cancel = False
    rig.detector.fail_next = True
    stamp = rig.frame()
    error = "RuntimeError('CUDA error: an illegal memory access was encountered')"
    assert rig.log.texts('error') == [f"frame {stamp / 1e9:.3f} of 'front_optical' failed: "
                                      f'{error}']
    rig.call('cloud').fail('CANCELLED')
    (_, record), = rig.sink.settled_frames
    assert record.attempts['local'].error == error


def test_outputs_that_raise_are_logged_and_every_frame_still_settles():
    rig = Rig({'cloud': 10})
    rig.sink.failing_outputs = 1
    rig.sink.failing_accounts = 1
    rig.frame()
    rig.call('cloud').reply(CLOUD_RESULT)
    rig.clock.advance_ms(10.0)
    rig.frame()
    rig.call('cloud').reply(CLOUD_RESULT)
    assert rig.log.texts('error') == [
        "publishing a fused result failed: RuntimeError('publisher gone')"]
    assert rig.engine.counters['frame_errors'] == 2
    assert rig.engine.counters['frames_processed'] == 2
    assert len(rig.sink.settled_frames) == 1  # the first account raised; the second went out
    assert rig.engine.snapshot()['open_frames'] == 0


def test_a_cloud_output_that_raises_fails_that_source_with_the_error():
    rig = Rig({'cloud': 10})
    rig.sink.failing_cloud_outputs = 1
    rig.frame()
    rig.call('cloud').reply(CLOUD_RESULT)
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'local'
    (_, record), = rig.sink.settled_frames
    assert record.attempts['cloud'].error == "RuntimeError('cloud publisher gone')"
    assert rig.log.texts('error') == [
        "handling the reply of cloud failed: RuntimeError('cloud publisher gone')"]


def test_a_frame_that_cannot_be_encoded_fails_its_cloud_sources_and_local_still_runs():
    rig = Rig({'cloud': 10})
    rig.frame(image=np.zeros((48, 64, 3), np.float32))  # to_rgb lets it through; encoding won't
    (_, decision, _), = rig.sink.fused_results
    assert decision.winner == 'local' and rig.endpoints['cloud'].calls == []
    (_, record), = rig.sink.settled_frames
    assert record.attempts['cloud'].error.startswith("ValueError('expected an (H, W, 3) uint8")
    assert rig.log.texts('error')[0].startswith('sending a frame to the cloud failed: ValueError(')


def test_a_reply_the_uplink_refuses_to_learn_from_still_wins():
    rig = Rig({'cloud': 10})
    rig.frame()
    call = rig.call('cloud')
    call._finish(CloudReply('cloud', True, CLOUD_RESULT, round_trip_ms=float('nan')))
    assert rig.sink.decisions[0].winner == 'cloud'
    assert rig.log.texts('error')[0].startswith('learning from the reply of cloud failed: '
                                                'ValueError(')
    assert rig.engine.counters['frame_errors'] == 1


def test_a_cancelled_call_is_recorded_as_cancelled_not_failed():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    stamp = rig.frame()
    rig.at_ms(100.0, stamp)
    (_, record), = rig.sink.settled_frames
    assert record.attempts['cloud'].state is SourceState.CANCELLED


def test_stop_abandons_a_frame_whose_call_does_not_end_with_the_reason():
    rig = Rig({'cloud': 10}, deadline_ms=10_000.0)
    rig.endpoints['cloud'].resolves_on_cancel = False
    rig.frame()
    rig.engine.stop('node deactivated')
    (_, record), = rig.sink.settled_frames
    assert record.attempts['cloud'].error == 'node deactivated'
    assert rig.sink.decisions[0].winner == 'local'


# What is sent, and to whom ------------------------------------------------------------------

def test_the_call_carries_the_frame_id_and_stamp_and_the_sink_the_frame_context():
    rig = Rig({'cloud': 10})
    stamp = rig.frame(camera='left')
    call = rig.call('cloud')
    assert (call.frame_id, call.stamp_ns) == ('left_optical', stamp)
    call.reply(CLOUD_RESULT)
    frame, _, _ = rig.sink.fused_results[0]
    assert (frame.camera, frame.frame_id, frame.context) == ('left', 'left_optical', 'left')
    assert rig.sink.asked_for_images == ['left']
    assert rig.detector.images[0] is IMAGE


def test_time_left_at_the_boundary_one_ns_is_sent_none_is_not():
    rig = Rig({'cloud': 10}, deadline_ms=100.0, inference_ms=0.0)
    rig.frame(stamp_ns=rig.clock() - 100 * MS + 1)  # one nanosecond left
    assert rig.call('cloud').timeout_s == pytest.approx(1e-9)
    rig = Rig({'cloud': 10}, deadline_ms=100.0, inference_ms=0.0)
    rig.frame(stamp_ns=rig.clock() - 100 * MS)  # the deadline is now: nothing left
    assert rig.endpoints['cloud'].calls == []
    (_, record), = rig.sink.settled_frames
    assert record.attempts['cloud'].error == 'no time left'


def test_the_adaptive_uplink_with_no_time_left_says_so():
    rig = Rig({'cloud': 10}, deadline_ms=100.0, uplink='adaptive')
    rig.frame(stamp_ns=rig.clock() - 200 * MS)
    (_, record), = rig.sink.settled_frames
    assert record.attempts['cloud'].error == 'no time left'
    assert rig.engine.counters['cloud_skipped_uplink'] == 1


def test_a_skipped_frame_names_the_uplink_and_skips_accumulate():
    rig = _slow_link_rig()
    for _ in range(2):
        rig.engine.uplink._last_send_s = rig.clock() / 1e9
        rig.frame(image=LARGE_IMAGE)
        rig.clock.advance_ms(10.0)
    assert rig.engine.counters['cloud_skipped_uplink'] == 2
    assert {r.attempts['cloud'].error for _, r in rig.sink.settled_frames} == {
        'SKIPPED: the uplink would not deliver it in time'}


class SpyUplink(AdaptiveUplink):
    """An uplink that records what the engine tells it."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple] = []

    def sent(self, encoding, width, height, nbytes, encode_s):  # type: ignore[no-untyped-def]
        self.told.append(('sent', encoding, width, height, nbytes, encode_s))
        super().sent(encoding, width, height, nbytes, encode_s)

    def replied(self, endpoint, nbytes, round_trip_s, server_s):  # type: ignore[no-untyped-def]
        self.told.append(('replied', endpoint, nbytes, round_trip_s, server_s))

    def failed(self, endpoint, nbytes, waited_s, timed_out):  # type: ignore[no-untyped-def]
        self.told.append(('failed', endpoint, nbytes, waited_s, timed_out))


def test_the_uplink_is_told_each_encode_reply_and_failure_in_seconds():
    rig = Rig({'cloud': 10})
    spy = SpyUplink()
    rig.engine.uplink = spy
    rig.frame(image=LARGE_IMAGE)
    call = rig.call('cloud')
    nbytes = call.frame.nbytes
    call._finish(CloudReply('cloud', True, CLOUD_RESULT, round_trip_ms=250.0,
                            server_queue_ms=30.0, server_inference_ms=70.0))
    for error, round_trip_ms in (('DEADLINE_EXCEEDED: Deadline Exceeded', 80.0),
                                 ('UNAVAILABLE: reset', 40.0), ('UNAVAILABLE: at once', 0.0),
                                 ('DEADLINE_EXCEEDED: predicted completion 900 ms from now is '
                                  'after the deadline', 12.0)):
        rig.clock.advance_ms(200.0)
        rig.frame(image=LARGE_IMAGE)
        rig.call('cloud').fail_after(error, round_trip_ms)
    kinds = [told for told in spy.told if told[0] != 'sent']
    assert kinds == [('replied', 'cloud', nbytes, 0.25, pytest.approx(0.1)),
                     ('failed', 'cloud', nbytes, pytest.approx(0.08), True),
                     ('failed', 'cloud', nbytes, pytest.approx(0.04), False),
                     ('failed', 'cloud', nbytes, pytest.approx(0.012), False)]  # server busy
    _, encoding, width, height, sent_bytes, encode_s = spy.told[0]
    assert (encoding, width, height, sent_bytes) == (Encoding(80, 0), 640, 480, nbytes)
    assert encode_s == call.frame.encode_ms / 1e3


# Local inference and accounts ---------------------------------------------------------------

def test_one_camera_uses_detect_and_several_one_batch_counted_across_batches():
    rig = Rig()
    rig.frame(camera='front')
    assert rig.detector.calls == ['detect']
    for _ in range(2):
        rig.clock.advance_ms(50.0)
        for camera in ('front', 'left'):
            rig.engine.submit(camera, IMAGE, rig.clock(), camera, camera)
        rig.engine.process(timeout_s=0)
    assert rig.detector.calls == ['detect', 'batch', 'batch']
    assert rig.engine.counters['local_batched_frames'] == 4


def test_process_with_nothing_waiting_returns_after_its_timeout():
    rig = Rig()
    assert rig.engine.process(timeout_s=0.01) == 0


def test_overhead_is_the_time_besides_inference_shared_by_a_batch():
    rig = Rig(inference_ms=20.0)
    rig.sink.publish_ms = 1.5  # each local result costs 1.5 ms to hand out
    for camera in ('front', 'left', 'right'):
        rig.engine.submit(camera, IMAGE, rig.clock(), camera, camera)
    rig.engine.process(timeout_s=0)
    assert list(rig.engine.stats.overhead_ms) == [pytest.approx(1.5)] * 3


def test_the_snapshot_reports_every_counter_and_figure():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    rig.sink.publish_ms = 0.1234
    rig.engine.uplink.replied('cloud', 30_000, 0.2, 0.05)
    stamp = rig.frame()
    rig.at_ms(100.0, stamp)
    rig.frame(stamp_ns=stamp - 1)  # stale
    rig.clock.advance_ms(5.0)
    rig.frame()  # stays open
    snapshot = rig.engine.snapshot()
    estimates = rig.engine.uplink.snapshot()['cloud']
    assert snapshot == {
        'frames_received': 3, 'frames_processed': 2, 'invalid_images': 0, 'stale_frames': 1,
        'frame_errors': 0, 'clock_resets': 0, 'cloud_skipped': 0, 'cloud_skipped_uplink': 0,
        'cloud_frames_sent': 2, 'cloud_bytes_sent': sum(c.frame.nbytes for c in
                                                        rig.endpoints['cloud'].calls),
        'local_batched_frames': 0, 'local_model_swaps': 0, 'local_model_rollbacks': 0,
        'dropped_frames': 0, 'late': 0, 'no_winner': 0,
        'open_frames': 1, 'cloud_calls': 2, 'cloud_hedged': 0, 'cloud_hedges_denied': 0,
        'node_overhead_ms_p50': 0.123, 'node_overhead_ms_p95': 0.123,
        'node_overhead_ms_p99': 0.123,
        'uplink_cloud_rtt_ms': round(estimates['rtt_ms'], 1),
        'uplink_cloud_throughput_kbps': round(estimates['throughput_kbps'], 1),
        'uplink_cloud_server_ms': round(estimates['server_ms'], 1)}
    assert Rig().engine.snapshot()['node_overhead_ms_p50'] == 0  # nothing measured yet


def test_a_new_engine_carries_on_the_counters_and_stats_of_the_one_it_replaces():
    rig = Rig()
    rig.frame()
    successor: SpeculativeEngine[np.ndarray, str] = SpeculativeEngine(
        rig.detector, identity, rig.sink, clock=rig.clock, history=rig.engine)
    assert successor.counters['frames_processed'] == 1 and successor.stats.frames == 1
    assert SpeculativeEngine(rig.detector, identity, rig.sink).counters['frames_processed'] == 0


# Threads ------------------------------------------------------------------------------------

def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.daemon or t.name.startswith('cloud')}


def test_start_runs_named_daemon_threads_and_stop_ends_them():
    engine, sink, endpoint = _concurrent_rig()
    assert Rig().engine._sender is None  # sending on the worker unless asked otherwise
    engine.start()
    try:
        assert {'detector', 'deadlines'} <= _threads()
        assert all(t.daemon for t in threading.enumerate() if t.name in ('detector', 'deadlines'))
        engine.submit('front', IMAGE, 1_000 * MS, 'f', 'front')
        wait_until(lambda: len(endpoint.calls) == 1, 10.0, 'the frame sent')
        assert any(name.startswith('cloud-sender') for name in _threads())
    finally:
        engine.stop()
    assert not {'detector', 'deadlines'} & _threads()
    assert not any(name.startswith('cloud-sender') for name in _threads())
    engine.start()  # a stopped engine starts again (a lifecycle deactivate, then activate)
    try:
        engine.submit('front', IMAGE, 2_000 * MS, 'f', 'front')
        wait_until(lambda: len(endpoint.calls) == 2, 10.0, 'the frame sent after restart')
    finally:
        engine.stop()


def test_a_thread_that_dies_is_reported_with_its_name_and_traceback():
    log = RecordingLogger()
    reasons: list[str] = []
    engine: SpeculativeEngine[np.ndarray, str] = SpeculativeEngine(
        ScriptedDetector(ManualClock()), identity, RecordingSink(ManualClock()), logger=log,
        on_fatal=reasons.append)
    engine.start()

    def broken(timeout: float | None = None) -> list:
        raise MemoryError('std::bad_alloc')

    engine.slots.take_all = broken  # type: ignore[method-assign,assignment]
    engine.submit('front', IMAGE, 0, 'f', 'front')  # the waiting worker takes it, then dies
    wait_until(lambda: reasons, 10.0, 'the worker to die')
    engine.stop()
    assert reasons == ["detector thread died: MemoryError('std::bad_alloc')"] == [engine.fatal]
    assert len(log.texts('error')) == 1, log.lines
    text = log.texts('error')[0]
    assert text.startswith(reasons[0] + '\nTraceback') and 'std::bad_alloc' in text


def test_a_deadline_tick_that_raises_is_logged_and_the_next_deadline_is_still_applied():
    log = RecordingLogger()
    sink = RecordingSink(ManualClock())
    engine: SpeculativeEngine[np.ndarray, str] = SpeculativeEngine(
        ScriptedDetector(ManualClock(), 0.0), identity, sink,
        cloud=CloudDispatcher([ScriptedEndpoint('cloud')], {'cloud': 10}), logger=log,
        settings=EngineSettings(DeadlinePolicy.from_ms(100.0, 'arrival')))
    real_tick = engine._arbiter.tick
    failures = {'left': 1}

    def flaky(now_ns: int):  # type: ignore[no-untyped-def]
        if failures['left']:
            failures['left'] -= 1
            raise RuntimeError('tick broke')
        return real_tick(now_ns)

    engine._arbiter.tick = flaky  # type: ignore[method-assign]
    engine.start()
    try:
        engine.submit('front', IMAGE, 0, 'f', 'front')
        wait_until(sink.fused_event.is_set, 10.0, 'the fused result after a failed tick')
    finally:
        engine.stop()
    assert "applying deadlines failed: RuntimeError('tick broke')" in log.texts('error')
    assert not engine.fatal


# Over-the-air model swaps -------------------------------------------------------------------

NEW_RESULT = Detections(np.array([[2.0, 2.0, 12.0, 22.0]], np.float32),
                        np.array([0.8], np.float32), np.array([3], np.int64))


class SwappingDetector(ScriptedDetector):
    """A detector during whose inference a background thread swaps in another model."""

    def __init__(self, clock: ManualClock, swap: Callable[[], None]) -> None:
        super().__init__(clock)
        self.swap = swap

    def _run(self, images: Sequence[np.ndarray]) -> list[Detections]:
        self.swap()
        return super()._run(images)


def test_a_swap_between_frames_loses_none_and_each_frame_names_its_model():
    rig = Rig(deadline_ms=100.0)
    rig.engine = SpeculativeEngine(rig.detector, identity, rig.sink, clock=rig.clock,
                                   timer=lambda: rig.clock() / 1e9, local_model='ssd:1')
    new = ScriptedDetector(rig.clock, result=NEW_RESULT)
    stamps = []
    for index in range(6):
        if index == 3:
            rig.engine.swap_local(new, 'ssd:2', probation_frames=2)
        stamps.append(rig.frame())
        rig.clock.advance_ms(50.0)
    assert [f.stamp_ns for f, _, _ in rig.sink.fused_results] == stamps  # every frame, in order
    assert [d.late for d in rig.sink.decisions] == [False] * 6
    assert [f.local_model for f, _ in rig.sink.settled_frames] == ['ssd:1'] * 3 + ['ssd:2'] * 3
    assert [same(d.detections, NEW_RESULT) for d in rig.sink.decisions] == [False] * 3 + [True] * 3
    assert rig.engine.local_model == 'ssd:2'
    assert (rig.engine.counters['local_model_swaps'], rig.engine.counters['local_model_rollbacks'],
            rig.engine.counters['frame_errors']) == (1, 0, 0)


def test_the_batch_in_progress_finishes_on_the_model_it_started_with():
    rig = Rig(deadline_ms=100.0)
    new = ScriptedDetector(rig.clock, result=NEW_RESULT)
    swapping = SwappingDetector(rig.clock, lambda: rig.engine.swap_local(new, 'ssd:2'))
    rig.engine = SpeculativeEngine(swapping, identity, rig.sink, clock=rig.clock,
                                   local_model='ssd:1')
    rig.frame()
    rig.clock.advance_ms(50.0)
    rig.frame()
    assert [f.local_model for f, _ in rig.sink.settled_frames] == ['ssd:1', 'ssd:2']
    assert same(rig.sink.decisions[0].detections, LOCAL_RESULT)
    assert same(rig.sink.decisions[1].detections, NEW_RESULT)


def test_a_new_model_failing_on_probation_is_rolled_back_and_its_frame_still_answered():
    rig = Rig({'cloud': 10}, deadline_ms=100.0)
    rig.engine = SpeculativeEngine(rig.detector, identity, rig.sink, clock=rig.clock,
                                   local_model='ssd:1', logger=rig.log)
    broken = ScriptedDetector(rig.clock, result=NEW_RESULT)
    broken.fail_next = True
    rig.engine.swap_local(broken, 'ssd:broken', probation_frames=3)
    stamp = rig.frame()
    rig.at_ms(100.0, stamp)
    (frame, decision, _), = rig.sink.fused_results
    assert decision.winner == 'local' and not decision.late
    assert same(decision.detections, LOCAL_RESULT) and frame.local_model == 'ssd:1'
    assert rig.engine.local_model == 'ssd:1'
    assert (rig.engine.counters['local_model_rollbacks'], rig.engine.counters['frame_errors']) \
        == (1, 0)
    assert any('rolled back to ssd:1' in text for text in rig.log.texts('error'))


def test_past_probation_a_failure_is_an_ordinary_frame_error_and_the_model_stays():
    rig = Rig(deadline_ms=100.0)
    rig.engine = SpeculativeEngine(rig.detector, identity, rig.sink, clock=rig.clock,
                                   local_model='ssd:1')
    new = ScriptedDetector(rig.clock, result=NEW_RESULT)
    rig.engine.swap_local(new, 'ssd:2', probation_frames=1)
    rig.frame()
    rig.clock.advance_ms(50.0)
    new.fail_next = True
    rig.frame()
    assert rig.engine.local_model == 'ssd:2'
    assert (rig.engine.counters['local_model_rollbacks'], rig.engine.counters['frame_errors']) \
        == (0, 1)
    assert [d.winner for d in rig.sink.decisions] == ['local', None]


def test_a_model_answering_the_wrong_number_of_images_counts_as_failing():
    rig = Rig(deadline_ms=100.0)
    rig.engine = SpeculativeEngine(rig.detector, identity, rig.sink, clock=rig.clock,
                                   local_model='ssd:1')
    short = ScriptedDetector(rig.clock)
    short.detect_batch = lambda images: []  # type: ignore[method-assign]
    rig.engine.swap_local(short, 'ssd:short', probation_frames=5)
    rig.engine.submit('front', IMAGE, rig.clock(), 'f', 'front')
    rig.engine.submit('rear', IMAGE, rig.clock(), 'r', 'rear')
    rig.engine.process(timeout_s=0)
    assert [f.local_model for f, _ in rig.sink.settled_frames] == ['ssd:1', 'ssd:1']
    assert rig.engine.counters['local_model_rollbacks'] == 1
