"""The arbitration policy, branch by branch, on an injected clock (milliseconds -> ns)."""
import numpy as np
import pytest

from speculative_av.core.arbiter import Arbiter, Source, SourceState
from speculative_av.core.detections import Detections
from speculative_av.core.stats import SpeculationStats

LOCAL = Source('local', 0, cancellable=False)
CLOUD = Source('cloud', 10)
EDGE = Source('edge', 10)
DATACENTER = Source('datacenter', 20)
MS = 1_000_000


def dets(label: int) -> Detections:
    return Detections(np.array([[0, 0, 10, 10]]), np.array([0.9]), np.array([label]))


@pytest.fixture
def arbiter():
    return Arbiter()


def open_frame(arbiter, sources=(LOCAL, CLOUD), stamp_ms=0, deadline_ms=100, camera='cam'):
    return arbiter.open(camera, stamp_ms * MS, stamp_ms * MS, deadline_ms * MS, list(sources))


def test_cloud_in_time_wins_the_moment_it_arrives_even_before_local(arbiter):
    key = open_frame(arbiter)
    out = arbiter.arrive(key, 'cloud', dets(2), 40 * MS)
    [decision] = out.decisions
    assert (decision.winner, decision.released_ns, decision.late) == ('cloud', 40 * MS, False)
    assert decision.detections.labels.tolist() == [2]
    assert out.settled == []  # local still running
    out = arbiter.arrive(key, 'local', dets(1), 60 * MS)
    assert out.decisions == []
    [record] = out.settled
    assert record.latency_ms('local') == 60 and record.latency_ms('cloud') == 40


def test_local_first_waits_for_the_higher_priority_cloud(arbiter):
    key = open_frame(arbiter)
    assert arbiter.arrive(key, 'local', dets(1), 20 * MS).decisions == []
    [decision] = arbiter.arrive(key, 'cloud', dets(2), 90 * MS).decisions
    assert (decision.winner, decision.released_ns) == ('cloud', 90 * MS)


def test_deadline_publishes_local_and_cancels_the_cloud_call(arbiter):
    key = open_frame(arbiter)
    arbiter.arrive(key, 'local', dets(1), 20 * MS)
    assert arbiter.tick(99 * MS).decisions == []
    out = arbiter.tick(100 * MS)
    [decision] = out.decisions
    assert (decision.winner, decision.released_ns, decision.late) == ('local', 100 * MS, False)
    assert out.cancel == [(key, 'cloud')]
    assert arbiter.tick(101 * MS).cancel == []  # asked once only
    out = arbiter.cancelled(key, 'cloud', 101 * MS)
    [record] = out.settled
    assert record.attempts['cloud'].state is SourceState.CANCELLED
    assert record.missed_deadline('cloud') and not record.missed_deadline('local')


def test_cloud_arriving_after_the_deadline_decision_changes_nothing(arbiter):
    key = open_frame(arbiter)
    arbiter.arrive(key, 'local', dets(1), 20 * MS)
    arbiter.tick(100 * MS)
    out = arbiter.arrive(key, 'cloud', dets(2), 120 * MS)
    assert out.decisions == [] and len(out.settled) == 1


def test_nothing_by_the_deadline_then_first_arrival_wins_marked_late(arbiter):
    key = open_frame(arbiter)
    out = arbiter.tick(100 * MS)
    assert out.decisions == [] and out.cancel == []  # keep waiting: nothing to publish yet
    out = arbiter.fail(key, 'cloud', 101 * MS, 'DEADLINE_EXCEEDED')
    assert out.decisions == []
    [decision] = arbiter.arrive(key, 'local', dets(1), 130 * MS).decisions
    assert (decision.winner, decision.late, decision.released_ns) == ('local', True, 130 * MS)


def test_a_cloud_error_before_the_deadline_publishes_local_at_once(arbiter):
    key = open_frame(arbiter)
    arbiter.arrive(key, 'local', dets(1), 20 * MS)
    [decision] = arbiter.fail(key, 'cloud', 25 * MS, 'UNAVAILABLE').decisions
    assert (decision.winner, decision.released_ns) == ('local', 25 * MS)


