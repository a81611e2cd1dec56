"""
The node races its local detector against a real tritonserver over the v2 protocol.

Triton runs the project's detector (test_triton_server.start_server: the Triton environment,
random weights). The cloud wins while Triton answers; once Triton is stopped the local result
wins, published at the deadline; when Triton is back on the same port the cloud wins again.
"""
from __future__ import annotations

from pathlib import Path
import signal
import threading

import numpy as np
import pytest
from ros_harness import running, wait_until
from speculation_rig import camera_command, detector, free_port, observer
from speculative_av.cloud.codec import encode_frame
from speculative_av.cloud.endpoint_factory import open_endpoint
from speculative_av.cloud.endpoints import EndpointSpec
from speculative_av.cloud.reply import CloudReply
from speculative_av.cloud.security import ChannelSecurity
from speculative_av.detectors.torchvision_detector import coco_categories
from speculative_av.scenes.generator import generate_scene
from test_triton_server import MODEL, start_server, triton_venv  # noqa: F401 (the fixture)

DEADLINE_MS = 1000.0  # Triton's first calls after a start pay for warm-up on this CPU
PUBLISH_SLACK_MS = 25.0


def _stop(process) -> None:  # noqa: ANN001 (a Popen)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_node_races_triton_cloud_wins_local_while_stopped_cloud_again_after(
        triton_venv: Path, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    port = free_port()
    endpoint = f'triton=kserve://127.0.0.1:{port}/{MODEL}'
    params = {'deadline_ms': DEADLINE_MS, 'cloud.endpoints': f'["{endpoint}"]'}
    triton = start_server(tmp_path, '--grpc-port', str(port))
    try:
        with observer() as observed, detector(**params), running(camera_command(rate_hz=3.0)):
            wait_until(lambda: observed.winners(2).count('cloud') >= 5, 90, 'cloud wins')
            won = [d for d, _ in observed.decisions[2:] if d['winner'] == 'cloud']
            assert {d['winner_source'] for d in won} == {'triton'}
            _stop(triton.process)
            stopped_at = len(observed.decisions)
            wait_until(lambda: observed.winners(stopped_at + 2).count('local') >= 5, 60,
                       'local wins while Triton is stopped')
            while_down = [d for d, _ in observed.decisions[stopped_at + 2:]]
            triton = start_server(tmp_path, '--grpc-port', str(port))
            back_at = len(observed.decisions)
            wait_until(lambda: 'cloud' in observed.winners(back_at), 90,
                       'the cloud to win again once Triton is back')
        assert all(d['winner'] == 'local' for d in while_down[:5]), '\n'.join(
            observed.outcomes())
        lateness = np.array([float(d['published_after_deadline_ms']) for d in while_down[:5]])
        assert np.all(lateness <= PUBLISH_SLACK_MS), lateness
        print(f'\nwhile Triton was stopped: local published {np.median(lateness):.1f} ms '
              'after the deadline (median; negative: before it, no cloud call was pending)')
    finally:
        if triton.process.poll() is None:
            _stop(triton.process)


@pytest.mark.parametrize('queue, shed', [
    (('--queue-timeout-ms', '100'), 'DEADLINE_EXCEEDED: expired in the server queue'),
    (('--max-queue-size', '2'), 'RESOURCE_EXHAUSTED: the server queue is full')])
def test_requests_tritons_queue_sheds_are_not_in_time_not_a_dead_server(
        triton_venv: Path, tmp_path: Path, queue: tuple[str, str],  # noqa: F811 (fixture)
        shed: str) -> None:
    """Triton answers a queue timeout or a full queue with UNAVAILABLE; stay healthy."""
    triton = start_server(tmp_path, '--max-batch-size', '1', *queue)
    transitions: list[str] = []
    replies: list[CloudReply] = []
    done = threading.Condition()

    def keep(reply: CloudReply) -> None:
        with done:
            replies.append(reply)
            done.notify_all()

    frame = encode_frame(generate_scene(3).image)
    try:
        spec = EndpointSpec.parse(f'kserve://{triton.grpc}/{MODEL}')
        with open_endpoint(spec, security=ChannelSecurity.insecure(),
                           categories=coco_categories(),
                           on_health_change=lambda n, old, new, e: transitions.append(new)
                           ) as endpoint:
            wait_until(lambda: endpoint.healthy, 30, 'the endpoint to verify Triton')
            burst = 12  # ~90 ms each, one at a time: most wait in the queue
            for i in range(burst):
                endpoint.submit(frame, f'f{i}', 0, 10.0, 0, keep)
            with done:
                assert done.wait_for(lambda: len(replies) == burst, 60)
            shed_replies = [r for r in replies if not r.ok]
            assert shed_replies and all(r.error.startswith(shed) for r in shed_replies), [
                r.error for r in shed_replies]
            assert any(r.ok for r in replies)
            assert endpoint.healthy and transitions == ['SERVING'], transitions
    finally:
        _stop(triton.process)
