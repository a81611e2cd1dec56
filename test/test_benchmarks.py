"""Slow measurements that print figures (run with `make benchmark`); no timed asserts."""
from concurrent import futures
from functools import partial
import itertools
import os
import time

import grpc
import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from ros_harness import running, wait_until
from sensor_msgs.msg import CompressedImage, Image
import simplejpeg
from speculation_rig import camera_command, cloud_server, detector, free_port, observer
from speculative_av.cloud import detection_pb2, detection_pb2_grpc
from speculative_av.cloud.codec import build_request, encode_frame
from speculative_av.cloud.oip_codec import build_infer_request
from speculative_av.core.arbiter import Arbiter, Source
from speculative_av.core.detections import Detections
from speculative_av.detectors.onnx_backend import OnnxSettings
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.package_files import model_path
from speculative_av.ros.image_conversion import (compressed_msg_to_rgb, image_msg_to_rgb,
                                                 rgb_to_compressed_msg, rgb_to_image_msg)
from speculative_av.ros.messages import detections_msg
from speculative_av.ros.spinning import background_node
from speculative_av.scenes.generator import generate_scene
from std_msgs.msg import Header
import torch
from vision_msgs.msg import Detection2DArray

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize('local_weights', ['random', 'trained'])
def test_fused_publish_lateness_and_node_overhead_640x480_30hz(local_weights):
    """
    The cloud replies after the deadline, so every fused result is deadline-driven.

    Random weights emit 300 boxes a frame (message building dominates the overhead); the
    trained checkpoint emits a realistic handful.
    """
    port, deadline_ms, frames = free_port(), 250.0, 150
    weights = {'local.weights': str(model_path('local_ssdlite320.pt')),
               'local.score_threshold': 0.3} if local_weights == 'trained' else {}
    with observer() as observed, cloud_server(port, extra_latency_ms=1000), \
            detector(**{'deadline_ms': deadline_ms, 'cloud.endpoints': f'["127.0.0.1:{port}"]',
                        'local.threads': 1, **weights}), \
            running(camera_command(rate_hz=30.0)):
        observed.wait_for_decisions(frames, timeout=120)
        seen = len(observed.diagnostics)
        wait_until(lambda: len(observed.diagnostics) > seen, 5, 'fresh diagnostics')
    decisions = [d for d, _ in observed.decisions]
    after_deadline = np.array([float(d['published_after_deadline_ms']) for d in decisions])
    ready = np.array([float(d['winner_ready_after_deadline_ms']) for d in decisions])
    on_time = ready < 0  # local was ready before the deadline
    lateness = after_deadline[on_time]
    overhead = after_deadline - np.maximum(ready, 0)
    summary = observed.diagnostics[-1]['speculation']
    received, processed = int(summary['frames_received']), int(summary['frames_processed'])
    print(f'\nframes received {received}, processed {processed}, dropped '
          f'{summary["dropped_frames"]}, late {summary["late"]}')
    print(f'fused publish after the deadline ({on_time.sum()} frames with local ready before '
          'it; negative where the cloud call failed early and ended the race): '
          f'p50 {np.median(lateness):.2f} ms, p99 {np.percentile(lateness, 99):.2f} ms, '
          f'max {lateness.max():.2f} ms')
    print(f'fused publish after max(deadline, local ready), all {len(decisions)} frames: '
          f'p50 {np.median(overhead):.2f} ms, p99 {np.percentile(overhead, 99):.2f} ms')
    print(f'node overhead per frame besides inference: p50 {summary["node_overhead_ms_p50"]} '
          f'ms, p95 {summary["node_overhead_ms_p95"]} ms')
    local = np.array([float(d['local_latency_ms']) for d in decisions if d['local_latency_ms']])
    print(f'local latency (start to result): p50 {np.median(local):.1f} ms')


