"""
The simulated drive: the real engine in virtual time, against a modelled network and server.

Deterministic: the network model is seeded and the server's decode and inference take 1 ms
each on a scripted timer.
"""
from __future__ import annotations

import numpy as np
import pytest
from speculative_av.cloud.codec import build_request, encode_frame
from speculative_av.core.deadline import DeadlinePolicy
from speculative_av.core.detections import Detections
from speculative_av.engine.engine import EngineSettings
from speculative_av.netem.profiles import load_profiles, NetworkModel, NetworkProfile
from speculative_av.tools.simulated_drive import DriveFrame, simulate_drive, SimulatedServer

MS = 1_000_000
START_NS = 5_000 * MS
LOCAL_RESULT = Detections(np.array([[1.0, 2.0, 10.0, 20.0]], np.float32),
                          np.array([0.9], np.float32), np.array([1], np.int64))
CLOUD_RESULT = Detections(np.array([[4.0, 4.0, 20.0, 16.0]], np.float32),
                          np.array([0.8], np.float32), np.array([2], np.int64))


class ScriptedCloudDetector:
    """A cloud detector that finds one box and remembers the images it was given."""

    model_name = 'scripted'
    model_version = '1'

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def detect(self, rgb: np.ndarray) -> Detections:
        self.shapes.append(rgb.shape)
        return CLOUD_RESULT


def frames(count: int = 1, local_ms: float = 20.0, period_ms: float = 100.0,
           size: tuple[int, int] = (64, 48)) -> list[DriveFrame]:
    rng = np.random.default_rng(0)
    width, height = size
    return [DriveFrame(START_NS + round(i * period_ms * MS),
                       rng.integers(0, 255, (height, width, 3), dtype=np.uint8),
                       LOCAL_RESULT, local_ms / 1e3) for i in range(count)]