def test_every_source_failing_still_yields_exactly_one_empty_result(arbiter):
    key = open_frame(arbiter)
    assert arbiter.fail(key, 'cloud', 10 * MS, 'UNAVAILABLE').decisions == []
    out = arbiter.fail(key, 'local', 30 * MS, 'inference error')
    [decision] = out.decisions
    assert decision.winner is None and len(decision.detections) == 0 and not decision.late
    assert len(out.settled) == 1 and arbiter.open_frames() == 0


def test_local_only_frame_publishes_when_local_arrives(arbiter):
    key = open_frame(arbiter, sources=[LOCAL])
    [decision] = arbiter.arrive(key, 'local', dets(1), 5 * MS).decisions
    assert decision.winner == 'local'


def test_several_endpoints_nearer_result_waits_for_the_higher_priority_one(arbiter):
    key = open_frame(arbiter, sources=[LOCAL, EDGE, DATACENTER])
    arbiter.arrive(key, 'local', dets(1), 10 * MS)
    assert arbiter.arrive(key, 'edge', dets(2), 30 * MS).decisions == []
    [decision] = arbiter.arrive(key, 'datacenter', dets(3), 80 * MS).decisions
    assert decision.winner == 'datacenter'


def test_several_endpoints_deadline_takes_best_arrived(arbiter):
    key = open_frame(arbiter, sources=[LOCAL, EDGE, DATACENTER])
    arbiter.arrive(key, 'local', dets(1), 10 * MS)
    arbiter.arrive(key, 'edge', dets(2), 30 * MS)
    out = arbiter.tick(100 * MS)
    assert [d.winner for d in out.decisions] == ['edge']
    assert out.cancel == [(key, 'datacenter')]


def test_top_priority_arrival_cancels_lower_cloud_calls_that_can_no_longer_win(arbiter):
    key = open_frame(arbiter, sources=[LOCAL, EDGE, DATACENTER])
    out = arbiter.arrive(key, 'datacenter', dets(3), 30 * MS)
    assert [d.winner for d in out.decisions] == ['datacenter']
    assert out.cancel == [(key, 'edge')]  # local is not cancellable and keeps running


def test_mid_priority_arrival_cancels_lower_ones_but_keeps_waiting_for_higher(arbiter):
    low = Source('low', 5)
    key = open_frame(arbiter, sources=[LOCAL, low, EDGE, DATACENTER])
    out = arbiter.arrive(key, 'edge', dets(2), 30 * MS)
    assert out.decisions == [] and out.cancel == [(key, 'low')]


def test_decisions_are_released_in_stamp_order_per_camera(arbiter):
    first = open_frame(arbiter, stamp_ms=0, deadline_ms=100)
    second = open_frame(arbiter, stamp_ms=33, deadline_ms=133)
    other_camera = open_frame(arbiter, stamp_ms=10, deadline_ms=110, camera='rear')
    assert arbiter.arrive(second, 'cloud', dets(2), 50 * MS).decisions == []  # held back
    [rear] = arbiter.arrive(other_camera, 'cloud', dets(5), 55 * MS).decisions
    assert rear.key.camera == 'rear'  # cameras do not wait for each other
    arbiter.arrive(first, 'local', dets(1), 60 * MS)
    out = arbiter.tick(100 * MS)
    assert [(d.key.seq, d.winner) for d in out.decisions] == [(0, 'local'), (1, 'cloud')]
    assert out.decisions[1].decided_ns == 50 * MS and out.decisions[1].released_ns == 100 * MS


def test_stale_or_repeated_stamps_are_rejected(arbiter):
    assert open_frame(arbiter, stamp_ms=50, deadline_ms=150) is not None
    assert open_frame(arbiter, stamp_ms=50, deadline_ms=150) is None
    assert open_frame(arbiter, stamp_ms=40, deadline_ms=140) is None
    assert open_frame(arbiter, stamp_ms=40, deadline_ms=140, camera='rear') is not None


def test_duplicate_and_unknown_results_are_ignored(arbiter):
    key = open_frame(arbiter)
    arbiter.arrive(key, 'cloud', dets(2), 10 * MS)
    assert arbiter.arrive(key, 'cloud', dets(9), 11 * MS).decisions == []
    arbiter.arrive(key, 'local', dets(1), 20 * MS)
    assert arbiter.arrive(key, 'local', dets(1), 21 * MS).settled == []  # already settled


