"""
The ``speculative_detector`` lifecycle node: a ROS adapter around the speculative engine.

The per-frame pipeline (newest-frame slots, conversion, cloud dispatch, local inference,
deadlines, arbitration) is :class:`~speculative_av.engine.engine.SpeculativeEngine`; this node
declares the parameters, runs the lifecycle, subscribes to the cameras, and publishes what the
engine hands it. The executor only enqueues frames.

Supervision: an exception while handling one frame is logged (throttled), counted as
``frame_errors`` and resolves that frame while the engine goes on. A thread that dies anyway puts
ERROR on /diagnostics and takes the lifecycle node through ErrorProcessing to Finalized, and the
process exits with 1, so a supervisor restarts it instead of a zombie living on.
"""
from __future__ import annotations

from dataclasses import dataclass
import functools
from functools import partial
import gc
import signal
import sys
import traceback
from types import FrameType
from typing import Any, Callable, cast, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import grpc
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
from rclpy.timer import Timer
from sensor_msgs.msg import CompressedImage, Image
from speculative_av.cloud.dispatch import CloudDispatcher
from speculative_av.cloud.endpoint import Endpoint, SERVING
from speculative_av.cloud.endpoint_factory import open_endpoint
from speculative_av.cloud.endpoints import EndpointSpec, parse_endpoints
from speculative_av.core.arbiter import Decision, FrameRecord
from speculative_av.core.deadline import DeadlinePolicy
from speculative_av.core.detections import Detections
from speculative_av.core.uplink import AdaptiveUplink
from speculative_av.detectors.torchvision_detector import TORCH_BACKEND, TorchvisionDetector
from speculative_av.engine.engine import (EngineSettings, FIXED_UPLINK, Frame, LOCAL_SOURCE,
                                          SpeculativeEngine)
from speculative_av.engine.shadow import ShadowRunner
from speculative_av.fleet.model_manifest import (load_public_keys, ModelManifest,
                                                 verify_manifest)
from speculative_av.fleet.model_updater import ModelUpdater
from speculative_av.fleet.recorder import TriggerRecorder
from speculative_av.fleet.released_model import load_released
from speculative_av.fleet.snippets import SnippetEntry
from speculative_av.fleet.uploader import SnippetUploader
from speculative_av.ros.fleet_parameters import (declare_shadow_parameters,
                                                 declare_trigger_parameters,
                                                 declare_upload_parameters, shadow_runner,
                                                 snippet_uploader, trigger_recorder,
                                                 trigger_status, upload_security, upload_status)
from speculative_av.ros.image_conversion import (compressed_msg_to_rgb, image_msg_to_rgb,
                                                 rgb_to_image_msg)
from speculative_av.ros.messages import (decision_status, detections_msg, draw_debug_image,
                                         label_info_msg, model_update_status, shadow_status,
                                         source_status, summary_status)
from speculative_av.ros.parameters import declare, declare_link_security, link_security
from std_msgs.msg import Header
from vision_msgs.msg import Detection2DArray, LabelInfo

# Parameters the engine reads per frame, settable at run time.
# A new local model answers this many frames before the one it replaced is let go; should it fail
# on one of them, the engine rolls back to that one.
MODEL_PROBATION_FRAMES = 10
RUNTIME_SETTINGS = ('deadline_ms', 'deadline_reference', 'cloud.enabled', 'cloud.jpeg_quality',
                    'cloud.max_image_side', 'cloud.uplink')


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


def _to_rgb(msg: Image | CompressedImage) -> npt.NDArray[np.uint8]:
    """Convert a received image (ImageConversionError, a ValueError, for a malformed one)."""
    if isinstance(msg, CompressedImage):
        return compressed_msg_to_rgb(msg)
    return image_msg_to_rgb(msg)


Transition = TypeVar('Transition', bound=Callable[..., TransitionCallbackReturn])