class StepTimer:
    """A timer that advances 1 ms per reading: decode and inference take 1 ms each."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        self.now_s += 0.001
        return self.now_s


def server() -> SimulatedServer:
    return SimulatedServer(ScriptedCloudDetector(), StepTimer())


def settings(deadline_ms: float, **changes: object) -> EngineSettings:
    return EngineSettings(DeadlinePolicy.from_ms(deadline_ms), **changes)  # type: ignore[arg-type]


def drive(drive_frames, profile, deadline_ms, seed=0, **changes):
    cloud = server()
    return cloud, simulate_drive(drive_frames, cloud, NetworkModel(profile, seed),
                                 settings(deadline_ms, **changes))


def same(a: Detections, b: Detections) -> bool:
    return (np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
            and np.array_equal(a.labels, b.labels))


def test_a_cloud_reply_in_time_wins_when_it_arrives():
    (frame,) = frames()
    _, result = drive([frame], NetworkProfile('rtt60', rtt_ms=60.0), deadline_ms=150.0)
    outcome = result.frames[frame.stamp_ns]
    (call,) = result.calls
    assert outcome.decision is not None and outcome.decision.winner == 'cloud'
    assert same(outcome.decision.detections, CLOUD_RESULT)
    assert call.reply_ns is not None and 60 * MS <= call.reply_ns - frame.stamp_ns < 70 * MS
    assert outcome.decision.released_ns == call.reply_ns  # at once, not at the deadline
    assert result.cloud_in_time(frame.stamp_ns) is not None


def test_a_cloud_reply_after_the_deadline_leaves_the_local_result_at_the_deadline():
    (frame,) = frames()
    _, result = drive([frame], NetworkProfile('rtt60', rtt_ms=60.0), deadline_ms=50.0)
    decision = result.frames[frame.stamp_ns].decision
    (call,) = result.calls
    assert decision is not None and decision.winner == 'local' and not decision.late
    assert same(decision.detections, LOCAL_RESULT)
    assert decision.released_ns == decision.deadline_ns == frame.stamp_ns + 50 * MS
    assert not call.in_time and call.timeout_ns == decision.deadline_ns
    assert result.cloud_in_time(frame.stamp_ns) is None
    record = result.frames[frame.stamp_ns].record
    assert record is not None and 'DEADLINE_EXCEEDED' in record.attempts['cloud'].error


def test_an_outage_fails_the_call_at_its_timeout():
    (frame,) = frames()
    profile = NetworkProfile('down', rtt_ms=10.0, outages=((0.0, 60.0),))
    _, result = drive([frame], profile, deadline_ms=100.0)
    (call,) = result.calls
    assert call.reply_ns is None
    decision = result.frames[frame.stamp_ns].decision
    assert decision is not None and decision.winner == 'local'
    assert decision.released_ns == frame.stamp_ns + 100 * MS


def test_a_cloud_reply_during_a_slow_local_inference_wins_at_its_own_time():
    (frame,) = frames(local_ms=200.0)
    _, result = drive([frame], NetworkProfile('rtt40', rtt_ms=40.0), deadline_ms=150.0)
    decision = result.frames[frame.stamp_ns].decision
    assert decision is not None and decision.winner == 'cloud' and not decision.late
    assert decision.released_ns < frame.stamp_ns + 50 * MS


def test_a_local_detector_slower_than_the_deadline_without_cloud_is_late():
    (frame,) = frames(local_ms=200.0)
    _, result = drive([frame], NetworkProfile('rtt400', rtt_ms=400.0), deadline_ms=150.0)
    decision = result.frames[frame.stamp_ns].decision
    assert decision is not None and decision.winner == 'local' and decision.late
    assert decision.released_ns == frame.stamp_ns + 200 * MS


def test_bytes_counted_are_the_real_encoded_sizes_and_the_server_sees_the_sent_jpeg():
    drive_frames = frames(3, size=(160, 120))
    for quality, side in ((90, 0), (30, 80)):
        server, result = drive(drive_frames, NetworkProfile('lan', rtt_ms=1.0), 500.0,
                               jpeg_quality=quality, max_image_side=side)
        for frame in drive_frames:
            encoded = encode_frame(frame.rgb, jpeg_quality=quality, max_image_side=side)
            (call,) = [c for c in result.calls if c.stamp_ns == frame.stamp_ns]
            assert result.bytes_sent(frame.stamp_ns) == call.image_bytes == encoded.nbytes
            assert call.request_bytes == build_request(
                encoded, 'camera', frame.stamp_ns, call.timeout_ns - frame.stamp_ns
                + 1_700_000_000 * 10**9).ByteSize() > encoded.nbytes
        assert server.detector.shapes == [(60, 80, 3) if side else (120, 160, 3)] * 3
        # The server answers in the camera's coordinates, as the live one does.
        cloud = result.cloud_in_time(drive_frames[0].stamp_ns)
        assert cloud is not None
        np.testing.assert_allclose(cloud.boxes, CLOUD_RESULT.boxes * (2 if side else 1))


def test_each_distinct_jpeg_is_served_once_across_drives():
    drive_frames = frames(3)
    cloud = server()
    for deadline_ms in (50.0, 200.0):
        simulate_drive(drive_frames, cloud, NetworkModel(NetworkProfile('lan')),
                       settings(deadline_ms))
    assert len(cloud.answers) == 3
    simulate_drive(drive_frames, cloud, NetworkModel(NetworkProfile('lan')),
                   settings(200.0, jpeg_quality=20))
    assert len(cloud.answers) == 6


def test_under_a_jittery_network_cloud_wins_exactly_when_its_modelled_reply_is_in_time():
    profile = load_profiles()['poor-lte']
    drive_frames = frames(40, period_ms=100.0)
    server, result = drive(drive_frames, profile, deadline_ms=135.0, seed=7)
    network = NetworkModel(profile, 7)  # the same draws, in the same order
    winners = set()
    assert len(result.calls) == len(drive_frames)
    for frame, call in zip(drive_frames, result.calls):
        answer = server.answer(encode_frame(frame.rgb), frame.stamp_ns)
        delay_s = network.request_delay_s((call.sent_ns - START_NS) / 1e9, call.request_bytes,
                                          answer.response_bytes)
        expected = (None if delay_s is None else call.sent_ns + round(
            (delay_s + answer.decode_s + answer.inference_s) * 1e9))
        assert call.reply_ns == expected
        decision = result.frames[frame.stamp_ns].decision
        assert decision is not None
        in_time = expected is not None and expected <= frame.stamp_ns + 135 * MS
        assert decision.winner == ('cloud' if in_time else 'local')
        winners.add(decision.winner)
    assert winners == {'cloud', 'local'}  # both happen: jitter straddles the deadline


def test_frames_arriving_while_the_detector_is_busy_wait_and_each_gets_one_decision():
    drive_frames = frames(10, local_ms=250.0, period_ms=100.0)
    _, result = drive(drive_frames, NetworkProfile('rtt40', rtt_ms=40.0), deadline_ms=100.0)
    decided = sorted(result.frames)
    assert result.counters['dropped_frames'] > 0  # newer frames replaced waiting ones
    assert len(decided) == result.counters['frames_processed'] < len(drive_frames)
    assert len(decided) + result.counters['dropped_frames'] == len(drive_frames)
    assert all(result.frames[s].decision is not None for s in decided)
    # A frame taken after its deadline had passed is not sent ('no time left').
    sent = {c.stamp_ns for c in result.calls}
    assert sent <= set(decided) and all(
        result.frames[s].record.attempts['cloud'].error == 'no time left'  # type: ignore
        for s in set(decided) - sent)


def test_bad_drives_are_refused():
    cloud = server()
    network = NetworkModel(NetworkProfile('lan'))
    with pytest.raises(ValueError, match='at least one frame'):
        simulate_drive([], cloud, network, settings(100.0))
    with pytest.raises(ValueError, match='increasing stamp order'):
        simulate_drive(frames(2)[::-1], cloud, network, settings(100.0))
    with pytest.raises(ValueError, match='cloud_speedup'):
        simulate_drive(frames(1), cloud, network, settings(100.0), cloud_speedup=0.0)


def test_the_adaptive_uplink_on_a_slow_link_sends_fewer_bytes_all_counted():
    drive_frames = frames(30, size=(160, 120))
    slow = NetworkProfile('slow', rtt_ms=40.0, bandwidth_mbps=0.5)
    _, fixed = drive(drive_frames, slow, deadline_ms=170.0)
    _, adaptive = drive(drive_frames, slow, deadline_ms=170.0, uplink='adaptive')
    sent = {c.stamp_ns: c.image_bytes for c in adaptive.calls}
    assert len(sent) + adaptive.counters['cloud_skipped_uplink'] == len(drive_frames)
    for frame in drive_frames:
        assert adaptive.bytes_sent(frame.stamp_ns) == sent.get(frame.stamp_ns, 0)
        assert adaptive.frames[frame.stamp_ns].decision is not None
    total = sum(sent.values())
    assert total < sum(fixed.bytes_sent(f.stamp_ns) for f in drive_frames)


def test_each_settled_frame_is_handed_on_once_after_all_its_sources_finished():
    settled = []
    drive_frames = frames(4)
    result = simulate_drive(drive_frames, server(), NetworkModel(NetworkProfile('lan')),
                            settings(100.0),
                            on_settled=lambda frame, record: settled.append((frame, record)))
    assert [frame.stamp_ns for frame, _ in settled] == [f.stamp_ns for f in drive_frames]
    for frame, record in settled:
        assert record.decision is result.frames[frame.stamp_ns].decision
        assert {name: attempt.detections is not None
                for name, attempt in record.attempts.items()} == {'local': True, 'cloud': True}
