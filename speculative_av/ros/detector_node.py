"""
The ``speculative_detector`` lifecycle node: local and cloud detection race every frame.

Threads: the executor only enqueues frames (newest per camera wins); one worker converts,
dispatches the cloud calls and runs local inference; a scheduler thread applies deadlines; gRPC
threads deliver cloud replies. Every arbiter call and every fused publish happens under one
lock, so fused results leave in stamp order, exactly once per processed frame.

Supervision: an exception while handling one frame is logged (throttled), counted as
``frame_errors`` and resolves that frame (its pending sources fail) while the thread goes on. A
thread that dies anyway puts ERROR on /diagnostics and takes the lifecycle node through
ErrorProcessing to Finalized, and the process exits with 1, so a supervisor restarts it instead
of a zombie living on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
import gc
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any, Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import numpy.typing as npt
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.clock import Clock, ClockType, JumpHandle, JumpThreshold, TimeJump
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import (LifecycleNode, LifecyclePublisher, LifecycleState,
                             TransitionCallbackReturn)
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, qos_profile_sensor_data, QoSProfile
from rclpy.signals import SignalHandlerOptions
from rclpy.subscription import Subscription
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image
from speculative_av.cloud.codec import encode_frame
from speculative_av.cloud.dispatch import Call, CloudDispatcher, Plan
from speculative_av.cloud.endpoint import Endpoint, SERVING
from speculative_av.cloud.endpoint_factory import open_endpoint
from speculative_av.cloud.endpoints import EndpointSpec, parse_endpoints
from speculative_av.cloud.reply import CloudReply
from speculative_av.cloud.security import ChannelSecurity
from speculative_av.core.arbiter import Arbiter, Decision, FrameKey, Outcome, Source
from speculative_av.core.backpressure import LatestFrameSlots
from speculative_av.core.deadline import DeadlinePolicy
from speculative_av.core.detections import Detections
from speculative_av.core.stats import percentile, SpeculationStats
from speculative_av.detectors.torchvision_detector import TORCH_BACKEND, TorchvisionDetector
from speculative_av.ros.image_conversion import (compressed_msg_to_rgb, image_msg_to_rgb,
                                                 ImageConversionError, rgb_to_image_msg)
from speculative_av.ros.messages import (decision_status, detections_msg, draw_debug_image,
                                         label_info_msg, LOCAL_SOURCE, source_status,
                                         summary_status)
from speculative_av.ros.parameters import declare
from std_msgs.msg import Header
from vision_msgs.msg import Detection2DArray, LabelInfo

LOCAL = Source(LOCAL_SOURCE, 0, cancellable=False)
# Longest the deadline thread sleeps while frames are open: a wall or ROS clock may jump, and
# under use_sim_time "now" only moves with /clock.
MAX_TIMER_S = 0.1


def _check_cameras(cameras: list[str], transport: str) -> None:
    """Refuse camera lists and transports the node could not subscribe as asked."""
    if transport not in ('raw', 'compressed'):
        raise ValueError(f"image_transport must be 'raw' or 'compressed', got {transport!r}")
    if not cameras or len(set(cameras)) != len(cameras):
        raise ValueError(f'cameras must be distinct names, got {cameras}')
    for camera in cameras:
        if camera and not all(part.isidentifier() for part in camera.split('/')):
            raise ValueError(f'camera name {camera!r} is not a valid ROS name (letters, digits, '
                             "'_', '/' between parts)")


def _camera_topic(camera: str, leaf: str) -> str:
    """Return ``leaf`` under the camera's name; relative, so namespaces and remapping apply."""
    return f'{camera}/{leaf}' if camera else leaf


@dataclass
class _Camera:
    """The topics of one camera."""

    name: str
    fused: LifecyclePublisher
    local: LifecyclePublisher
    cloud: LifecyclePublisher
    debug: LifecyclePublisher
    subscription: Subscription | None = None

    def topic(self, leaf: str) -> str:
        return _camera_topic(self.name, leaf)