def test_next_deadline_tracks_undecided_frames(arbiter):
    assert arbiter.next_deadline_ns() is None
    first = open_frame(arbiter, stamp_ms=0, deadline_ms=100)
    open_frame(arbiter, stamp_ms=33, deadline_ms=133)
    assert arbiter.next_deadline_ns() == 100 * MS
    arbiter.arrive(first, 'cloud', dets(2), 10 * MS)
    assert arbiter.next_deadline_ns() == 133 * MS


def test_open_requires_a_source(arbiter):
    with pytest.raises(ValueError, match='^a frame needs at least one source$'):
        arbiter.open('cam', 0, 0, 100, [])


def test_stats_count_wins_misses_latencies_and_lateness(arbiter):
    stats = SpeculationStats()
    frames = []
    for i in range(4):
        frames.append(open_frame(arbiter, stamp_ms=i * 1000, deadline_ms=i * 1000 + 100))
    records = []
    # frame 0: cloud wins; frame 1: cloud too slow; frame 2: cloud error; frame 3: late local
    records += arbiter.arrive(frames[0], 'cloud', dets(2), 40 * MS).settled
    records += arbiter.arrive(frames[0], 'local', dets(1), 30 * MS).settled
    arbiter.arrive(frames[1], 'local', dets(1), 1030 * MS)
    arbiter.tick(1102 * MS)
    records += arbiter.cancelled(frames[1], 'cloud', 1103 * MS).settled
    arbiter.arrive(frames[2], 'local', dets(1), 2030 * MS)
    records += arbiter.fail(frames[2], 'cloud', 2040 * MS, 'UNAVAILABLE').settled
    arbiter.fail(frames[3], 'cloud', 3100 * MS, 'DEADLINE_EXCEEDED')
    records += arbiter.arrive(frames[3], 'local', dets(1), 3150 * MS).settled
    for record in records:
        stats.add(record)
    assert stats.frames == 4 and stats.late == 1 and stats.no_winner == 0
    assert (stats.source('cloud').wins, stats.source('local').wins) == (1, 3)
    assert stats.source('cloud').deadline_misses == 3
    assert stats.source('local').deadline_misses == 1
    assert (stats.source('cloud').failed, stats.source('cloud').cancelled) == (2, 1)
    assert stats.source('local').percentile_ms(50) == pytest.approx(30)
    assert sorted(stats.lateness_ms) == [0, 0, 2, 50]


def test_a_deadline_that_passes_with_nothing_arrived_is_not_a_timer_any_more(arbiter):
    """The scheduler sleeps on next_deadline_ns(): a passed, applied deadline must leave it."""
    key = open_frame(arbiter, sources=(LOCAL,), deadline_ms=20)
    assert arbiter.next_deadline_ns() == 20 * MS
    assert arbiter.tick(25 * MS).decisions == []  # nothing to publish yet
    assert arbiter.next_deadline_ns() is None
    later = open_frame(arbiter, sources=(LOCAL,), stamp_ms=10, deadline_ms=60)
    assert arbiter.next_deadline_ns() == 60 * MS
    [decision] = arbiter.arrive(key, 'local', dets(1), 300 * MS).decisions
    assert (decision.winner, decision.late, decision.released_ns) == ('local', True, 300 * MS)
    assert arbiter.tick(301 * MS).decisions == []  # `later` waits for its own local result
    assert arbiter.is_pending(later, 'local')


def test_abandon_fails_every_pending_source_and_resolves_the_frame(arbiter):
    key = open_frame(arbiter)
    out = arbiter.abandon(key, 5 * MS, 'RuntimeError: boom')
    [decision] = out.decisions
    assert (decision.winner, decision.late) == (None, False)
    [record] = out.settled
    assert {a.state for a in record.attempts.values()} == {SourceState.FAILED}
    assert record.attempts['cloud'].error == 'RuntimeError: boom'
    assert arbiter.abandon(key, 6 * MS, 'again').decisions == []  # already settled
    assert arbiter.open_frames() == 0


