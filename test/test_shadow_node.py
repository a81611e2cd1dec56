"""Shadow mode in the real node: a candidate model runs beside the deployed one over DDS."""
from ros_harness import running, wait_until
from speculation_rig import camera_command, cloud_server, detector, free_port, MODEL, observer
from test_speculation_e2e import (_check_fused_is_the_winners_result_once_per_decided_frame,
                                  _check_one_fused_per_frame_with_image_headers)

PERIODS = ('day', 'dusk', 'night')


def _total(shadow: dict[str, str], name: str) -> int:
    return sum(int(shadow[f'{period}_{name}']) for period in PERIODS)


def test_a_candidate_in_shadow_leaves_every_fused_frame_and_reports_on_diagnostics():
    port = free_port()
    parameters = {'deadline_ms': 1000.0, 'cloud.endpoints': f'["127.0.0.1:{port}"]',
                  'shadow.enabled': True, 'shadow.model': MODEL, 'shadow.weights': 'random',
                  'shadow.every_nth': 2, 'shadow.cpu_share': 1.0, 'shadow.min_score': 0.05}

    def shadow() -> dict[str, str]:
        return observed.diagnostics[-1].get('shadow', {}) if observed.diagnostics else {}

    with observer() as observed, cloud_server(port), detector(**parameters), \
            running(camera_command(rate_hz=3.0)):
        observed.wait_for_decisions(12)
        wait_until(lambda: shadow() and _total(shadow(), 'cloud_frames') >= 3, 30,
                   'shadow agreement with the cloud on /diagnostics')
    stats = shadow()
    print({k: v for k, v in stats.items() if not k.endswith('_ms')})
    assert stats['candidate'].startswith(f'{MODEL}:random')
    assert int(stats['ran']) >= 3 and int(stats['candidate_errors']) == 0
    assert int(stats['skipped_nth']) >= int(stats['ran']) - 1  # every second frame
    # The same weights as the deployed model: (nearly) the same 300 weak random-weight boxes
    # per frame; a different model would agree far less (the cloud's, after JPEG: ~0.8).
    agreement = [float(stats[f'{p}_agreement_deployed']) for p in PERIODS
                 if int(stats[f'{p}_frames'])]
    assert agreement and min(agreement) >= 0.95
    assert all(d['winner'] in ('cloud', 'local') for d, _ in observed.decisions)
    _check_one_fused_per_frame_with_image_headers(observed)
    _check_fused_is_the_winners_result_once_per_decided_frame(observed)
    # Every frame the node took was fused; any other was dropped by newest-wins and counted.
    summary = observed.diagnostics[-1]['speculation']
    received, processed = int(summary['frames_received']), int(summary['frames_processed'])
    assert received - processed - int(summary['dropped_frames']) in (0, 1)
    assert int(summary['frame_errors']) == 0 and int(summary['late']) == 0
    assert len(observed.fused) >= 12