@dataclass
class _Frame:
    """A received frame waiting for the worker."""

    msg: Image | CompressedImage
    arrival_ns: int


@dataclass
class _InFlight:
    """What the node keeps about an open race besides the arbiter's state."""

    camera: _Camera
    header: Header
    rgb: npt.NDArray[np.uint8] | None  # kept only while someone watches debug_image
    calls: dict[str, Call]
    messages: dict[str, Detection2DArray] = field(default_factory=dict)  # per source, built once


class SpeculativeDetector(LifecycleNode):
    """Fuse a local torchvision detector and gRPC cloud detectors under a per-frame deadline."""

    def __init__(self, **kwargs: object) -> None:
        """Declare every parameter; nothing heavy happens until configure."""
        super().__init__('speculative_detector', **kwargs)  # type: ignore[arg-type]
        self.autostart = declare(self, 'autostart', True,
                                 'Configure and activate on start-up.', read_only=True)
        declare(self, 'cameras', [''],
                'Camera names; topics become <name>/image, <name>/detections, ... '
                "('' = one camera on image, detections, ...).", read_only=True)
        declare(self, 'image_transport', 'raw',
                "'raw' subscribes sensor_msgs/Image on image; 'compressed' subscribes "
                'sensor_msgs/CompressedImage (jpeg/png) on image/compressed.', read_only=True)
        self._policy = DeadlinePolicy.from_ms(
            declare(self, 'deadline_ms', 150.0,
                    'Per-frame budget in ms; the fused result is never later than this '
                    '(unless the local detector itself is slower). Settable at run time.',
                    value_range=(1.0, 60_000.0)),
            declare(self, 'deadline_reference', 'stamp',
                    "What the deadline counts from: 'stamp' (image header stamp) or "
                    "'arrival' (reception by this node). Settable at run time."))
        declare(self, 'stamp_backstep_tolerance_ms', 1000.0,
                "A frame stamped up to this much before its camera's newest is an out-of-order "
                'delivery and dropped as stale; further back the camera clock stepped back (a '
                "looping replay, a time resync) and the camera's ordering restarts (counted as "
                'clock_resets). Under use_sim_time a backward jump of ROS time by more than this '
                'restarts every camera.', read_only=True, value_range=(0.0, 86_400_000.0))
        declare(self, 'local.model', 'ssdlite320_mobilenet_v3_large',
                'torchvision detection architecture of the on-board detector.', read_only=True)
        declare(self, 'local.weights', 'DEFAULT',
                "'DEFAULT' (torchvision's pretrained weights), a checkpoint path, or 'random' "
                '(tests only).', read_only=True)
        declare(self, 'local.device', 'cpu', 'cpu, cuda or cuda:N.', read_only=True)
        declare(self, 'local.score_threshold', 0.3,
                'Detections scoring below this are dropped (both sources).', read_only=True,
                value_range=(0.0, 1.0))
        declare(self, 'local.threads', 0, 'torch intra-op threads; 0 = torch default.',
                read_only=True, value_range=(0, 1024))
        declare(self, 'local.backend', TORCH_BACKEND,
                "What runs the local model: 'torch' (eager PyTorch) or 'onnxruntime' (the "
                'model exported to ONNX once, cached under ~/.cache/speculative_av/onnx, run by '
                'ONNX Runtime: CPU here, CUDA/TensorRT on a GPU device).', read_only=True)
        declare(self, 'cloud.enabled', True, 'Send frames to the cloud endpoints.')
        declare(self, 'cloud.endpoints', ['localhost:50051'],
                "Cloud detectors as '[name=]host:port[@priority]' (native protocol) or "
                "'[name=]kserve://host:port/model[@priority]' (Open Inference Protocol, e.g. "
                'Triton); local has priority 0, cloud defaults to 10.', read_only=True)
        declare(self, 'cloud.jpeg_quality', 80, 'JPEG quality of frames sent to the cloud.',
                value_range=(1, 100))
        declare(self, 'cloud.max_image_side', 0,
                'Downscale frames so their longer side is at most this before sending '
                '(0 = full size); replies are mapped back to full-size pixels.',
                value_range=(0, 65_535))
        declare(self, 'cloud.max_outstanding', 4,
                'Calls in flight per endpoint; a frame that would wait behind them is not sent '
                'there (counted as cloud_skipped).', read_only=True, value_range=(1, 1024))
        declare(self, 'cloud.hedge_after_ms', 0.0,
                'Also send a frame to a second endpoint of equal priority when the first has '
                'not answered this long after sending, or failed (0 = never hedge).',
                read_only=True, value_range=(0.0, 60_000.0))
        declare(self, 'cloud.hedge_ratio', 0.1,
                'Hedges may add at most this share of calls (a budget per frame sent).',
                read_only=True, value_range=(0.0, 0.99))
        declare(self, 'cloud.insecure', False,
                'Plaintext gRPC without TLS or token (logs a warning): only for a server on this '
                'machine or a trusted network. Otherwise the link uses TLS.', read_only=True)
        declare(self, 'cloud.tls.ca_file', '',
                "PEM CA bundle the server certificate must chain to ('' = system roots).",
                read_only=True)
        declare(self, 'cloud.tls.cert_file', '',
                "PEM client certificate for mutual TLS ('' = none; needs cloud.tls.key_file).",
                read_only=True)
        declare(self, 'cloud.tls.key_file', '',
                "PEM private key of cloud.tls.cert_file ('' = none).", read_only=True)
        declare(self, 'cloud.tls.server_name', '',
                "Name expected in the server certificate when it differs from the endpoint's "
                "host, e.g. when connecting by IP ('' = the host).", read_only=True)
        declare(self, 'cloud.token_file', '',
                "File holding this vehicle's bearer token, sent as 'authorization: Bearer' "
                "metadata over TLS ('' = no token).", read_only=True)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._lock = threading.RLock()
        self._arbiter = Arbiter()
        self._stats = SpeculationStats()
        self._counters = {'frames_received': 0, 'frames_processed': 0, 'invalid_images': 0,
                          'stale_frames': 0, 'frame_errors': 0, 'clock_resets': 0,
                          'cloud_skipped': 0}
        self._health_changes: dict[str, int] = {}
        self._fatal = ''  # why a thread died; set once, ends the node
        self._fatal_guard = self.create_guard_condition(self._on_fatal)
        self._jump_handle: JumpHandle | None = None
        self._inflight: dict[FrameKey, _InFlight] = {}
        self._slots: LatestFrameSlots[_Frame] = LatestFrameSlots()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._endpoints: list[Endpoint[Any]] = []
        self._dispatcher: CloudDispatcher | None = None
        self._sources: dict[str, Source] = {}
        self._running = False
        self._cameras: list[_Camera] = []
        self._detector: TorchvisionDetector | None = None
        self._last_error_log = 0.0

    # Lifecycle ---------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the local model, connect to the cloud endpoints, create publishers."""
        try:
            threads = self.get_parameter('local.threads').value
            self._detector = TorchvisionDetector(
                self.get_parameter('local.model').value, self.get_parameter('local.weights').value,
                self.get_parameter('local.device').value,
                self.get_parameter('local.score_threshold').value, threads=threads or None,
                backend=self.get_parameter('local.backend').value)
            specs: list[EndpointSpec] = (
                parse_endpoints(self.get_parameter('cloud.endpoints').value)
                if self.get_parameter('cloud.enabled').value else [])
            _check_cameras(self.get_parameter('cameras').value,
                           self.get_parameter('image_transport').value)
            insecure = self.get_parameter('cloud.insecure').value
            security = ChannelSecurity.from_settings(
                insecure=insecure, ca_file=self.get_parameter('cloud.tls.ca_file').value,
                cert_file=self.get_parameter('cloud.tls.cert_file').value,
                key_file=self.get_parameter('cloud.tls.key_file').value,
                token_file=self.get_parameter('cloud.token_file').value,
                server_name=self.get_parameter('cloud.tls.server_name').value)
        except (ValueError, RuntimeError, OSError) as error:
            self.get_logger().error(f'configure failed: {error}')
            return TransitionCallbackReturn.FAILURE
        # Pay the first-inference cost (allocations, kernel selection) before frames count.
        self._detector.detect(np.zeros((480, 640, 3), np.uint8))
        # The model and the libraries are ~400k objects that live as long as the node; a full
        # garbage collection scanning them stalls every thread ~200 ms (measured: fused results
        # that late). Frozen, they are left out of collections until close() thaws them.
        gc.collect()
        gc.freeze()
        tolerance_ns = round(self.get_parameter('stamp_backstep_tolerance_ms').value * 1e6)
        self._arbiter = Arbiter(max(0, tolerance_ns))
        self._inflight.clear()
        if self.get_parameter('use_sim_time').value:
            self._jump_handle = self.get_clock().create_jump_callback(
                JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-max(
                    1, tolerance_ns)), on_clock_change=True), post_callback=self._on_time_jump)
        if insecure and specs:
            self.get_logger().warning(
                'cloud.insecure is true: frames go to the cloud in PLAINTEXT, without TLS or '
                'token; use this only for a server on this machine or a trusted network')
        self._health_changes = {s.name: 0 for s in specs}
        self._endpoints = [open_endpoint(s, security=security,
                                         categories=self._detector.categories,
                                         on_health_change=self._on_health_change)
                           for s in specs]
        self._sources = {s.name: Source(s.name, s.priority) for s in specs}
        hedge_after_ms = self.get_parameter('cloud.hedge_after_ms').value
        self._dispatcher = CloudDispatcher(
            self._endpoints, {s.name: s.priority for s in specs},
            max_outstanding=self.get_parameter('cloud.max_outstanding').value,
            hedge_after_s=hedge_after_ms / 1e3 if hedge_after_ms > 0 else None,
            hedge_ratio=self.get_parameter('cloud.hedge_ratio').value)
        self.get_logger().info(
            f'local detector {self._detector.model_name} ({self._detector.model_version}) on '
            f'{self._detector.device}; cloud: '
            + (', '.join(f'{s.name}={s.target}@{s.priority}' for s in specs) or 'disabled'))
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._label_info = self.create_lifecycle_publisher(LabelInfo, 'label_info', latched)
        self._decisions = self.create_lifecycle_publisher(
            DiagnosticStatus, 'speculation/decisions', 100)
        self._diagnostics = self.create_lifecycle_publisher(DiagnosticArray, '/diagnostics', 10)
        for name in self.get_parameter('cameras').value:
            def publisher(msg_type: type, leaf: str, depth: int = 10) -> LifecyclePublisher:
                return self.create_lifecycle_publisher(msg_type, _camera_topic(name, leaf), depth)

            self._cameras.append(_Camera(
                name, publisher(Detection2DArray, 'detections'),
                publisher(Detection2DArray, 'detections/local'),
                publisher(Detection2DArray, 'detections/cloud'),
                publisher(Image, 'debug_image', 2)))
        # Health is reported in real time, also while a replay's /clock is paused or absent.
        self._diagnostics_timer = self.create_timer(
            1.0, self._publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the cameras and start the worker and deadline threads."""
        result = super().on_activate(state)
        assert self._detector is not None
        self._label_info.publish(label_info_msg(
            self._detector.categories, self._detector.score_threshold,
            Header(stamp=self.get_clock().now().to_msg())))
        compressed = self.get_parameter('image_transport').value == 'compressed'
        for camera in self._cameras:
            msg_type, topic = ((CompressedImage, camera.topic('image/compressed')) if compressed
                               else (Image, camera.topic('image')))
            camera.subscription = self.create_subscription(
                msg_type, topic, partial(self._on_image, camera), qos_profile_sensor_data)
        self._slots = LatestFrameSlots()
        self._running = True
        self._threads = [self._supervised('detector', self._work),
                         self._supervised('deadlines', self._schedule)]
        for thread in self._threads:
            thread.start()
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop taking frames; frames in flight are decided now with the results in hand."""
        for camera in self._cameras:
            if camera.subscription is not None:
                self.destroy_subscription(camera.subscription)
                camera.subscription = None
        self._stop_threads()
        self._resolve_open_frames('node deactivated')
        if self._fatal:
            return TransitionCallbackReturn.ERROR  # on to ErrorProcessing
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release the model, the cloud channels and the publishers."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything after a thread died; FAILURE ends in Finalized."""
        self.get_logger().fatal(f'error processing: {self._fatal or "transition failed"}')
        self._release()
        return TransitionCallbackReturn.FAILURE

    @property
    def failed(self) -> str:
        """Return why a thread of the node died ('' while none did)."""
        return self._fatal

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop everything from any state."""
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Stop the threads and the cloud channels; safe after the ROS context has shut down."""
        self._stop_threads()
        with self._lock:
            still_open = self._arbiter.describe_open(self._now_ns())
        if still_open:
            self.get_logger().warning(
                f'{len(still_open)} frame(s) unresolved at shutdown:\n' + '\n'.join(still_open))
        if self._dispatcher is not None:
            self._dispatcher.stop()
            self._dispatcher = None
        for endpoint in self._endpoints:
            endpoint.stop()
        self._endpoints = []
        # What configure froze may now be garbage, and the ROS context among it must be
        # finalized at exit (or FastDDS leaves its shared-memory segments behind).
        gc.unfreeze()

    def _stop_threads(self) -> None:
        self._running = False
        self._slots.close()
        self._wake.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        self._threads = []

    def _resolve_open_frames(self, reason: str) -> None:
        """Decide every open frame now (the threads that would have are stopped)."""
        with self._lock:
            for key in list(self._inflight):
                for call in self._inflight[key].calls.values():
                    call.cancel()
                self._apply(partial(self._abandon, key, reason))

    def _release(self) -> None:
        self.close()
        if self._jump_handle is not None:
            self._jump_handle.unregister()
            self._jump_handle = None
        for camera in self._cameras:
            for publisher in (camera.fused, camera.local, camera.cloud, camera.debug):
                self.destroy_lifecycle_publisher(publisher)
        self._cameras, self._detector = [], None

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Apply run-time changes of the deadline; reject invalid values."""
        budget = self._policy.budget_ns / 1e6
        reference = self._policy.reference.value
        for parameter in parameters:
            if parameter.name == 'deadline_ms':
                budget = parameter.value
            elif parameter.name == 'deadline_reference':
                reference = parameter.value
        try:
            policy = DeadlinePolicy.from_ms(budget, reference)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        self._policy = policy  # applies to frames that start after this point
        return SetParametersResult(successful=True)

    # Frames ------------------------------------------------------------------------------

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_image(self, camera: _Camera, msg: Image | CompressedImage) -> None:
        self._counters['frames_received'] += 1
        self._slots.put(camera.name, _Frame(msg, self._now_ns()))

    def _supervised(self, name: str, loop: Callable[[], None]) -> threading.Thread:
        """Return a thread running ``loop`` whose death, should it happen, ends the node."""
        def run() -> None:
            try:
                loop()
            except BaseException as error:  # noqa: B902 (whatever killed it is reported)
                self._fatal = f'{name} thread died: {error!r}'
                self.get_logger().fatal(f'{self._fatal}\n{traceback.format_exc()}')
                self._fatal_guard.trigger()

        return threading.Thread(target=run, name=name, daemon=True)

    def _on_fatal(self) -> None:
        """On the executor: report the dead thread and leave the Active state through ERROR."""
        self._publish_diagnostics()
        self.trigger_deactivate()

    def _frame_error(self, what: str, error: BaseException) -> None:
        """Log (throttled) and count an exception raised while handling one frame."""
        with self._lock:
            self._counters['frame_errors'] += 1
        self._throttled_error(f'{what} failed: {error!r}')

    def _work(self) -> None:
        while self._running:
            taken = self._slots.take(timeout=0.5)
            if taken is None:
                continue
            camera = next(c for c in self._cameras if c.name == taken[0])
            try:
                self._process(camera, taken[1])
            except Exception as error:  # noqa: B902 (before its race opened: nothing to resolve)
                self._frame_error('preparing a frame', error)

    def _process(self, camera: _Camera, frame: _Frame) -> None:
        assert self._detector is not None
        began = time.perf_counter()
        msg = frame.msg
        try:
            rgb = (compressed_msg_to_rgb(msg) if isinstance(msg, CompressedImage)
                   else image_msg_to_rgb(msg))
        except ImageConversionError as error:
            self._counters['invalid_images'] += 1
            topic = camera.subscription.topic_name if camera.subscription else camera.name
            self._throttled_error(f'dropping image on {topic}: {error}')
            return
        stamp_ns = Time.from_msg(msg.header.stamp).nanoseconds
        start_ns = self._now_ns()
        deadline_ns = self._policy.deadline_ns(stamp_ns, frame.arrival_ns)
        with self._lock:
            plan = (self._dispatcher.plan() if self._dispatcher is not None
                    and self.get_parameter('cloud.enabled').value else Plan())
            resets = self._arbiter.clock_resets.get(camera.name, 0)
            key = self._arbiter.open(camera.name, stamp_ns, start_ns, deadline_ns,
                                     [LOCAL, *(self._sources[n] for n in plan.sources)])
            if key is None:
                self._counters['stale_frames'] += 1
                return
            self._counters['cloud_skipped'] += len(plan.skipped)
            if self._arbiter.clock_resets.get(camera.name, 0) != resets:
                self._counters['clock_resets'] += 1
                self.get_logger().warning(
                    f'camera {camera.name or "image"}: stamp stepped back to '
                    f'{stamp_ns / 1e9:.3f} s; its frame ordering restarts')
            self._counters['frames_processed'] += 1
            watch = camera.debug.get_subscription_count() > 0
            inflight = _InFlight(camera, msg.header, rgb if watch else None, {})
            self._inflight[key] = inflight
        self._wake.set()
        try:
            self._race(key, inflight, rgb, stamp_ns, deadline_ns, plan, began)
        except Exception as error:  # noqa: B902 (one broken frame must not stop the node)
            self._frame_error(f'frame {stamp_ns / 1e9:.3f} of {inflight.header.frame_id!r}', error)
            for call in list(inflight.calls.values()):
                call.cancel()
            self._apply(partial(self._abandon, key, repr(error)))

    def _race(self, key: FrameKey, inflight: _InFlight, rgb: npt.NDArray[np.uint8],
              stamp_ns: int, deadline_ns: int, plan: Plan, began: float) -> None:
        """Send the frame to the planned cloud endpoints, then run the local detector on it."""
        assert self._detector is not None
        if plan.sources:
            try:
                self._dispatch(key, inflight, rgb, stamp_ns, deadline_ns, plan)
            except Exception as error:  # noqa: B902 (the local detector still runs)
                self._frame_error('sending a frame to the cloud', error)
                for call in list(inflight.calls.values()):
                    call.cancel()
                for name in plan.sources:
                    self._apply(partial(self._fail_now, key, name, repr(error)))
        inference_began = time.perf_counter()
        local = self._detector.detect(rgb)
        inference_s = time.perf_counter() - inference_began
        local_msg = detections_msg(local, inflight.header)
        inflight.messages[LOCAL.name] = local_msg
        inflight.camera.local.publish(local_msg)
        self._apply(lambda now: self._arbiter.arrive(key, LOCAL.name, local, now))
        with self._lock:
            self._stats.overhead_ms.append((time.perf_counter() - began - inference_s) * 1e3)

    def _dispatch(self, key: FrameKey, inflight: _InFlight, rgb: npt.NDArray[np.uint8],
                  stamp_ns: int, deadline_ns: int, plan: Plan) -> None:
        assert self._dispatcher is not None
        encoded = encode_frame(rgb, jpeg_quality=self.get_parameter('cloud.jpeg_quality').value,
                               max_image_side=self.get_parameter('cloud.max_image_side').value)
        remaining_ns = deadline_ns - self._now_ns()
        if remaining_ns <= 0:
            for name in plan.sources:
                self._apply(partial(self._fail_now, key, name, 'no time left'))
            return

        def on_call(name: str, call: Call) -> None:
            with self._lock:
                inflight.calls[name] = call
                wanted = self._arbiter.wants(key, name)
            if not wanted:  # decided meanwhile (a hedge, or a deadline passed while encoding)
                call.cancel()

        self._dispatcher.send(plan, encoded, inflight.header.frame_id, stamp_ns,
                              remaining_ns / 1e9, time.time_ns() + remaining_ns,
                              partial(self._on_cloud_reply, key), on_call)

    def _abandon(self, key: FrameKey, error: str, now: int) -> Outcome:
        return self._arbiter.abandon(key, now, error)

    def _fail_now(self, key: FrameKey, source: str, error: str, now: int) -> Outcome:
        return self._arbiter.fail(key, source, now, error)

    def _on_cloud_reply(self, key: FrameKey, reply: CloudReply) -> None:
        """On a gRPC thread: hand one endpoint's outcome to the arbiter, whatever happens."""
        try:
            self._cloud_outcome(key, reply)
        except Exception as error:  # noqa: B902 (the frame must still resolve)
            self._frame_error(f'handling the reply of {reply.endpoint}', error)
            self._apply(partial(self._fail_now, key, reply.endpoint, repr(error)))

    def _cloud_outcome(self, key: FrameKey, reply: CloudReply) -> None:
        inflight = self._inflight.get(key)
        if reply.ok:
            if inflight is not None:
                cloud_msg = detections_msg(reply.detections, inflight.header)
                inflight.messages[reply.endpoint] = cloud_msg
                inflight.camera.cloud.publish(cloud_msg)
            self._apply(lambda now: self._arbiter.arrive(key, reply.endpoint, reply.detections,
                                                         now))
        elif reply.error.startswith('CANCELLED'):
            self._apply(lambda now: self._arbiter.cancelled(key, reply.endpoint, now))
        else:
            self._apply(lambda now: self._arbiter.fail(key, reply.endpoint, now, reply.error))

    def _schedule(self) -> None:
        """Apply each deadline once, sleeping until the next one or until a frame opens."""
        while self._running:
            self._wake.clear()  # before reading the next deadline: no wake-up gets lost
            with self._lock:
                next_ns = self._arbiter.next_deadline_ns()
            self._wake.wait(None if next_ns is None else min(
                MAX_TIMER_S, max(0.0, (next_ns - self._now_ns()) / 1e9)))
            try:
                self._apply(self._arbiter.tick)
            except Exception as error:  # noqa: B902 (the next deadline still needs applying)
                self._frame_error('applying deadlines', error)

    def _on_time_jump(self, jump: TimeJump) -> None:
        """ROS time jumped (use_sim_time): open frames keep their budget, cameras restart."""
        delta_ns = jump.delta.nanoseconds
        with self._lock:
            self._arbiter.shift_clock(delta_ns)
            self._counters['clock_resets'] += 1
        self.get_logger().warning(
            f'ROS time jumped by {delta_ns / 1e9:+.3f} s; frame ordering restarts')
        self._wake.set()

    def _on_health_change(self, endpoint: str, old: str, new: str, error: str) -> None:
        """On the endpoint's thread: log and count a health transition."""
        with self._lock:
            self._health_changes[endpoint] = self._health_changes.get(endpoint, 0) + 1
        text = f'cloud endpoint {endpoint}: {old} -> {new}' + (f' ({error})' if error else '')
        if new == SERVING:
            self.get_logger().info(text)
        else:
            self.get_logger().warning(text)

    def _apply(self, call: Callable[[int], Outcome]) -> None:
        """Run an arbiter call under the lock, publish what it releases, cancel what it asks."""
        with self._lock:
            outcome = call(self._now_ns())
            for decision in outcome.decisions:
                try:
                    self._publish_decision(decision)
                except Exception as error:  # noqa: B902 (later decisions must still go out)
                    self._frame_error('publishing a fused result', error)
            for record in outcome.settled:
                self._stats.add(record)
                inflight = self._inflight.pop(record.key)
                self._decisions.publish(decision_status(
                    record, inflight.header.frame_id, self._policy.budget_ns / 1e6,
                    list(self._sources)))
            calls = [self._inflight[k].calls.get(s) for k, s in outcome.cancel
                     if k in self._inflight]
        for call_future in calls:
            if call_future is not None:
                call_future.cancel()

    def _publish_decision(self, decision: Decision) -> None:
        inflight = self._inflight[decision.key]
        fused = inflight.messages.get(decision.winner or '')
        inflight.camera.fused.publish(
            fused or detections_msg(decision.detections, inflight.header))
        if inflight.rgb is not None:
            self._publish_debug(inflight, decision.detections, decision.winner, decision.late)

    def _publish_debug(self, inflight: _InFlight, detections: Detections, winner: str | None,
                       late: bool) -> None:
        assert inflight.rgb is not None and self._detector is not None
        canvas = draw_debug_image(inflight.rgb, detections, self._detector.categories, winner,
                                  late)
        inflight.camera.debug.publish(rgb_to_image_msg(canvas, inflight.header))

    def _throttled_error(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 1.0:
            self._last_error_log = now
            self.get_logger().error(text)

    def _publish_diagnostics(self) -> None:
        with self._lock:
            health = {e.name: e.health_state for e in self._endpoints}
            statuses = [source_status(self.get_name(), name, self._stats.source(name),
                                      health.get(name, SERVING),
                                      self._health_changes.get(name, 0))
                        for name in [LOCAL.name, *self._sources]]
            counters: dict[str, int | float] = {
                **self._counters, 'dropped_frames': sum(self._slots.dropped.values()),
                'late': self._stats.late, 'no_winner': self._stats.no_winner,
                'open_frames': self._arbiter.open_frames()}
            if self._dispatcher is not None:
                dispatched = self._dispatcher.stats()
                counters.update(cloud_calls=dispatched.sent, cloud_hedged=dispatched.hedged,
                                cloud_hedges_denied=dispatched.hedges_denied)
            for q in (50, 95):
                value = percentile(self._stats.overhead_ms, q)
                counters[f'node_overhead_ms_p{q}'] = round(value, 3) if value is not None else 0
            statuses.append(summary_status(self.get_name(), counters, self._fatal))
        self._diagnostics.publish(DiagnosticArray(
            header=Header(stamp=self.get_clock().now().to_msg()), status=statuses))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(args: list[str] | None = None) -> int:
    """Run the node, configuring and activating it unless ``autostart:=false``."""
    # Own SIGINT/SIGTERM: worker threads must stop before the ROS context goes away.
    rclpy.init(args=args if args is not None else sys.argv,
               signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    node = SpeculativeDetector()
    try:
        if node.autostart:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal('configuration failed; exiting')
                return 1
            node.trigger_activate()
        while rclpy.ok() and not node.failed:  # in slices, so Python signal handlers run
            rclpy.spin_once(node, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 1 if node.failed else 0


if __name__ == '__main__':
    sys.exit(main())