def test_a_stamp_stepping_back_beyond_the_tolerance_restarts_the_camera():
    arbiter = Arbiter(stamp_backstep_tolerance_ns=50 * MS)
    first = open_frame(arbiter, stamp_ms=1000, deadline_ms=1100)
    assert open_frame(arbiter, stamp_ms=1000, deadline_ms=1100) is None  # duplicate
    assert open_frame(arbiter, stamp_ms=960, deadline_ms=1060) is None  # reordered: stale
    assert arbiter.clock_resets == {}
    restarted = open_frame(arbiter, stamp_ms=10, deadline_ms=110)  # the replay looped
    assert restarted is not None and arbiter.clock_resets == {'cam': 1}
    assert open_frame(arbiter, stamp_ms=20, deadline_ms=120) is not None
    # Released in the order the frames were opened: the old timeline's frame first.
    assert arbiter.arrive(restarted, 'cloud', dets(2), 30 * MS).decisions == []
    decisions = arbiter.arrive(first, 'cloud', dets(1), 40 * MS).decisions
    assert [d.key for d in decisions] == [first, restarted]


def test_shift_clock_keeps_the_remaining_budget_and_restarts_ordering(arbiter):
    key = open_frame(arbiter, stamp_ms=5000, deadline_ms=5100)
    arbiter.arrive(key, 'local', dets(1), 5020 * MS)
    arbiter.shift_clock(-5000 * MS)  # ROS time jumped back by 5 s
    assert arbiter.next_deadline_ns() == 100 * MS
    assert arbiter.tick(99 * MS).decisions == []
    out = arbiter.tick(100 * MS)
    [decision] = out.decisions
    assert decision.winner == 'local' and not decision.late
    [record] = arbiter.cancelled(key, 'cloud', 101 * MS).settled
    assert (record.start_ns, record.latency_ms('local')) == (0, 20)  # both on the new timeline
    assert open_frame(arbiter, stamp_ms=1, deadline_ms=101) is not None  # no longer stale


def test_negative_tolerance_is_refused():
    with pytest.raises(ValueError,
                       match='^stamp_backstep_tolerance_ns must not be negative, got -1$'):
        Arbiter(stamp_backstep_tolerance_ns=-1)


def test_a_call_is_wanted_until_its_source_resolves_or_is_asked_to_cancel(arbiter):
    """A hedge started after the decision must be cancelled: wants() tells the dispatcher."""
    key = open_frame(arbiter, sources=(LOCAL, CLOUD, EDGE))
    assert arbiter.wants(key, 'cloud') and arbiter.wants(key, 'edge')
    out = arbiter.arrive(key, 'cloud', dets(2), 30 * MS)
    assert out.decisions and (key, 'edge') in out.cancel
    assert not arbiter.wants(key, 'cloud')  # arrived
    assert not arbiter.wants(key, 'edge')  # asked to cancel, not yet cancelled
    assert arbiter.is_pending(key, 'edge')
    arbiter.arrive(key, 'local', dets(1), 40 * MS)
    arbiter.cancelled(key, 'edge', 41 * MS)
    assert not arbiter.wants(key, 'edge')  # the frame is settled and forgotten


def test_a_late_result_is_published_at_once_though_a_higher_priority_source_is_pending(arbiter):
    """Past the deadline nothing is worth waiting for: the first arrival wins, marked late."""
    key = open_frame(arbiter)
    assert arbiter.tick(100 * MS).decisions == []
    out = arbiter.arrive(key, 'local', dets(1), 130 * MS)
    [decision] = out.decisions
    assert (decision.winner, decision.late, decision.released_ns) == ('local', True, 130 * MS)
    assert out.cancel == [(key, 'cloud')]  # still pending, and it can no longer win


def test_a_frame_whose_sources_all_fail_after_the_deadline_is_marked_late(arbiter):
    key = open_frame(arbiter)
    arbiter.tick(100 * MS)
    assert arbiter.fail(key, 'cloud', 110 * MS, 'DEADLINE_EXCEEDED').decisions == []
    [decision] = arbiter.fail(key, 'local', 120 * MS, 'inference error').decisions
    assert (decision.winner, decision.late, decision.released_ns) == (None, True, 120 * MS)


def test_a_result_exactly_at_the_deadline_is_in_time(arbiter):
    key = open_frame(arbiter, sources=[LOCAL])
    out = arbiter.arrive(key, 'local', dets(1), 100 * MS)
    [decision], [record] = out.decisions, out.settled
    assert not decision.late and not record.missed_deadline('local')
    assert record.attempts['local'].error == ''


