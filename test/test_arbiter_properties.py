"""
The arbiter's invariants over random schedules of frames, results, failures and deadlines.

A simulated caller replays each drawn schedule in time order, as the node does: it opens frames,
delivers every source's outcome (turned into a cancellation when the arbiter asked for one
earlier) and ticks at every deadline. Whatever the schedule, the invariants below must hold.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import given, HealthCheck, settings, strategies as st
import numpy as np
from speculative_av.core.arbiter import Arbiter, Decision, FrameKey, FrameRecord, Source
from speculative_av.core.detections import Detections

MS = 1_000_000
TOLERANCE_NS = 500 * MS
SOURCES = {s.name: s for s in (Source('local', 0, cancellable=False), Source('cloud', 10),
                               Source('edge', 10), Source('datacenter', 20))}


@dataclass(frozen=True)
class FramePlan:
    """One frame of a drawn schedule: who races it and what becomes of each source."""

    camera: str
    gap_ms: int  # opening time after the previous frame's
    stamp_step_ms: int  # stamp after this camera's previous one (negative: the clock stepped)
    budget_ms: int
    outcomes: dict[str, tuple[bool, int]]  # source -> (arrives, delay after opening in ms)


outcome = st.tuples(st.booleans(), st.integers(0, 400))
frame_plan = st.builds(
    FramePlan,
    camera=st.sampled_from(['front', 'rear']),
    gap_ms=st.integers(0, 80),
    stamp_step_ms=st.one_of(st.integers(1, 60), st.integers(-30, 0),
                            st.just(-5000)),  # reordered, duplicate, or stepped back
    budget_ms=st.integers(1, 250),
    outcomes=st.fixed_dictionaries(
        {'local': outcome},
        optional={'cloud': outcome, 'edge': outcome, 'datacenter': outcome}),
)


@dataclass
class Run:
    """What a replayed schedule produced."""

    opened: dict[FrameKey, FramePlan]
    decisions: list[Decision]
    records: dict[FrameKey, FrameRecord]
    release_order: dict[str, list[FrameKey]]


def replay(plans: list[FramePlan]) -> Run:
    """Drive an arbiter through ``plans`` in time order, as the node's threads would."""
    arbiter = Arbiter(TOLERANCE_NS)
    events: list[tuple[int, int, int, str, bool]] = []  # (time, kind order, frame, source, ok)
    now, stamps = 0, {'front': 10_000 * MS, 'rear': 10_000 * MS}
    opening: list[tuple[int, int]] = []
    for index, plan in enumerate(plans):
        now += plan.gap_ms * MS
        stamps[plan.camera] += plan.stamp_step_ms * MS
        opening.append((now, stamps[plan.camera]))
        events.append((now, 0, index, '', True))
        events.append((now + plan.budget_ms * MS, 2, index, '', True))
        for source, (arrives, delay_ms) in plan.outcomes.items():
            events.append((now + delay_ms * MS, 1, index, source, arrives))
    keys: dict[int, FrameKey] = {}
    cancel_requested: set[tuple[FrameKey, str]] = set()
    run = Run({}, [], {}, {})
    for time_ns, kind, index, source, arrives in sorted(events):
        plan = plans[index]
        if kind == 0:
            opened_at, stamp_ns = opening[index]
            key = arbiter.open(plan.camera, stamp_ns, opened_at, opened_at + plan.budget_ms * MS,
                               [SOURCES[name] for name in plan.outcomes])
            if key is not None:
                keys[index] = key
                run.opened[key] = plan
            continue
        if index not in keys:
            continue  # refused as stale: none of its events reach the arbiter
        key = keys[index]
        if kind == 2:
            result = arbiter.tick(time_ns)
        elif (key, source) in cancel_requested:
            result = arbiter.cancelled(key, source, time_ns)
        elif arrives:
            result = arbiter.arrive(key, source, Detections(
                np.zeros((1, 4), np.float32), np.ones(1, np.float32),
                np.array([index], np.int64)), time_ns)
        else:
            result = arbiter.fail(key, source, time_ns, 'failed')
        cancel_requested.update(result.cancel)
        run.decisions += result.decisions
        for decision in result.decisions:
            run.release_order.setdefault(decision.key.camera, []).append(decision.key)
        run.records.update((r.key, r) for r in result.settled)
    assert arbiter.open_frames() == 0, 'every source resolved, yet a frame is still open'
    return run


schedules = st.lists(frame_plan, min_size=1, max_size=10)
property_settings = settings(max_examples=300, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@property_settings
@given(schedules)
def test_exactly_one_decision_per_opened_frame(plans: list[FramePlan]) -> None:
    run = replay(plans)
    decided = Counter(d.key for d in run.decisions)
    assert set(decided) == set(run.opened) == set(run.records)
    assert set(decided.values()) <= {1}


@property_settings
@given(schedules)
def test_decisions_leave_in_opening_order_per_camera(plans: list[FramePlan]) -> None:
    """Opening order is stamp order within each timeline of a camera."""
    run = replay(plans)
    for keys in run.release_order.values():
        assert [k.seq for k in keys] == sorted(k.seq for k in keys)
        assert len({k.seq for k in keys}) == len(keys)


@property_settings
@given(schedules)
def test_never_decided_after_the_deadline_when_a_result_had_arrived_by_it(
        plans: list[FramePlan]) -> None:
    run = replay(plans)
    for record in run.records.values():
        arrived_in_time = [a for a in record.attempts.values()
                           if a.detections is not None and a.finished_ns is not None
                           and a.finished_ns <= record.deadline_ns]
        if arrived_in_time:
            assert record.decision.decided_ns <= record.deadline_ns
            assert not record.decision.late


@property_settings
@given(schedules)
def test_never_decided_before_the_deadline_while_a_higher_priority_source_is_pending(
        plans: list[FramePlan]) -> None:
    run = replay(plans)
    for record in run.records.values():
        decision = record.decision
        if decision.decided_ns >= record.deadline_ns:
            continue
        assert decision.winner is not None or all(
            a.finished_ns is not None and a.finished_ns <= decision.decided_ns
            for a in record.attempts.values())
        winner_priority = SOURCES[decision.winner].priority if decision.winner else -1
        for attempt in record.attempts.values():
            finished = attempt.finished_ns
            if finished is None or finished > decision.decided_ns:  # pending at the decision
                assert attempt.source.priority <= winner_priority, (decision, attempt)


@property_settings
@given(schedules)
def test_the_winner_is_the_best_result_in_hand_and_late_means_after_the_deadline(
        plans: list[FramePlan]) -> None:
    run = replay(plans)
    for record in run.records.values():
        decision = record.decision
        in_hand = [a for a in record.attempts.values() if a.detections is not None
                   and a.finished_ns is not None and a.finished_ns <= decision.decided_ns]
        if decision.winner is None:
            assert not in_hand and len(decision.detections) == 0
            assert decision.late == (decision.decided_ns >= record.deadline_ns)
            continue
        assert SOURCES[decision.winner].priority == max(a.source.priority for a in in_hand)
        winner_ready = record.attempts[decision.winner].finished_ns
        assert winner_ready is not None
        assert decision.late == (winner_ready > record.deadline_ns)
        assert decision.released_ns >= decision.decided_ns
