"""The speculative detector with a real cloud server and camera, each its own process."""
import signal
import time

from fault_rig import decision_stamp_ns, StallWitness
import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile
from rclpy.time import Time
from ros_harness import running, wait_until
from sensor_msgs.msg import CompressedImage, Image
from speculation_rig import (camera_command, cloud_server, detector, free_port, Observer,
                             observer)
from vision_msgs.msg import Detection2DArray, LabelInfo

# The fused result may leave this long after max(deadline, winner ready): scheduler wake-up,
# GIL hand-over from the inference thread and message building. Measured figures are printed.
PUBLISH_SLACK_MS = 25.0
# ... and reach a subscriber in another process this long after the deadline (DDS delivery and
# the subscriber's executor come on top; measured by the receiver, not reported by the node;
# 20-40 ms seen on a loaded 2-core machine).
RECEIVE_SLACK_MS = 100.0


def _floats(observed: Observer, key: str) -> np.ndarray:
    return np.array([float(d[key]) for d, _ in observed.decisions if d[key] != ''])


def _check_one_fused_per_frame_with_image_headers(observed: Observer) -> None:
    image_headers = {(m.header.stamp.sec, m.header.stamp.nanosec): m.header.frame_id
                     for m, _ in observed.images}
    fused_stamps = [(m.header.stamp.sec, m.header.stamp.nanosec) for m, _ in observed.fused]
    assert len(fused_stamps) == len(set(fused_stamps)), 'a frame was published twice'
    assert fused_stamps == sorted(fused_stamps), 'fused results left stamp order'
    for msg, _ in observed.fused + observed.local:
        stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        assert image_headers.get(stamp) == msg.header.frame_id == 'cam_front'
        assert all(d.header == msg.header for d in msg.detections)
    assert {d['hardware_id'] for d, _ in observed.decisions} == {'cam_front'}


def _stamp_ns(msg: Detection2DArray) -> int:
    return Time.from_msg(msg.header.stamp).nanoseconds


def _boxes(msg: Detection2DArray) -> list[tuple[float, ...]]:
    return [(d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.size_x, d.bbox.size_y,
             d.results[0].hypothesis.score, float(d.results[0].hypothesis.class_id))
            for d in msg.detections]


def _check_fused_is_the_winners_result_once_per_decided_frame(observed: Observer) -> None:
    """
    Each decided frame has exactly one fused message, with the winner's detections.

    Compared on the receiver's side with what arrived on detections/local and detections/cloud.
    A frame's decision goes out when all its sources finished, after its fused result, so every
    decided frame has one; discovery matches each topic on its own, so the comparison starts
    at the first frame both streams saw.
    """
    fused = {_stamp_ns(m): m for m, _ in observed.fused}
    assert len(fused) == len(observed.fused), 'a frame was published twice'
    decided = {decision_stamp_ns(d): d for d, _ in observed.decisions}
    first = max(min(fused), min(decided))
    compared = sorted(s for s in decided if s >= first)
    assert len(compared) >= 3, 'too few frames to compare'
    missing = [s for s in compared if s not in fused]
    assert not missing, f'decided frames without a fused result: {missing}'
    by_source = {'local': {_stamp_ns(m): m for m, _ in observed.local},
                 'cloud': {_stamp_ns(m): m for m, _ in observed.cloud}}
    same_as_winner = 0
    for stamp in compared:
        decision = decided[stamp]
        assert len(fused[stamp].detections) == int(decision['detections'])
        winner = by_source.get(decision['winner'], {}).get(stamp)
        if winner is not None:  # its topic may have been matched a frame later
            assert _boxes(fused[stamp]) == _boxes(winner)
            same_as_winner += 1
    assert same_as_winner >= len(compared) - 3


def _received_after_deadline_ms(observed: Observer, deadline_ms: float) -> np.ndarray:
    """
    Per fused message: when this process received it, less its frame's deadline (stamp).

    Results received while camera images were also late reaching this process (a stalled
    machine, see fault_rig.StallWitness) are left out: their lateness says nothing of the node.
    """
    witness = StallWitness([(Time.from_msg(m.header.stamp).nanoseconds, received)
                            for m, received in observed.images])
    after = [(received - Time.from_msg(m.header.stamp).nanoseconds) / 1e6 - deadline_ms
             for m, received in observed.fused if not witness.stalled(received)]
    return np.array(after)


def _after_max_of_deadline_and_winner_ms(observed: Observer) -> np.ndarray:
    """
    Per frame: how long after max(deadline, winner ready) the fused result left.

    When no higher-priority source arrives, that maximum is the moment the choice is final.
    """
    after_deadline = _floats(observed, 'published_after_deadline_ms')
    ready = _floats(observed, 'winner_ready_after_deadline_ms')
    return after_deadline - np.maximum(ready, 0.0)