def _cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time a process has used so far."""
    with open(f'/proc/{pid}/stat') as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def test_node_cpu_with_the_local_detector_slower_than_the_deadline():
    """
    Every frame's deadline passes before its only source (local) has a result.

    The scheduler must sleep until the local result arrives; a busy wait shows up as ~1 CPU
    second per second on top of inference and as inflated local latency.
    """
    frames = 12
    with observer() as observed, \
            detector(**{'deadline_ms': 20.0, 'cloud.enabled': False, 'local.threads': 1,
                        'local.model': 'fasterrcnn_mobilenet_v3_large_320_fpn'}) as node, \
            running(camera_command(rate_hz=5.0)):
        observed.wait_for_decisions(3, timeout=120)
        cpu0, wall0, seen = _cpu_seconds(node.pid), time.monotonic(), len(observed.decisions)
        observed.wait_for_decisions(seen + frames, timeout=300)
        cpu = _cpu_seconds(node.pid) - cpu0
        wall = time.monotonic() - wall0
    decisions = [d for d, _ in observed.decisions[seen:]]
    local = np.array([float(d['local_latency_ms']) for d in decisions if d['local_latency_ms']])
    print(f'\n{len(decisions)} frames in {wall:.1f} s: node CPU {cpu:.1f} s '
          f'({100 * cpu / wall:.0f}% of one core), {1e3 * cpu / len(decisions):.0f} ms CPU per '
          f'frame; local latency p50 {np.median(local):.0f} ms, p95 '
          f'{np.percentile(local, 95):.0f} ms; late {sum(d["late"] == "true" for d in decisions)}')


@pytest.mark.parametrize('model', ['ssdlite320_mobilenet_v3_large',
                                   'fasterrcnn_mobilenet_v3_large_320_fpn'])
@pytest.mark.parametrize('weights', ['random', 'trained'])
def test_local_backends_latency_640x480(model, weights, tmp_path):
    """
    Eager PyTorch against ONNX Runtime at 640x480: p50/p99 over 100 frames, 1 and 2 threads.

    Also the export (first use of a size) and a cache hit (a new detector on the filled cache).
    The threshold is the node's default 0.3, which the export applies before NMS.
    """
    if weights == 'trained' and model != 'ssdlite320_mobilenet_v3_large':
        pytest.skip('the repository ships a trained checkpoint of ssdlite320 only')
    weights_arg = str(model_path('local_ssdlite320.pt')) if weights == 'trained' else 'random'
    image = generate_scene(1).image
    frames = 100
    settings = OnnxSettings(cache_dir=tmp_path)

    def latency(timed):
        for _ in range(5):
            timed.detect(image)
        times = []
        for _ in range(frames):
            started = time.perf_counter()
            timed.detect(image)
            times.append((time.perf_counter() - started) * 1e3)
        return np.median(times), np.percentile(times, 99)

    started = time.perf_counter()
    TorchvisionDetector(model, weights_arg, threads=1, backend='onnxruntime',
                        onnx=settings).detect(image)
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    TorchvisionDetector(model, weights_arg, threads=1, backend='onnxruntime',
                        onnx=settings).detect(image)
    cached_s = time.perf_counter() - started
    print(f'\n{model}, {weights} weights, 640x480: first use with export {export_s:.2f} s, '
          f'first use from the cache {cached_s:.2f} s (both including model build)')
    for threads in (1, 2):
        for backend in ('torch', 'onnxruntime'):
            timed = TorchvisionDetector(model, weights_arg, threads=threads, backend=backend,
                                        onnx=settings)
            p50, p99 = latency(timed)
            print(f'  {backend:11s} {threads} thread(s): p50 {p50:6.1f} ms, p99 {p99:6.1f} ms, '
                  f'{len(timed.detect(image))} detections')
    torch.set_num_threads(1)


def _p50_ms(step, repeats=200):
    """Return the median wall time of ``step()`` in ms, after a short warm-up."""
    for _ in range(10):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    return np.median(times)


def test_node_steps_besides_inference_640x480():
    """
    Each step the node takes per frame besides local inference, alone in one thread.

    The node's own overhead figure (diagnostics) adds what these leave out: other threads
    holding the GIL and other processes holding the CPU. Detection counts: the trained
    ssdlite320 finds ~3 per synthetic frame, random weights 300.
    """
    torch.set_num_threads(1)
    rgb = generate_scene(1).image
    header = Header(frame_id='cam_front')
    received = {encoding: deserialize_message(serialize_message(
        rgb_to_image_msg(rgb, header, encoding)), Image) for encoding in ('rgb8', 'bgr8')}
    jpeg_msg = deserialize_message(serialize_message(rgb_to_compressed_msg(rgb, header)),
                                   CompressedImage)
    rng = np.random.default_rng(0)

    def detections(count):
        corners = rng.uniform(0, 560, (count, 2))
        return Detections(np.hstack([corners, corners + rng.uniform(5, 80, (count, 2))]),
                          rng.uniform(0.3, 1, count), rng.integers(1, 91, count))

    frame = encode_frame(rgb)
    assert simplejpeg.decode_jpeg_header(frame.data)[:2] == (480, 640)
    steps = {
        'image_msg_to_rgb rgb8 (a view)': lambda: image_msg_to_rgb(received['rgb8']),
        'image_msg_to_rgb bgr8': lambda: image_msg_to_rgb(received['bgr8']),
        'compressed_msg_to_rgb jpeg': lambda: compressed_msg_to_rgb(jpeg_msg),
        'encode_frame jpeg q80': lambda: encode_frame(rgb),
        'build_request (native)': lambda: build_request(frame, 'cam_front', 1, 2),
        'build_infer_request (OIP)': lambda: build_infer_request('detector', frame, 0.1),
    }
    by_count = {count: detections(count) for count in (3, 20, 300)}
    for count, found in by_count.items():
        steps[f'detections_msg {count} detections'] = partial(detections_msg, found, header)
    arbiter, clock = Arbiter(), itertools.count(0, 33_000_000)
    local, cloud = Source('local', 0, cancellable=False), Source('cloud', 10)

    def race():
        now = next(clock)
        key = arbiter.open('', now, now, now + 150_000_000, [local, cloud])
        arbiter.arrive(key, 'local', by_count[3], now + 1)
        assert arbiter.fail(key, 'cloud', now + 2, 'down').decisions

    steps['arbiter open, arrive, fail'] = race
    figures = {name: _p50_ms(step) for name, step in steps.items()}
    with background_node('overhead_benchmark') as node:
        publisher = node.create_publisher(Detection2DArray, 'detections', 10)
        for count, found in by_count.items():
            msg = detections_msg(found, header)
            assert len(msg.detections) == count
            figures[f'publish Detection2DArray {count} detections'] = _p50_ms(
                partial(publisher.publish, msg))
            figures[f'publish the same, serialized {count} detections'] = _p50_ms(
                partial(publisher.publish, serialize_message(msg)))
    server = grpc.server(futures.ThreadPoolExecutor(2))
    detection_pb2_grpc.add_CloudDetectorServicer_to_server(_Instant(), server)
    port = server.add_insecure_port('127.0.0.1:0')
    server.start()
    try:
        with grpc.insecure_channel(f'127.0.0.1:{port}') as channel:
            stub = detection_pb2_grpc.CloudDetectorStub(channel)
            calls = []

            def submit():
                calls.append(stub.Detect.future(build_request(frame, 'cam_front', 1, 2),
                                                timeout=10))
            figures['gRPC Detect.future (calls in flight)'] = _p50_ms(submit, 100)
            assert all(call.result() is not None for call in calls)
            figures['gRPC Detect.future (channel idle)'] = _p50_ms(
                lambda: stub.Detect.future(build_request(frame, 'cam_front', 1, 2),
                                           timeout=10).result(), 100)
    finally:
        server.stop(None)
    print('\nper-frame steps at 640x480, one thread, p50 (ms); "channel idle" includes the '
          'round trip:')
    for name, p50 in figures.items():
        print(f'  {name:48s} {p50:7.3f}')


class _Instant(detection_pb2_grpc.CloudDetectorServicer):
    """A cloud detector that answers at once with nothing: only the client's cost remains."""

    def Detect(self, request, context):  # noqa: N802 (the gRPC method's name)
        return detection_pb2.DetectResponse()