def test_decisions_and_records_carry_the_frame_stamp_and_deadline(arbiter):
    key = arbiter.open('cam', 7 * MS, 9 * MS, 107 * MS, [LOCAL, CLOUD])
    [decision] = arbiter.arrive(key, 'cloud', dets(2), 50 * MS).decisions
    assert (decision.stamp_ns, decision.deadline_ns) == (7 * MS, 107 * MS)
    arbiter.tick(107 * MS)
    [record] = arbiter.fail(key, 'local', 110 * MS, 'inference error').settled
    assert (record.stamp_ns, record.start_ns, record.deadline_ns) == (7 * MS, 9 * MS, 107 * MS)
    assert record.latency_ms('cloud') == pytest.approx(41)
    assert record.latency_ms('local') is None  # failed: no latency
    assert record.latency_ms('datacenter') is None  # not tried for this frame
    assert not arbiter.is_pending(key, 'local')  # settled and forgotten


def test_one_tick_releases_and_settles_frames_of_several_cameras(arbiter):
    front = open_frame(arbiter, stamp_ms=0, deadline_ms=100, camera='front')
    held = open_frame(arbiter, stamp_ms=10, deadline_ms=100, camera='front')
    rear = open_frame(arbiter, stamp_ms=0, deadline_ms=100, camera='rear')
    arbiter.arrive(front, 'local', dets(1), 20 * MS)
    arbiter.arrive(held, 'cloud', dets(2), 30 * MS)  # decided, waits for `front`
    arbiter.arrive(held, 'local', dets(1), 40 * MS)
    arbiter.arrive(rear, 'local', dets(3), 50 * MS)
    out = arbiter.tick(100 * MS)
    assert [d.key for d in out.decisions] == [front, held, rear]
    assert [r.key for r in out.settled] == [held]  # the others wait for their cloud calls
    assert out.cancel == [(front, 'cloud'), (rear, 'cloud')]


def test_a_tick_before_the_deadline_leaves_the_deadline_due(arbiter):
    key = open_frame(arbiter)
    arbiter.arrive(key, 'local', dets(1), 20 * MS)
    assert arbiter.tick(50 * MS).decisions == []
    assert arbiter.next_deadline_ns() == 100 * MS
    assert [d.winner for d in arbiter.tick(100 * MS).decisions] == ['local']


def test_a_cancelled_call_is_recorded_with_its_end_time(arbiter):
    key = open_frame(arbiter)
    arbiter.arrive(key, 'local', dets(1), 20 * MS)
    arbiter.tick(100 * MS)
    [record] = arbiter.cancelled(key, 'cloud', 104 * MS).settled
    cloud = record.attempts['cloud']
    assert (cloud.state, cloud.finished_ns, cloud.error) == (SourceState.CANCELLED, 104 * MS,
                                                             'cancelled')


def test_a_zero_tolerance_treats_any_step_back_as_a_clock_reset():
    arbiter = Arbiter(stamp_backstep_tolerance_ns=0)
    assert open_frame(arbiter, stamp_ms=100, deadline_ms=200) is not None
    assert open_frame(arbiter, stamp_ms=100, deadline_ms=200) is None  # a repeat is stale
    assert open_frame(arbiter, stamp_ms=99, deadline_ms=199) is not None
    assert open_frame(arbiter, stamp_ms=98, deadline_ms=198) is not None
    assert arbiter.clock_resets == {'cam': 2}


def test_a_step_back_of_exactly_the_tolerance_is_stale():
    arbiter = Arbiter(stamp_backstep_tolerance_ns=50 * MS)
    assert open_frame(arbiter, stamp_ms=1000, deadline_ms=1100) is not None
    assert open_frame(arbiter, stamp_ms=950, deadline_ms=1050) is None
    assert open_frame(arbiter, stamp_ms=949, deadline_ms=1049) is not None


def test_describe_open_reports_each_unresolved_frame(arbiter):
    key = arbiter.open('', 1_500 * MS, 1_500 * MS, 1_600 * MS, [LOCAL, CLOUD])
    assert arbiter.describe_open(1_530 * MS) == [
        'image#0 stamp 1.500 s, opened 30 ms ago, deadline in 70 ms, undecided: '
        'local pending, cloud pending']
    arbiter.arrive(key, 'local', dets(1), 1_540 * MS)
    arbiter.tick(1_600 * MS)
    assert arbiter.describe_open(1_620 * MS) == [
        'image#0 stamp 1.500 s, opened 120 ms ago, deadline in -20 ms (applied), decided: '
        'local arrived, cloud pending']
    open_frame(arbiter, camera='rear')
    assert arbiter.describe_open(0)[1].startswith('rear#0 stamp 0.000 s')


