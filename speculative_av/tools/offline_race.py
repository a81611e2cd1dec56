"""
Replay each frame's race offline through the node's own arbiter.

Given when each source's result would arrive (measured inference plus emulated network), the
real :class:`~speculative_av.core.arbiter.Arbiter` decides what the fused topic would carry,
so evaluations test the policy the vehicle runs, not a copy of it.
"""
from __future__ import annotations

from dataclasses import dataclass

from speculative_av.core.arbiter import Arbiter, Decision, Outcome, Source
from speculative_av.core.detections import Detections

LOCAL = Source('local', 0, cancellable=False)
CLOUD = Source('cloud', 10)
_NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class FrameResults:
    """What both detectors found in one frame, and when each answer is ready (ms from start)."""

    local: Detections
    cloud: Detections
    local_ms: float
    cloud_ms: float | None  # None: the network swallowed the request (outage)


@dataclass(frozen=True)
class PolicyOutputs:
    """Per frame, what each policy hands to planning for one deadline."""

    local_only: list[Detections]  # the local result, whenever it is ready
    cloud_only: list[Detections]  # the cloud result if it arrives by the deadline, else nothing
    speculative: list[Decision]  # the arbiter's fused decision


def race(frame: FrameResults, deadline_ms: float) -> Decision:
    """Return the arbiter's decision for one frame whose deadline is ``deadline_ms`` away."""
    arbiter = Arbiter()
    deadline_ns = round(deadline_ms * _NS_PER_MS)
    key = arbiter.open('camera', 0, 0, deadline_ns, [LOCAL, CLOUD])
    assert key is not None
    # The node's gRPC timeout is the time left to the deadline: a later reply is a failure.
    cloud_in_time = frame.cloud_ms is not None and frame.cloud_ms <= deadline_ms
    cloud_ns = round(frame.cloud_ms * _NS_PER_MS) if frame.cloud_ms is not None else deadline_ns
    events = [(round(frame.local_ms * _NS_PER_MS), 0, 'local'),
              (min(cloud_ns, deadline_ns), 0, 'cloud'),
              (deadline_ns, 1, 'tick')]  # at equal times, arrivals come before the deadline
    decisions: list[Decision] = []
    for time_ns, _, what in sorted(events):
        outcome: Outcome
        if what == 'tick':
            outcome = arbiter.tick(time_ns)
        elif what == 'local':
            outcome = arbiter.arrive(key, 'local', frame.local, time_ns)
        elif cloud_in_time:
            outcome = arbiter.arrive(key, 'cloud', frame.cloud, time_ns)
        else:
            outcome = arbiter.fail(key, 'cloud', time_ns, 'DEADLINE_EXCEEDED')
        decisions += outcome.decisions
    assert len(decisions) == 1, 'the arbiter releases exactly one decision per frame'
    return decisions[0]


def run_policies(frames: list[FrameResults], deadline_ms: float) -> PolicyOutputs:
    """Return every policy's per-frame output for ``deadline_ms``."""
    return PolicyOutputs(
        local_only=[f.local for f in frames],
        cloud_only=[f.cloud if f.cloud_ms is not None and f.cloud_ms <= deadline_ms
                    else Detections.empty() for f in frames],
        speculative=[race(f, deadline_ms) for f in frames])