def _logged(transition: Transition) -> Transition:
    """Log an exception escaping a lifecycle transition (rclpy turns it into ERROR silently)."""
    @functools.wraps(transition)
    def run(node: SpeculativeDetector, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            return transition(node, state)
        except Exception:
            node.get_logger().error(f'{transition.__name__} raised:\n{traceback.format_exc()}')
            raise
    return cast(Transition, run)


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
        declare(self, 'deadline_ms', 150.0,
                'Per-frame budget in ms; the fused result is never later than this '
                '(unless the local detector itself is slower). Settable at run time.',
                value_range=(1.0, 60_000.0))
        declare(self, 'deadline_reference', 'stamp',
                "What the deadline counts from: 'stamp' (image header stamp) or "
                "'arrival' (reception by this node). Settable at run time.")
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
        declare(self, 'local.batch_cameras', True,
                'Frames of several cameras waiting together go through the local detector in '
                'one forward pass (torch backend; onnxruntime runs them one by one).',
                read_only=True)
        # Over-the-air model updates (README, "Over-the-air model updates").
        declare(self, 'local.model_manifest', '',
                "A signed model manifest (model_release sign); '' = local.model and "
                'local.weights. Setting it at run time verifies, loads and warms the model up in '
                'the background and swaps it in between frames; a failure keeps the current '
                'model (logged, counted on /diagnostics).')
        declare(self, 'local.trusted_keys', [''],
                'Ed25519 public keys (PEM files) a model manifest must be signed with; none = '
                'every manifest is refused.', read_only=True)
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
        declare(self, 'cloud.uplink', FIXED_UPLINK,
                "How frames are encoded for the cloud: 'fixed' (cloud.jpeg_quality, "
                "cloud.max_image_side) or 'adaptive' (per frame, the best quality and scale "
                'predicted to arrive by the deadline from recent calls; a frame predicted not to '
                'is not sent, counted as cloud_skipped_uplink). Settable at run time.')
        declare(self, 'cloud.uplink_probe_interval_ms', 1000.0,
                'Adaptive uplink: while every frame is predicted too late, still send one (at '
                'the smallest size) this often, so the estimate can recover.', read_only=True,
                value_range=(1.0, 600_000.0))
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
        declare_link_security(self, 'cloud', 'server')
        declare_trigger_parameters(self)
        declare_upload_parameters(self)
        declare_shadow_parameters(self)
        self.settings = self._settings_from({})  # what frames starting now get
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.engine: SpeculativeEngine[Image | CompressedImage, Header] | None = None
        self._health_changes: dict[str, int] = {}
        self._fatal_guard = self.create_guard_condition(self._on_fatal)
        self._jump_handle: JumpHandle | None = None
        self._endpoints: list[Endpoint[Any]] = []
        self._dispatcher: CloudDispatcher | None = None
        self._cameras: dict[str, _Camera] = {}
        self._detector: TorchvisionDetector | None = None
        self._shadow: ShadowRunner | None = None
        self._updater: ModelUpdater[TorchvisionDetector] | None = None
        self._trusted_keys: list[Ed25519PublicKey] = []
        self._diagnostics_timer: Timer | None = None
        self._recorder: TriggerRecorder | None = None
        self._uploader: SnippetUploader[SnippetEntry] | None = None
        self._upload_channel: grpc.Channel | None = None

    # Lifecycle ---------------------------------------------------------------------------

    @_logged
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the local model, connect to the cloud endpoints, create publishers."""
        try:
            settings = self.settings
            self._trusted_keys = load_public_keys(
                [k for k in self.get_parameter('local.trusted_keys').value if k])
            manifest_path = self.get_parameter('local.model_manifest').value
            if manifest_path:
                manifest = verify_manifest(manifest_path, self._trusted_keys)
                self._detector = self._load_released(manifest, None)
                model_label = manifest.label
            else:
                threads = self.get_parameter('local.threads').value
                self._detector = TorchvisionDetector(
                    self.get_parameter('local.model').value,
                    self.get_parameter('local.weights').value,
                    self.get_parameter('local.device').value,
                    self.get_parameter('local.score_threshold').value, threads=threads or None,
                    backend=self.get_parameter('local.backend').value)
                model_label = f'{self._detector.model_name}:{self._detector.model_version}'
            # Endpoints are connected at configure only if the cloud is enabled then.
            specs: list[EndpointSpec] = (
                parse_endpoints(self.get_parameter('cloud.endpoints').value)
                if settings.cloud_enabled else [])
            _check_cameras(self.get_parameter('cameras').value,
                           self.get_parameter('image_transport').value)
            security = link_security(self, 'cloud')
            self._recorder = trigger_recorder(self, self._detector.categories)
            uploading = upload_security(self)
        except (ValueError, RuntimeError, OSError) as error:
            self.get_logger().error(f'configure failed: {error}')
            return TransitionCallbackReturn.FAILURE
        detector = self._detector
        # Pay the first-inference cost (allocations, kernel selection) before frames count.
        detector.detect(np.zeros((480, 640, 3), np.uint8))
        try:
            self._shadow = shadow_runner(self, detector)
        except (ValueError, RuntimeError, OSError) as error:
            self.get_logger().error(f'configure failed: shadow candidate: {error}')
            return TransitionCallbackReturn.FAILURE
        # The model and the libraries are ~400k objects that live as long as the node; a full
        # garbage collection scanning them stalls every thread ~200 ms (measured: fused results
        # that late). Frozen, they are left out of collections until close() thaws them.
        gc.collect()
        gc.freeze()
        tolerance_ns = round(self.get_parameter('stamp_backstep_tolerance_ms').value * 1e6)
        if self.get_parameter('use_sim_time').value:
            self._jump_handle = self.get_clock().create_jump_callback(
                JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-max(
                    1, tolerance_ns)), on_clock_change=True), post_callback=self._on_time_jump)
        if security.credentials is None and specs:
            self.get_logger().warning(
                'cloud.insecure is true: frames go to the cloud in PLAINTEXT, without TLS or '
                'token; use this only for a server on this machine or a trusted network')
        self._health_changes = {s.name: 0 for s in specs}
        self._endpoints = [open_endpoint(s, security=security, categories=detector.categories,
                                         on_health_change=self._on_health_change)
                           for s in specs]
        hedge_after_ms = self.get_parameter('cloud.hedge_after_ms').value
        self._dispatcher = CloudDispatcher(
            self._endpoints, {s.name: s.priority for s in specs},
            max_outstanding=self.get_parameter('cloud.max_outstanding').value,
            hedge_after_s=hedge_after_ms / 1e3 if hedge_after_ms > 0 else None,
            hedge_ratio=self.get_parameter('cloud.hedge_ratio').value) if specs else None
        uplink = AdaptiveUplink(
            probe_interval_s=self.get_parameter('cloud.uplink_probe_interval_ms').value / 1e3)
        self.engine = SpeculativeEngine(
            detector, _to_rgb, self, cloud=self._dispatcher, uplink=uplink, settings=settings,
            clock=self._now_ns, stamp_backstep_tolerance_ns=tolerance_ns,
            logger=self.get_logger(), on_fatal=lambda _: self._fatal_guard.trigger(),
            history=self.engine, concurrent_send=True,
            batch_cameras=self.get_parameter('local.batch_cameras').value,
            local_model=model_label)
        self._updater = ModelUpdater(
            lambda path: verify_manifest(path, self._trusted_keys),
            lambda manifest: self._load_released(manifest, detector.categories),
            self._install_model, self.get_logger())
        self.get_logger().info(
            f'local detector {model_label} ({detector.model_name}) on '
            f'{detector.device}; cloud: '
            + (', '.join(f'{s.name}={s.target}@{s.priority}' for s in specs) or 'disabled'))
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._label_info = self.create_lifecycle_publisher(LabelInfo, 'label_info', latched)
        self._decisions = self.create_lifecycle_publisher(
            DiagnosticStatus, 'speculation/decisions', 100)
        self._diagnostics = self.create_lifecycle_publisher(DiagnosticArray, '/diagnostics', 10)
        for name in self.get_parameter('cameras').value:
            def publisher(msg_type: type, leaf: str, depth: int = 10) -> LifecyclePublisher:
                return self.create_lifecycle_publisher(msg_type, _camera_topic(name, leaf), depth)

            self._cameras[name] = _Camera(
                name, publisher(Detection2DArray, 'detections'),
                publisher(Detection2DArray, 'detections/local'),
                publisher(Detection2DArray, 'detections/cloud'),
                publisher(Image, 'debug_image', 2))
        # Health is reported in real time, also while a replay's /clock is paused or absent.
        self._diagnostics_timer = self.create_timer(
            1.0, self._publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))
        if uploading is not None and self._recorder is None:
            self.get_logger().warning('upload.enabled is true but triggers keep no snippets '
                                      '(triggers.enabled false): nothing to upload')
        elif uploading is not None and self._recorder is not None:
            self._uploader, self._upload_channel = snippet_uploader(
                self, uploading, self._recorder.store, self._dispatcher)
        return TransitionCallbackReturn.SUCCESS

    @_logged
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the cameras and start the engine's threads."""
        result = super().on_activate(state)
        assert self._detector is not None and self.engine is not None
        self._label_info.publish(label_info_msg(
            self._detector.categories, self._detector.score_threshold,
            Header(stamp=self.get_clock().now().to_msg())))
        compressed = self.get_parameter('image_transport').value == 'compressed'
        for camera in self._cameras.values():
            msg_type, topic = ((CompressedImage, camera.topic('image/compressed')) if compressed
                               else (Image, camera.topic('image')))
            camera.subscription = self.create_subscription(
                msg_type, topic, partial(self._on_image, camera.name), qos_profile_sensor_data)
        self.engine.start()
        if self._shadow is not None:
            self._shadow.start()
        return result

    @_logged
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop taking frames; frames in flight are decided now with the results in hand."""
        for camera in self._cameras.values():
            if camera.subscription is not None:
                self.destroy_subscription(camera.subscription)
                camera.subscription = None
        if self.engine is not None:
            self.engine.stop('node deactivated')
        if self._shadow is not None:
            self._shadow.stop()
        if self.failed:
            return TransitionCallbackReturn.ERROR  # on to ErrorProcessing
        return super().on_deactivate(state)

    @_logged
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release the model, the cloud channels and the publishers."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    @_logged
    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything after a thread died; FAILURE ends in Finalized."""
        self.get_logger().fatal(f'error processing: {self.failed or "transition failed"}')
        self._release()
        return TransitionCallbackReturn.FAILURE

    @property
    def failed(self) -> str:
        """Return why a thread of the node died ('' while none did)."""
        return self.engine.fatal if self.engine is not None else ''

    @_logged
    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop everything from any state."""
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Stop the engine and the cloud channels; safe after the ROS context has shut down."""
        if self._updater is not None:
            self._updater.close()
            self._updater = None
        if self.engine is not None:
            still_open = self.engine.describe_open()
            if still_open:
                self.get_logger().warning(f'{len(still_open)} frame(s) unresolved at shutdown:\n'
                                          + '\n'.join(still_open))
            self.engine.stop('node shutting down')
        if self._recorder is not None:  # after the engine: its last settled frames still count
            self._recorder.stop()
        if self._uploader is not None:  # ends after the chunk in flight; the collector keeps it
            self._uploader.stop()
            self._uploader = None
        if self._upload_channel is not None:
            self._upload_channel.close()
            self._upload_channel = None
        if self._shadow is not None:
            self._shadow.stop()
        if self._dispatcher is not None:
            self._dispatcher.stop()
            self._dispatcher = None
        for endpoint in self._endpoints:
            endpoint.stop()
        self._endpoints = []
        # What configure froze may now be garbage, and the ROS context among it must be
        # finalized at exit (or FastDDS leaves its shared-memory segments behind).
        gc.unfreeze()

    def _release(self) -> None:
        self.close()
        if self._jump_handle is not None:
            self._jump_handle.unregister()
            self._jump_handle = None
        for camera in self._cameras.values():
            for publisher in (camera.fused, camera.local, camera.cloud, camera.debug):
                self.destroy_lifecycle_publisher(publisher)
        if self._diagnostics_timer is not None:  # configure creates them all again
            self.destroy_timer(self._diagnostics_timer)
            self._diagnostics_timer = None
            for publisher in (self._label_info, self._decisions, self._diagnostics):
                self.destroy_lifecycle_publisher(publisher)
        self._cameras, self._detector, self._recorder, self._shadow = {}, None, None, None

    def _settings_from(self, changes: dict[str, Any]) -> EngineSettings:
        """Return the engine settings of the run-time parameters, with ``changes`` applied."""
        value = {name: changes[name] if name in changes else self.get_parameter(name).value
                 for name in RUNTIME_SETTINGS}
        return EngineSettings(
            DeadlinePolicy.from_ms(value['deadline_ms'], value['deadline_reference']),
            cloud_enabled=value['cloud.enabled'], jpeg_quality=value['cloud.jpeg_quality'],
            max_image_side=value['cloud.max_image_side'], uplink=value['cloud.uplink'])

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Apply run-time settings to frames that start from now on; reject invalid values."""
        for parameter in parameters:
            if parameter.name == 'local.model_manifest':
                result = self._on_model_manifest(parameter.value)
                if not result.successful:
                    return result
        changes = {p.name: p.value for p in parameters if p.name in RUNTIME_SETTINGS}
        if not changes:
            return SetParametersResult(successful=True)
        try:
            settings = self._settings_from(changes)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        self.settings = settings
        if self.engine is not None:
            self.engine.update(**vars(settings))
        return SetParametersResult(successful=True)

    # Over-the-air model updates ------------------------------------------------------------

    def _on_model_manifest(self, path: Any) -> SetParametersResult:
        """Accept a manifest for a background update; its outcome goes to the log, diagnostics."""
        if not isinstance(path, str):
            return SetParametersResult(successful=False, reason='a manifest path is a string')
        if not path or self._updater is None:  # not configured yet: configure loads it
            return SetParametersResult(successful=True)
        if not self._trusted_keys:
            return SetParametersResult(
                successful=False, reason='local.trusted_keys is empty: no manifest can verify')
        self._updater.request(path)
        return SetParametersResult(successful=True)

    def _load_released(self, manifest: ModelManifest,
                       categories: list[str] | None) -> TorchvisionDetector:
        threads = self.get_parameter('local.threads').value
        return load_released(manifest, device=self.get_parameter('local.device').value,
                             score_threshold=self.get_parameter('local.score_threshold').value,
                             threads=threads or None,
                             backend=self.get_parameter('local.backend').value,
                             categories=categories)

    def _install_model(self, detector: TorchvisionDetector, manifest: ModelManifest) -> None:
        """On the updater's thread: swap the warmed-up model in between frames."""
        assert self.engine is not None
        self.engine.swap_local(detector, manifest.label, MODEL_PROBATION_FRAMES)
        self._detector = detector
        gc.freeze()  # the new model's objects, like the first's, stay out of collections

    # Frames in, results out (the engine's sink) ------------------------------------------

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_image(self, camera: str, msg: Image | CompressedImage) -> None:
        assert self.engine is not None
        self.engine.submit(camera, msg, Time.from_msg(msg.header.stamp).nanoseconds,
                           msg.header.frame_id, msg.header)

    def wants_image(self, camera: str) -> bool:
        """Keep a frame's image for triggers, shadow mode or a debug image watcher."""
        return (self._recorder is not None or self._shadow is not None
                or self._cameras[camera].debug.get_subscription_count() > 0)

    def local(self, frame: Frame[Header], detections: Detections) -> None:
        """Publish the local result on detections/local."""
        msg = detections_msg(detections, frame.context)
        frame.outputs[LOCAL_SOURCE] = msg
        self._cameras[frame.camera].local.publish(msg)
        if self._shadow is not None and frame.rgb is not None:
            self._shadow.offer((frame.camera, frame.stamp_ns), frame.rgb, detections)

    def cloud(self, frame: Frame[Header], endpoint: str, detections: Detections) -> None:
        """Publish a cloud result on detections/cloud."""
        msg = detections_msg(detections, frame.context)
        frame.outputs[endpoint] = msg
        self._cameras[frame.camera].cloud.publish(msg)

    def fused(self, frame: Frame[Header], decision: Decision) -> None:
        """Publish the fused result (the winner's message, built once) and the debug image."""
        camera = self._cameras[frame.camera]
        camera.fused.publish(frame.outputs.get(decision.winner or '')
                             or detections_msg(decision.detections, frame.context))
        if (frame.rgb is not None and self._detector is not None
                and camera.debug.get_subscription_count() > 0):
            canvas = draw_debug_image(frame.rgb, decision.detections, self._detector.categories,
                                      decision.winner, decision.late)
            camera.debug.publish(rgb_to_image_msg(canvas, frame.context))

    def settled(self, frame: Frame[Header], record: FrameRecord) -> None:
        """Publish the frame's account on speculation/decisions, with its own deadline."""
        assert self.engine is not None
        self._decisions.publish(decision_status(record, frame.frame_id, frame.deadline_ms,
                                                self.engine.sources[1:], frame.local_model))
        if self._recorder is not None:
            self._recorder.offer(frame.camera, frame.stamp_ns, frame.frame_id, frame.rgb, record,
                                 self.engine.sources[1:], frame.local_model, frame.cloud_models)
        if self._shadow is not None:
            self._shadow.settled((frame.camera, frame.stamp_ns),
                                 record.cloud_answer(self.engine.sources[1:])[1])

    # Supervision and diagnostics ---------------------------------------------------------

    def _on_fatal(self) -> None:
        """On the executor: report the dead thread and leave the Active state through ERROR."""
        self._publish_diagnostics()
        self.trigger_deactivate()

    def _on_time_jump(self, jump: TimeJump) -> None:
        """ROS time jumped (use_sim_time): open frames keep their budget, cameras restart."""
        delta_ns = jump.delta.nanoseconds
        if self.engine is not None:
            self.engine.shift_clock(delta_ns)
        self.get_logger().warning(
            f'ROS time jumped by {delta_ns / 1e9:+.3f} s; frame ordering restarts')

    def _on_health_change(self, endpoint: str, old: str, new: str, error: str) -> None:
        """On the endpoint's thread: log and count a health transition."""
        self._health_changes[endpoint] = self._health_changes.get(endpoint, 0) + 1
        text = f'cloud endpoint {endpoint}: {old} -> {new}' + (f' ({error})' if error else '')
        if new == SERVING:
            self.get_logger().info(text)
        else:
            self.get_logger().warning(text)

    def _publish_diagnostics(self) -> None:
        engine = self.engine
        if engine is None:
            return
        health = {e.name: e.health_state for e in self._endpoints}
        counters = engine.snapshot()
        with engine.lock:
            statuses = [source_status(self.get_name(), name, engine.stats.source(name),
                                      health.get(name, SERVING),
                                      self._health_changes.get(name, 0))
                        for name in engine.sources]
        statuses.append(summary_status(self.get_name(), counters, self.failed))
        if self._recorder is not None:
            statuses.append(trigger_status(self.get_name(), self._recorder))
        if self._uploader is not None:
            statuses.append(upload_status(self.get_name(), self._uploader))
        if self._shadow is not None:
            statuses.append(shadow_status(self.get_name(), self._shadow.name,
                                          self._shadow.snapshot(), self._shadow.fatal))
        if self._updater is not None:
            statuses.append(model_update_status(
                self.get_name(), engine.local_model, self._updater.counters,
                self._updater.times, self._updater.last_error,
                {k: int(counters[f'local_model_{k}']) for k in ('swaps', 'rollbacks')}))
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
