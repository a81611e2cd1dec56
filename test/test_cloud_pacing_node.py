"""The node's client pacing and hedging with real cloud servers, camera and node processes."""
from __future__ import annotations

from ros_harness import running, wait_until
from speculation_rig import camera_command, cloud_server, detector, free_port, observer


def _summary(observed) -> dict[str, str]:  # noqa: ANN001 (an Observer)
    return observed.diagnostics[-1]['speculation']


def test_a_slow_replica_is_hedged_to_a_fast_one_and_the_cloud_still_wins():
    """Two equal-priority replicas, one 2 s slow: its frames are backed up after 100 ms."""
    slow, fast = free_port(), free_port()
    params = {'deadline_ms': 1000.0, 'cloud.hedge_after_ms': 100.0, 'cloud.hedge_ratio': 0.9,
              'cloud.endpoints': f'["slow=127.0.0.1:{slow}", "fast=127.0.0.1:{fast}"]'}
    with observer() as observed, cloud_server(slow, extra_latency_ms=2000), cloud_server(fast), \
            detector(**params), running(camera_command(rate_hz=3.0)):
        observed.wait_for_decisions(14)
        wait_until(lambda: observed.diagnostics and int(_summary(observed)['cloud_hedged']) > 0,
                   10, 'hedges in the diagnostics')
    decided = [d for d, _ in observed.decisions[2:]]  # the first frames may pay for warm-up
    cloud = [d for d in decided if d['winner'] == 'cloud']
    assert len(cloud) >= 0.8 * len(decided), '\n'.join(observed.outcomes())
    assert {d['winner_source'] for d in cloud} == {'fast'}
    hedged = [d for d in decided if 'source.slow' in d and 'source.fast' in d]
    assert hedged, 'no frame went to both replicas'
    assert all(d['winner_source'] == 'fast' for d in hedged if d['winner'] == 'cloud')
    summary = _summary(observed)
    assert int(summary['cloud_hedged']) <= 0.9 * int(summary['frames_processed']) + 2


def test_frames_are_not_sent_behind_max_outstanding_calls():
    """One call in flight at most: frames arriving meanwhile skip the cloud (counted)."""
    port = free_port()
    params = {'deadline_ms': 900.0, 'cloud.max_outstanding': 1,
              'cloud.endpoints': f'["127.0.0.1:{port}"]'}
    with observer() as observed, cloud_server(port, extra_latency_ms=500), \
            detector(**params), running(camera_command(rate_hz=5.0)):
        observed.wait_for_decisions(15)
        wait_until(lambda: observed.diagnostics and int(_summary(observed)['cloud_skipped']) > 0,
                   10, 'skipped frames in the diagnostics')
    decided = [d for d, _ in observed.decisions[2:]]
    skipped = [d for d in decided if 'source.cloud' not in d]
    sent = [d for d in decided if 'source.cloud' in d]
    assert skipped and sent, '\n'.join(observed.outcomes())
    assert all(d['winner'] == 'local' for d in skipped)
    assert any(d['winner'] == 'cloud' for d in sent)  # ~520 ms < 900 ms deadline
