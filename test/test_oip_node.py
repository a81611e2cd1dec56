"""The node races its local detector against a v2 (Open Inference Protocol) server and back."""
import numpy as np
from ros_harness import running
from speculation_rig import camera_command, detector, free_port, observer
from test_oip_endpoint import OipServer


def test_node_races_a_v2_endpoint_which_wins_while_it_serves(tmp_path):
    """A v2 endpoint named 'triton' wins while served; once stopped, local wins in time."""
    server = OipServer(tmp_path / 'oip.log', port=free_port())
    endpoint = f'triton=kserve://{server.target}/speculative_detector'
    try:
        with observer() as observed, \
                detector(**{'deadline_ms': 1000.0, 'cloud.endpoints': f'["{endpoint}"]'}), \
                running(camera_command(rate_hz=3.0)):
            observed.wait_for_decisions(10)
            winners = observed.winners(since=2)  # the first frames may pay for warm-up
            assert winners.count('cloud') >= 0.8 * len(winners), '\n'.join(observed.outcomes())
            assert {d['winner_source'] for d, _ in observed.decisions[2:]} >= {'triton'}
            assert server.terminate() == 0
            decided = len(observed.decisions)
            observed.wait_for_decisions(decided + 8)
        after = [d for d, _ in observed.decisions[decided + 3:]]  # health noticed by then
        assert after and all(d['winner'] == 'local' for d in after), '\n'.join(
            observed.outcomes())
        lateness = np.array([float(d['published_after_deadline_ms']) for d in after])
        assert np.all(lateness <= 25.0), lateness
    finally:
        server.terminate()