def test_cloud_faster_than_the_deadline_wins():
    port = free_port()
    with observer() as observed, cloud_server(port), \
            detector(**{'deadline_ms': 1000.0, 'cloud.endpoints': f'["127.0.0.1:{port}"]'}), \
            running(camera_command(rate_hz=3.0)):
        observed.wait_for_decisions(12)
    winners = observed.winners(since=2)  # the first frames may pay for warm-up
    assert winners.count('cloud') >= 0.8 * len(winners), '\n'.join(observed.outcomes())
    cloud_latency = _floats(observed, 'cloud_latency_ms')
    assert all(d['winner'] == 'cloud' for d, _ in observed.decisions
               if d['cloud_latency_ms'] and float(d['cloud_latency_ms']) <= 1000.0)
    _check_one_fused_per_frame_with_image_headers(observed)
    _check_fused_is_the_winners_result_once_per_decided_frame(observed)
    assert any(d['winner'] == 'cloud' for d, _ in observed.decisions)
    print(f'cloud latency ms p50={np.median(cloud_latency):.1f}')


def test_slow_cloud_loses_and_local_is_published_at_the_deadline():
    port = free_port()
    deadline_ms = 200.0
    with observer() as observed, cloud_server(port, extra_latency_ms=600), \
            detector(**{'deadline_ms': deadline_ms, 'cloud.endpoints': f'["127.0.0.1:{port}"]'}), \
            running(camera_command(rate_hz=5.0)):
        observed.wait_for_decisions(15)
    assert set(observed.winners()) == {'local'}
    overhead = _after_max_of_deadline_and_winner_ms(observed)
    lateness = _floats(observed, 'published_after_deadline_ms')
    print(f'publish after max(deadline, local ready): p50={np.median(overhead):.2f} ms '
          f'p99={np.percentile(overhead, 99):.2f} ms; after deadline p50='
          f'{np.median(lateness):.2f} ms')
    assert np.all(overhead <= PUBLISH_SLACK_MS), overhead
    # Held for the cloud until the deadline, then out at once: seen from the receiver.
    received = _received_after_deadline_ms(observed, deadline_ms)
    print(f'received after the deadline: p50={np.median(received):.2f} ms '
          f'max={received.max():.2f} ms')
    # (Before the deadline only when the server refused a call it could not finish in time.)
    assert np.all(received <= RECEIVE_SLACK_MS), received
    assert all(d['source.cloud'].startswith(('cancelled', 'failed')) for d, _ in
               observed.decisions)
    _check_one_fused_per_frame_with_image_headers(observed)
    _check_fused_is_the_winners_result_once_per_decided_frame(observed)


def test_no_cloud_server_every_frame_gets_local_within_the_deadline():
    # Two frame times of local inference (one waiting in the slot, its own) fit in it.
    deadline_ms = 500.0
    with observer() as observed, \
            detector(**{'deadline_ms': deadline_ms,
                        'cloud.endpoints': f'["127.0.0.1:{free_port()}"]'}), \
            running(camera_command(rate_hz=30.0)):
        observed.wait_for_decisions(30)
        observed_diagnostics = len(observed.diagnostics)
        # Let one more 1 Hz diagnostics round report the dropped frames of a 30 Hz camera.
        wait_until(lambda: len(observed.diagnostics) > observed_diagnostics + 1, 10,
                   'diagnostics')
    assert set(observed.winners()) == {'local'}
    assert np.all(_after_max_of_deadline_and_winner_ms(observed) <= PUBLISH_SLACK_MS)
    assert all(d['late'] == 'false' for d, _ in observed.decisions)
    # Nothing to wait for: local goes out as soon as it is ready, before the deadline.
    assert np.all(_received_after_deadline_ms(observed, deadline_ms) <= RECEIVE_SLACK_MS)
    _check_fused_is_the_winners_result_once_per_decided_frame(observed)
    summary = observed.diagnostics[-1]['speculation']
    assert observed.diagnostics[-1]['cloud']['health'] in ('UNREACHABLE', 'NOT_SERVING')
    received, processed = int(summary['frames_received']), int(summary['frames_processed'])
    dropped = int(summary['dropped_frames'])
    assert dropped > 0, 'a 30 Hz camera outruns two busy cores: drops must be counted'
    assert received - processed - dropped in (0, 1)  # at most one frame waiting in its slot
    _check_one_fused_per_frame_with_image_headers(observed)