def test_stats_count_every_frame_and_attempt():
    arbiter, stats = Arbiter(), SpeculationStats(window=2)
    for i in range(3):  # every source fails after the deadline: late, no winner
        key = open_frame(arbiter, stamp_ms=i * 1000, deadline_ms=i * 1000 + 100)
        arbiter.tick((i * 1000 + 100) * MS)
        arbiter.fail(key, 'cloud', (i * 1000 + 110) * MS, 'UNAVAILABLE')
        [record] = arbiter.fail(key, 'local', (i * 1000 + 120) * MS, 'inference error').settled
        stats.add(record)
    for i in range(3, 6):  # local in time, after (i - 2) ms
        key = open_frame(arbiter, stamp_ms=i * 1000, deadline_ms=i * 1000 + 100)
        arbiter.fail(key, 'cloud', (i * 1000 + 1) * MS, 'UNAVAILABLE')
        [record] = arbiter.arrive(key, 'local', dets(1), (i * 1000 + i - 2) * MS).settled
        stats.add(record)
    assert (stats.frames, stats.late, stats.no_winner) == (6, 3, 3)
    local, cloud = stats.source('local'), stats.source('cloud')
    assert (local.tried, local.arrived, local.wins, local.failed) == (6, 3, 3, 3)
    assert (cloud.tried, cloud.arrived, cloud.failed, cloud.cancelled) == (6, 0, 6, 0)
    assert list(local.latencies_ms) == [2, 3]  # the window keeps the newest two
    assert cloud.percentile_ms(50) is None


def test_among_equal_priorities_the_first_arrival_counts_and_the_rest_are_cancelled(arbiter):
    """Replicas (hedged calls): a later equal-priority arrival neither wins nor keeps running."""
    key = open_frame(arbiter, sources=(LOCAL, CLOUD, EDGE, DATACENTER))
    out = arbiter.arrive(key, 'edge', dets(3), 10 * MS)
    assert out.decisions == []  # the datacenter may still outrank it
    assert out.cancel == [(key, 'cloud')]  # cloud can no longer win: edge came first
    arbiter.arrive(key, 'cloud', dets(2), 15 * MS)  # arrived before its cancellation took
    [decision] = arbiter.fail(key, 'datacenter', 20 * MS, 'UNAVAILABLE').decisions
    assert (decision.winner, decision.detections.labels.tolist()) == ('edge', [3])


def test_the_cloud_answer_is_the_winning_cloud_result_else_the_first_to_arrive(arbiter):
    key = open_frame(arbiter, (LOCAL, EDGE, DATACENTER))
    arbiter.arrive(key, 'edge', dets(3), 10 * MS)
    arbiter.arrive(key, 'datacenter', dets(4), 30 * MS)
    [record] = arbiter.arrive(key, 'local', dets(1), 40 * MS).settled
    assert record.cloud_answer(['edge', 'datacenter'])[0] == 'datacenter'  # it won
    key = open_frame(arbiter, (LOCAL, EDGE, DATACENTER), stamp_ms=200)
    arbiter.arrive(key, 'local', dets(1), 210 * MS)
    arbiter.tick(300 * MS)  # local wins; the cloud answers come late, but they come
    arbiter.arrive(key, 'datacenter', dets(4), 330 * MS)
    [record] = arbiter.arrive(key, 'edge', dets(3), 320 * MS).settled
    name, answer = record.cloud_answer(['edge', 'datacenter'])
    assert name == 'edge' and answer is not None and answer.labels.tolist() == [3]
    assert record.cloud_answer(['datacenter']) == ('datacenter', record.attempts[
        'datacenter'].detections)
    key = open_frame(arbiter, (LOCAL, CLOUD), stamp_ms=400)
    arbiter.arrive(key, 'local', dets(1), 410 * MS)
    arbiter.tick(500 * MS)
    [record] = arbiter.fail(key, 'cloud', 510 * MS, 'UNAVAILABLE').settled
    assert record.cloud_answer(['cloud']) == ('', None)
