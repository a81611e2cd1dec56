"""The offline race uses the node's arbiter and yields the policies the evaluation compares."""
import numpy as np

from speculative_av.core.detections import Detections
from speculative_av.tools.offline_race import FrameResults, race, run_policies

LOCAL = Detections([[0, 0, 5, 5]], [0.5], [1])
CLOUD = Detections([[0, 0, 6, 6]], [0.9], [1])


def frame(local_ms, cloud_ms):
    return FrameResults(LOCAL, CLOUD, local_ms, cloud_ms)


def test_cloud_in_time_wins_when_it_arrives():
    decision = race(frame(30, 80), deadline_ms=100)
    assert decision.winner == 'cloud' and decision.released_ns == 80_000_000


def test_late_cloud_leaves_local_at_the_deadline():
    decision = race(frame(30, 180), deadline_ms=100)
    assert (decision.winner, decision.released_ns, decision.late) == ('local', 100_000_000, False)


def test_outage_and_slow_local_gives_a_late_local_result():
    decision = race(frame(130, None), deadline_ms=100)
    assert (decision.winner, decision.late) == ('local', True)


def test_cloud_arriving_exactly_at_the_deadline_counts():
    assert race(frame(30, 100), deadline_ms=100).winner == 'cloud'


def test_policies_per_deadline():
    frames = [frame(30, 80), frame(30, 180), frame(30, None)]
    outputs = run_policies(frames, deadline_ms=100)
    assert [len(d) for d in outputs.cloud_only] == [1, 0, 0]
    assert [d.winner for d in outputs.speculative] == ['cloud', 'local', 'local']
    assert all(np.array_equal(d.boxes, LOCAL.boxes) for d in outputs.local_only)