def test_server_killed_mid_stream_and_restarted_is_survived():
    port = free_port()
    params = {'deadline_ms': 1000.0, 'cloud.endpoints': f'["127.0.0.1:{port}"]'}
    with observer() as observed, detector(**params), running(camera_command(rate_hz=3.0)):
        with cloud_server(port) as server:
            wait_until(lambda: 'cloud' in observed.winners(), 60, 'a cloud win')
            server.send_signal(signal.SIGKILL)
            server.wait()
        killed_at = len(observed.decisions)
        wait_until(lambda: observed.winners(killed_at).count('local') >= 3, 60,
                   'local results while the cloud is gone')
        with cloud_server(port):
            back_at = len(observed.decisions)
            wait_until(lambda: 'cloud' in observed.winners(back_at), 60,
                       'the cloud to win again after restarting')
    _check_one_fused_per_frame_with_image_headers(observed)


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_two_compressed_cameras_share_one_node_and_bad_input_is_counted():
    fused: dict[str, list] = {'front': [], 'rear': []}
    debug_images: list[Image] = []
    with observer() as observed, \
            detector(**{'cameras': '["front", "rear"]', 'image_transport': 'compressed',
                        'cloud.enabled': False, 'deadline_ms': 800.0}):
        for name, store in fused.items():
            observed.node.create_subscription(Detection2DArray, f'{name}/detections',
                                              store.append, 100)
        observed.node.create_subscription(Image, 'front/debug_image', debug_images.append, 10)
        garbage = observed.node.create_publisher(CompressedImage, 'rear/image/compressed', 10)
        wait_until(lambda: garbage.get_subscription_count() > 0, 30, 'the rear subscription')
        bad = CompressedImage(format='jpeg', data=b'not a jpeg at all')
        bad.header.frame_id = 'cam_rear'
        cameras = [camera_command(rate_hz=3.0, frame_id=f'cam_{name}', namespace=name,
                                  wait_for_subscribers=1, transport='compressed')
                   for name in fused]
        with running(cameras[0]), running(cameras[1]):
            wait_until(lambda: min(len(v) for v in fused.values()) >= 4, 60,
                       'fused results on both cameras')
            # Best effort may lose a message sent just as discovery completes: resend until seen.
            wait_until(lambda: observed.diagnostics and int(
                observed.diagnostics[-1]['speculation']['invalid_images']) >= 1, 20,
                'the invalid image to be counted', poll=lambda: (garbage.publish(bad),
                                                                 time.sleep(0.25)))
            wait_until(lambda: debug_images, 10, 'a debug image of the front camera')
        # Joining late still yields the label map: label_info is transient local.
        labels: list[LabelInfo] = []
        observed.node.create_subscription(
            LabelInfo, 'label_info', labels.append,
            QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        wait_until(lambda: labels, 10, 'the latched label map')
    assert labels[0].class_map[0].class_name == 'person'  # COCO label 1 (random weights)
    assert (debug_images[0].header.frame_id, debug_images[0].width,
            debug_images[0].encoding) == ('cam_front', 640, 'rgb8')
    for name, messages in fused.items():
        assert {m.header.frame_id for m in messages} == {f'cam_{name}'}
        stamps = [(m.header.stamp.sec, m.header.stamp.nanosec) for m in messages]
        assert stamps == sorted(set(stamps))
    assert {d['hardware_id'] for d, _ in observed.decisions} == {'cam_front', 'cam_rear'}


def test_autostart_false_waits_for_lifecycle_transitions():
    from lifecycle_msgs.msg import State, Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    def call(client, request):
        wait_until(client.service_is_ready, 30, f'service {client.srv_name}')
        future = client.call_async(request)
        wait_until(future.done, 60, f'a reply from {client.srv_name}')
        return future.result()

    with observer() as observed, detector(**{'autostart': False, 'cloud.enabled': False}), \
            running(camera_command(rate_hz=5.0)):
        get_state = observed.node.create_client(GetState, 'speculative_detector/get_state')
        change = observed.node.create_client(ChangeState, 'speculative_detector/change_state')
        state = call(get_state, GetState.Request()).current_state
        assert state.id == State.PRIMARY_STATE_UNCONFIGURED
        for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert call(change, ChangeState.Request(transition=Transition(id=transition))).success
        assert call(get_state, GetState.Request()).current_state.id == State.PRIMARY_STATE_ACTIVE
        observed.wait_for_decisions(3)
        assert call(change, ChangeState.Request(
            transition=Transition(id=Transition.TRANSITION_DEACTIVATE))).success
    assert set(observed.winners()) == {'local'}
