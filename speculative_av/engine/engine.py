"""
The per-frame pipeline of speculative detection, without ROS: one engine for every front end.

For each frame: keep only the newest per camera, convert it, send it to the planned cloud
endpoints, run the local detector (frames of several cameras waiting together in one forward
pass), apply the deadline, let the arbiter choose, hand the results to a sink. The ROS node, the
offline evaluation and the plain-Python API all run this engine; the clock, the detector, the
cloud dispatcher and the sink are injected, so its contract is tested deterministically.

Threads (started by :meth:`SpeculativeEngine.start`, or driven by hand in tests and
simulations): one worker runs :meth:`~SpeculativeEngine.process`, one applies deadlines
(:meth:`~SpeculativeEngine.tick`), and the endpoints' threads deliver cloud replies. Every
arbiter call and every fused output happens under one lock, so fused results leave in stamp
order, exactly once per processed frame. An exception while handling one frame is logged
(throttled), counted as ``frame_errors`` and resolves that frame; a thread that dies anyway is
reported through ``on_fatal``.

The local detector can be swapped while frames flow (:meth:`~SpeculativeEngine.swap_local`, an
over-the-air update): the worker reads it once per batch, so a batch runs wholly on one model,
and each frame records the model that answered it (``Frame.local_model``). A new model is on
probation for its first frames: should it raise on one, the engine goes back to the previous
model and answers that same batch with it, so no frame is lost to a broken update.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
import threading
import time
import traceback
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

import numpy as np
import numpy.typing as npt
from speculative_av.cloud.codec import encode_frame, EncodedFrame
from speculative_av.cloud.dispatch import Call, CloudDispatcher, Plan
from speculative_av.cloud.reply import CloudReply
from speculative_av.core.arbiter import (Arbiter, Decision, DEFAULT_STAMP_BACKSTEP_TOLERANCE_NS,
                                         FrameKey, FrameRecord, Outcome, Source)
from speculative_av.core.backpressure import LatestFrameSlots
from speculative_av.core.deadline import DeadlinePolicy
from speculative_av.core.detections import Detections
from speculative_av.core.stats import percentile, SpeculationStats
from speculative_av.core.throttled_log import ThrottledErrors
from speculative_av.core.uplink import AdaptiveUplink, Encoding

LOCAL_SOURCE = 'local'
LOCAL = Source(LOCAL_SOURCE, 0, cancellable=False)
# Longest the deadline thread sleeps while frames are open: a wall or ROS clock may jump, and
# under simulated time "now" only moves with the simulation.
MAX_TIMER_S = 0.1
# What gRPC reports when a call's own deadline passes. A server that refuses or drops a request
# it cannot finish in time also answers DEADLINE_EXCEEDED, with its own details: that says the
# server is busy, not that the link is slow, and the uplink must not learn it as a link timeout.
CALL_TIMED_OUT = 'DEADLINE_EXCEEDED: Deadline Exceeded'

Raw = TypeVar('Raw')  # a frame as the front end receives it (a ROS message, an array)
Context = TypeVar('Context')  # what the front end keeps with a frame (a ROS header)
Image = npt.NDArray[np.uint8]


class Logger(Protocol):
    """Where the engine logs: rclpy's node logger and :mod:`logging` loggers both fit."""

    def info(self, message: str) -> Any:
        """Log at INFO."""

    def warning(self, message: str) -> Any:
        """Log at WARNING."""

    def error(self, message: str) -> Any:
        """Log at ERROR."""


class LocalDetector(Protocol):
    """What the engine needs of the on-board detector."""

    def detect(self, rgb: Image) -> Detections:
        """Detect objects in one (H, W, 3) uint8 RGB image."""

    def detect_batch(self, images: Sequence[Image]) -> list[Detections]:
        """Detect objects in several images with one forward pass."""


@dataclass(frozen=True)
class LocalModel:
    """The on-board detector and how frames name it (``name:version``)."""

    detector: LocalDetector
    label: str


FIXED_UPLINK = 'fixed'  # every frame encoded with jpeg_quality and max_image_side
ADAPTIVE_UPLINK = 'adaptive'  # each frame's encoding chosen to arrive in time, or not sent
UPLINKS = (FIXED_UPLINK, ADAPTIVE_UPLINK)


@dataclass(frozen=True)
class EngineSettings:
    """What may change while frames flow; each frame keeps the settings it started with."""

    deadline: DeadlinePolicy = DeadlinePolicy.from_ms(150.0)
    cloud_enabled: bool = True
    jpeg_quality: int = 80
    max_image_side: int = 0
    uplink: str = FIXED_UPLINK

    def __post_init__(self) -> None:
        """Refuse settings no frame could be sent with."""
        if self.uplink not in UPLINKS:
            raise ValueError(f'uplink must be one of {UPLINKS}, got {self.uplink!r}')
        Encoding(self.jpeg_quality, self.max_image_side)  # raises ValueError if out of range


@dataclass
class Frame(Generic[Context]):
    """A frame in flight, as the sink sees it."""

    camera: str
    stamp_ns: int
    frame_id: str
    context: Context
    settings: EngineSettings
    deadline_ns: int = 0
    rgb: Image | None = None  # kept only while the sink wants the image (a debug view)
    # Whatever the sink built per source (a ROS message), so the fused output can reuse it.
    outputs: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, Call] = field(default_factory=dict)
    request_bytes: int = 0  # of the encoded frame sent to the cloud (0: not sent)
    local_model: str = ''  # name:version of the local model that answered it ('' until then)
    cloud_models: dict[str, str] = field(default_factory=dict)  # endpoint -> name:version

    @property
    def deadline_ms(self) -> float:
        """Return this frame's deadline budget in ms (the setting when it started)."""
        return self.settings.deadline.budget_ns / 1e6


class EngineSink(Protocol[Context]):
    """Where results go. Called on engine threads; ``fused`` and ``settled`` under its lock."""

    def wants_image(self, camera: str) -> bool:
        """Return whether ``fused`` needs the frame's RGB image (kept until then)."""

    def local(self, frame: Frame[Context], detections: Detections) -> None:
        """Take the local detector's result as soon as it is ready."""

    def cloud(self, frame: Frame[Context], endpoint: str, detections: Detections) -> None:
        """Take a cloud endpoint's result as soon as it arrives (even after the deadline)."""

    def fused(self, frame: Frame[Context], decision: Decision) -> None:
        """Take the frame's one fused result, the moment it is final."""

    def settled(self, frame: Frame[Context], record: FrameRecord) -> None:
        """Take the account of a frame all of whose sources have finished."""


@dataclass
class _Waiting(Generic[Raw, Context]):
    """A received frame waiting for the worker."""

    raw: Raw
    stamp_ns: int
    frame_id: str
    context: Context
    arrival_ns: int


@dataclass
class _Started(Generic[Context]):
    """A frame whose race is open and whose local inference is due."""

    key: FrameKey
    frame: Frame[Context]
    rgb: Image
    began_s: float
    sending: Future[None] | None  # its encoding and cloud dispatch, when on the sender thread


class SpeculativeEngine(Generic[Raw, Context]):
    """Race a local detector against cloud endpoints for every frame, under its deadline."""

    def __init__(self, detector: LocalDetector, to_rgb: Callable[[Raw], Image],
                 sink: EngineSink[Context], *, cloud: CloudDispatcher | None = None,
                 uplink: AdaptiveUplink | None = None,
                 settings: EngineSettings = EngineSettings(),
                 clock: Callable[[], int] = time.monotonic_ns,
                 wall_clock: Callable[[], int] = time.time_ns,
                 timer: Callable[[], float] = time.perf_counter,
                 stamp_backstep_tolerance_ns: int = DEFAULT_STAMP_BACKSTEP_TOLERANCE_NS,
                 batch_cameras: bool = True, logger: Logger | None = None,
                 on_fatal: Callable[[str], None] | None = None,
                 history: SpeculativeEngine[Any, Any] | None = None,
                 concurrent_send: bool = False, local_model: str = '') -> None:
        """
        Build the engine; nothing runs until :meth:`start` (or a hand-driven :meth:`process`).

        ``to_rgb`` converts a received frame and raises ValueError for a malformed one.
        ``clock`` is the time deadlines and stamps are on (ns); ``wall_clock`` gives the Unix
        time sent to the cloud as the request's deadline; ``timer`` (s) measures the node's
        overhead besides inference. ``uplink`` learns from every call
        (its estimates are in :meth:`snapshot`) and chooses encodings when the settings say
        ``uplink='adaptive'``; by default one on the monotonic clock. The counters and stats
        of ``history`` (the engine this one replaces, e.g. after a lifecycle cleanup and
        configure) carry on, so totals stay totals. With ``concurrent_send`` each frame is
        encoded and sent on a sender thread while the local detector runs (both release the
        GIL): the local result is ready that much sooner. Without it, sending comes first, on
        the worker: deterministic under a manual clock. ``local_model`` is how frames name
        ``detector`` (``name:version``).
        """
        self._model = LocalModel(detector, local_model)
        self._previous_model: LocalModel | None = None  # while the current one is on probation
        self._probation_frames = 0
        self._to_rgb = to_rgb
        self._sink = sink
        self._cloud = cloud
        self.uplink = uplink if uplink is not None else AdaptiveUplink()
        self._settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self._timer = timer
        self._batch_cameras = batch_cameras
        self._concurrent_send = concurrent_send
        self._sender: ThreadPoolExecutor | None = None
        self._open_sender()
        self._log = logger
        self._on_fatal = on_fatal
        self._sources = {name: Source(name, priority)
                         for name, priority in (cloud.priorities.items() if cloud else ())}
        self.lock = threading.RLock()  # every arbiter call and fused output happens under it
        self._arbiter = Arbiter(max(0, stamp_backstep_tolerance_ns))
        self._frames: dict[FrameKey, Frame[Context]] = {}
        self.slots: LatestFrameSlots[_Waiting[Raw, Context]] = LatestFrameSlots()
        self.stats: SpeculationStats = history.stats if history is not None else SpeculationStats()
        self.counters: dict[str, int] = history.counters if history is not None else {
            'frames_received': 0, 'frames_processed': 0, 'invalid_images': 0, 'stale_frames': 0,
            'frame_errors': 0, 'clock_resets': 0, 'cloud_skipped': 0, 'cloud_skipped_uplink': 0,
            'cloud_frames_sent': 0, 'cloud_bytes_sent': 0, 'local_batched_frames': 0,
            'local_model_swaps': 0, 'local_model_rollbacks': 0}
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running = False
        self._throttled_error = ThrottledErrors(logger)  # logs one error a second at most
        self.fatal = ''  # why a thread died; set once

    # Settings and inputs ------------------------------------------------------------------

    @property
    def settings(self) -> EngineSettings:
        """Return the settings frames starting now get."""
        return self._settings

    def update(self, **changes: Any) -> EngineSettings:
        """Change settings for frames that start from now on; return the new settings."""
        self._settings = replace(self._settings, **changes)
        return self._settings

    @property
    def detector(self) -> LocalDetector:
        """Return the local detector batches starting now run on."""
        return self._model.detector

    @property
    def local_model(self) -> str:
        """Return the name:version of the local model batches starting now run on."""
        return self._model.label

    def swap_local(self, detector: LocalDetector, label: str, probation_frames: int = 0) -> None:
        """
        Run batches starting from now on ``detector``; the batch in progress finishes on its own.

        For its first ``probation_frames`` frames the model being replaced is kept: if the new
        one raises on them, the engine rolls back to it (counted as ``local_model_rollbacks``)
        and answers that batch with it. A swap during probation keeps the last model that
        passed as the one to roll back to.
        """
        with self.lock:
            if self._previous_model is None:
                self._previous_model = self._model
            self._model = LocalModel(detector, label)
            self._probation_frames = probation_frames
            if probation_frames <= 0:
                self._previous_model = None
            self.counters['local_model_swaps'] += 1
        if self._log is not None:
            self._log.info(f'local model is now {label}')

    @property
    def sources(self) -> list[str]:
        """Return every source's name: local, then the cloud endpoints."""
        return [LOCAL_SOURCE, *self._sources]

    def submit(self, camera: str, raw: Raw, stamp_ns: int, frame_id: str,
               context: Context) -> None:
        """Take a received frame; it replaces the camera's frame still waiting (counted)."""
        self.counters['frames_received'] += 1
        self.slots.put(camera, _Waiting(raw, stamp_ns, frame_id, context, self._clock()))

    # Running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and the deadline thread (and the sender, if sending concurrently)."""
        self._open_sender()
        self.slots = LatestFrameSlots()
        self._running = True
        self._threads = [self._supervised('detector', self._work),
                         self._supervised('deadlines', self._schedule)]
        for thread in self._threads:
            thread.start()

    def _open_sender(self) -> None:
        """Create the sender thread's pool when sending concurrently and none is open."""
        if self._concurrent_send and self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix='cloud-sender')

    def stop(self, reason: str = 'engine stopped') -> None:
        """Stop the threads and decide every open frame now with the results in hand."""
        self._running = False
        self.slots.close()
        self._wake.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        self._threads = []
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None
        with self.lock:
            open_keys = list(self._frames)
            calls = [c for key in open_keys for c in list(self._frames[key].calls.values())]
        for call in calls:  # a cancelled call may settle its frame through its callback
            call.cancel()
        for key in open_keys:
            with self.lock:
                if key in self._frames:
                    self._apply(partial(self._abandon, key, reason))

    def describe_open(self) -> list[str]:
        """Return a line per frame still unresolved."""
        with self.lock:
            return self._arbiter.describe_open(self._clock())

    def process(self, timeout_s: float | None = None) -> int:
        """
        Run the frames waiting now (one per camera), waiting up to ``timeout_s`` for one.

        Each frame's cloud calls go out first; then the local detector runs once over all of
        them (one forward pass when ``batch_cameras``). Returns how many frames were taken.
        """
        taken = self.slots.take_all(timeout_s)
        started: list[_Started[Context]] = []
        for camera, waiting in taken:
            try:
                race = self._start_race(camera, waiting)
            except Exception as error:  # noqa: B902 (before its race opened: nothing to resolve)
                self._frame_error('preparing a frame', error)
                continue
            if race is not None:
                started.append(race)
        if started:
            self._run_local(started)
        return len(taken)

    def tick(self) -> None:
        """Apply every deadline that has passed."""
        self._apply(self._arbiter.tick)

    def next_deadline_ns(self) -> int | None:
        """Return the earliest deadline still to apply, on the engine's clock."""
        with self.lock:
            return self._arbiter.next_deadline_ns()

    def shift_clock(self, delta_ns: int) -> None:
        """Move open frames by a clock jump of ``delta_ns`` (budgets kept); cameras restart."""
        with self.lock:
            self._arbiter.shift_clock(delta_ns)
            self.counters['clock_resets'] += 1
        self._wake.set()

    def snapshot(self) -> dict[str, int | float]:
        """Return the counters and overhead percentiles, for diagnostics and summaries."""
        with self.lock:
            counters: dict[str, int | float] = {
                **self.counters, 'dropped_frames': sum(self.slots.dropped.values()),
                'late': self.stats.late, 'no_winner': self.stats.no_winner,
                'open_frames': self._arbiter.open_frames()}
            if self._cloud is not None:
                dispatched = self._cloud.stats()
                counters.update(cloud_calls=dispatched.sent, cloud_hedged=dispatched.hedged,
                                cloud_hedges_denied=dispatched.hedges_denied)
            for q in (50, 95, 99):
                value = percentile(self.stats.overhead_ms, q)
                counters[f'node_overhead_ms_p{q}'] = round(value, 3) if value is not None else 0
        for endpoint, estimates in self.uplink.snapshot().items():
            for name in ('rtt_ms', 'throughput_kbps', 'server_ms'):
                counters[f'uplink_{endpoint}_{name}'] = round(estimates[name], 1)
        return counters

    # The worker's steps -------------------------------------------------------------------

    def _start_race(self, camera: str,
                    waiting: _Waiting[Raw, Context]) -> _Started[Context] | None:
        """Convert the frame, open its race and send it to the cloud; None if it is dropped."""
        began = self._timer()
        try:
            rgb = self._to_rgb(waiting.raw)
        except ValueError as error:
            self.counters['invalid_images'] += 1
            self._throttled_error(f'dropping image of camera {camera or "image"!r}: {error}')
            return None
        settings = self._settings
        deadline_ns = settings.deadline.deadline_ns(waiting.stamp_ns, waiting.arrival_ns)
        frame = Frame(camera, waiting.stamp_ns, waiting.frame_id, waiting.context, settings,
                      deadline_ns)
        with self.lock:
            plan = (self._cloud.plan() if self._cloud is not None and settings.cloud_enabled
                    else Plan())
            resets = self._arbiter.clock_resets.get(camera, 0)
            key = self._arbiter.open(camera, waiting.stamp_ns, self._clock(), deadline_ns,
                                     [LOCAL, *(self._sources[n] for n in plan.sources)])
            if key is None:
                self.counters['stale_frames'] += 1
                return None
            self.counters['cloud_skipped'] += len(plan.skipped)
            if self._arbiter.clock_resets.get(camera, 0) != resets:
                self.counters['clock_resets'] += 1
                self._warn(f'camera {camera or "image"}: stamp stepped back to '
                           f'{waiting.stamp_ns / 1e9:.3f} s; its frame ordering restarts')
            self.counters['frames_processed'] += 1
            if self._sink.wants_image(camera):
                frame.rgb = rgb
            self._frames[key] = frame
        self._wake.set()
        sending: Future[None] | None = None
        if plan.sources:
            send = partial(self._send_supervised, key, frame, rgb, plan)
            if self._sender is not None:
                sending = self._sender.submit(send)
            else:
                send()
        return _Started(key, frame, rgb, began, sending)

    def _send_supervised(self, key: FrameKey, frame: Frame[Context], rgb: Image,
                         plan: Plan) -> None:
        """Dispatch the frame; should that fail, its cloud sources fail and local still runs."""
        try:
            self._dispatch(key, frame, rgb, plan)
        except Exception as error:  # noqa: B902 (the local detector still runs)
            self._frame_error('sending a frame to the cloud', error)
            for call in list(frame.calls.values()):
                call.cancel()
            for name in plan.sources:
                self._apply(partial(self._fail_now, key, name, repr(error)))

    def _dispatch(self, key: FrameKey, frame: Frame[Context], rgb: Image, plan: Plan) -> None:
        """Encode the frame as the uplink setting says and send it, if it can arrive in time."""
        assert self._cloud is not None
        settings = frame.settings
        height, width = rgb.shape[:2]
        encoding: Encoding | None = Encoding(settings.jpeg_quality, settings.max_image_side)
        if settings.uplink == ADAPTIVE_UPLINK:
            time_left_s = (frame.deadline_ns - self._clock()) / 1e9
            encoding = self.uplink.choose(plan.sources, width, height, time_left_s)
            if encoding is None:
                with self.lock:
                    self.counters['cloud_skipped_uplink'] += 1
                reason = ('no time left' if time_left_s <= 0 else
                          'SKIPPED: the uplink would not deliver it in time')
                for name in plan.sources:
                    self._apply(partial(self._fail_now, key, name, reason))
                return
        assert encoding is not None
        encoded = encode_frame(rgb, jpeg_quality=encoding.jpeg_quality,
                               max_image_side=encoding.max_image_side)
        self.uplink.sent(encoding, width, height, encoded.nbytes, encoded.encode_ms / 1e3)
        remaining_ns = frame.deadline_ns - self._clock()
        if remaining_ns <= 0:
            for name in plan.sources:
                self._apply(partial(self._fail_now, key, name, 'no time left'))
            return
        self._send(key, frame, encoded, plan, remaining_ns)

    def _send(self, key: FrameKey, frame: Frame[Context], encoded: EncodedFrame, plan: Plan,
              remaining_ns: int) -> None:
        assert self._cloud is not None
        frame.request_bytes = encoded.nbytes
        with self.lock:
            self.counters['cloud_frames_sent'] += 1
            self.counters['cloud_bytes_sent'] += encoded.nbytes

        def on_call(name: str, call: Call) -> None:
            with self.lock:
                frame.calls[name] = call
                wanted = self._arbiter.wants(key, name)
            if not wanted:  # decided meanwhile (a hedge, or a deadline passed while encoding)
                call.cancel()

        self._cloud.send(plan, encoded, frame.frame_id, frame.stamp_ns, remaining_ns / 1e9,
                         self._wall_clock() + remaining_ns, partial(self._on_cloud_reply, key),
                         on_call)

    def _run_local(self, started: list[_Started[Context]]) -> None:
        """Run the local detector over the started frames and hand each its result."""
        try:
            inference_s = self._infer(started)
        finally:
            for race in started:  # bounds the sender's queue; waiting for it counts as overhead
                if race.sending is not None:
                    race.sending.result()
        if inference_s is not None:
            overhead_ms = ((self._timer() - started[0].began_s - inference_s) * 1e3
                           / len(started))
            with self.lock:
                self.stats.overhead_ms.extend([overhead_ms] * len(started))

    def _infer(self, started: list[_Started[Context]]) -> float | None:
        """Run the local detector and hand out its results; return its time (None: failed)."""
        inference_began = self._timer()
        model = self._model  # once per batch: a swap meanwhile applies to the next batch
        try:
            results = self._detect(model.detector, started)
        except Exception as error:  # noqa: B902 (one broken inference must not stop the node)
            fallback = self._roll_back(model, error)
            try:
                if fallback is None:
                    raise
                model = fallback
                results = self._detect(model.detector, started)
            except Exception as final_error:  # noqa: B902 (as above)
                for race in started:
                    self._fail_frame(race, final_error)
                return None
        else:
            self._passed_probation(model, len(started))
        inference_s = self._timer() - inference_began
        for race, detections in zip(started, results):
            race.frame.local_model = model.label
            try:
                self._sink.local(race.frame, detections)
                self._apply(partial(self._arrive, race.key, LOCAL_SOURCE, detections))
            except Exception as error:  # noqa: B902 (the frame must still resolve)
                self._fail_frame(race, error)
        return inference_s

    def _detect(self, detector: LocalDetector,
                started: list[_Started[Context]]) -> list[Detections]:
        """Run ``detector`` over the started frames: one forward pass if batching cameras."""
        if len(started) > 1 and self._batch_cameras:
            results = detector.detect_batch([s.rgb for s in started])
            with self.lock:
                self.counters['local_batched_frames'] += len(started)
        else:
            results = [detector.detect(s.rgb) for s in started]
        if len(results) != len(started):
            raise ValueError(f'the local detector returned {len(results)} results for '
                             f'{len(started)} images')
        return results

    def _roll_back(self, failed: LocalModel, error: BaseException) -> LocalModel | None:
        """Return the previous model if ``failed`` is on probation (and restore it), else None."""
        with self.lock:
            previous = self._previous_model
            if previous is None or self._model is not failed:
                return None
            self._model, self._previous_model = previous, None
            self.counters['local_model_rollbacks'] += 1
        if self._log is not None:
            self._log.error(f'local model {failed.label} failed on probation ({error!r}); '
                            f'rolled back to {previous.label}')
        return previous

    def _passed_probation(self, model: LocalModel, frames: int) -> None:
        """Count frames the current model answered; past probation, let the previous go."""
        if self._previous_model is None:  # no probation: nothing to count (the usual batch)
            return
        with self.lock:
            if self._previous_model is not None and self._model is model:
                self._probation_frames -= frames
                if self._probation_frames <= 0:
                    self._previous_model = None

    def _fail_frame(self, race: _Started[Context], error: BaseException) -> None:
        """Count and log a frame's failure, cancel its calls and decide it now."""
        self._frame_error(f'frame {race.frame.stamp_ns / 1e9:.3f} of '
                          f'{race.frame.frame_id!r}', error)
        for call in list(race.frame.calls.values()):
            call.cancel()
        self._apply(partial(self._abandon, race.key, repr(error)))

    # Cloud replies ------------------------------------------------------------------------

    def _on_cloud_reply(self, key: FrameKey, reply: CloudReply) -> None:
        """On an endpoint's thread: hand one endpoint's outcome to the arbiter, whatever."""
        try:
            self._cloud_outcome(key, reply)
        except Exception as error:  # noqa: B902 (the frame must still resolve)
            self._frame_error(f'handling the reply of {reply.endpoint}', error)
            self._apply(partial(self._fail_now, key, reply.endpoint, repr(error)))

    def _cloud_outcome(self, key: FrameKey, reply: CloudReply) -> None:
        frame = self._frames.get(key)
        if frame is not None and frame.request_bytes:
            self._learn(frame.request_bytes, reply)
        if reply.ok:
            if frame is not None:
                frame.cloud_models[reply.endpoint] = f'{reply.model_name}:{reply.model_version}'
                self._sink.cloud(frame, reply.endpoint, reply.detections)
            self._apply(partial(self._arrive, key, reply.endpoint, reply.detections))
        elif reply.error.startswith('CANCELLED'):
            self._apply(lambda now: self._arbiter.cancelled(key, reply.endpoint, now))
        else:
            self._apply(partial(self._fail_now, key, reply.endpoint, reply.error))

    def _learn(self, nbytes: int, reply: CloudReply) -> None:
        """Tell the uplink what a call took (a cancelled or unsent one says nothing)."""
        try:
            if reply.ok:
                self.uplink.replied(reply.endpoint, nbytes, reply.round_trip_ms / 1e3,
                                    (reply.server_queue_ms + reply.server_inference_ms) / 1e3)
            elif reply.round_trip_ms > 0:
                self.uplink.failed(reply.endpoint, nbytes, reply.round_trip_ms / 1e3,
                                   timed_out=reply.error == CALL_TIMED_OUT)
        except ValueError as error:  # a measurement the model refuses: the reply still counts
            self._frame_error(f'learning from the reply of {reply.endpoint}', error)

    # Arbitration and outputs --------------------------------------------------------------

    def _arrive(self, key: FrameKey, source: str, detections: Detections, now: int) -> Outcome:
        return self._arbiter.arrive(key, source, detections, now)

    def _abandon(self, key: FrameKey, error: str, now: int) -> Outcome:
        return self._arbiter.abandon(key, now, error)

    def _fail_now(self, key: FrameKey, source: str, error: str, now: int) -> Outcome:
        return self._arbiter.fail(key, source, now, error)

    def _apply(self, call: Callable[[int], Outcome]) -> None:
        """Run an arbiter call under the lock, hand out what it releases, cancel what it asks."""
        with self.lock:
            outcome = call(self._clock())
            for decision in outcome.decisions:
                try:
                    self._sink.fused(self._frames[decision.key], decision)
                except Exception as error:  # noqa: B902 (later decisions must still go out)
                    self._frame_error('publishing a fused result', error)
            for record in outcome.settled:
                self.stats.add(record)
                frame = self._frames.pop(record.key)
                try:
                    self._sink.settled(frame, record)
                except Exception as error:  # noqa: B902 (the other frames must still settle)
                    self._frame_error('reporting a settled frame', error)
            calls = [self._frames[k].calls.get(s) for k, s in outcome.cancel
                     if k in self._frames]
        for call_future in calls:
            if call_future is not None:
                call_future.cancel()

    # Threads and errors -------------------------------------------------------------------

    def _supervised(self, name: str, loop: Callable[[], None]) -> threading.Thread:
        """Return a thread running ``loop`` whose death, should it happen, is reported."""
        def run() -> None:
            try:
                loop()
            except BaseException as error:  # noqa: B902 (whatever killed it is reported)
                self.fatal = f'{name} thread died: {error!r}'
                if self._log is not None:
                    self._log.error(f'{self.fatal}\n{traceback.format_exc()}')
                if self._on_fatal is not None:
                    self._on_fatal(self.fatal)

        return threading.Thread(target=run, name=name, daemon=True)

    def _work(self) -> None:
        while self._running:
            self.process(timeout_s=0.5)

    def _schedule(self) -> None:
        """Apply each deadline once, sleeping until the next one or until a frame opens."""
        while self._running:
            self._wake.clear()  # before reading the next deadline: no wake-up gets lost
            next_ns = self.next_deadline_ns()
            self._wake.wait(None if next_ns is None else min(
                MAX_TIMER_S, max(0.0, (next_ns - self._clock()) / 1e9)))
            try:
                self.tick()
            except Exception as error:  # noqa: B902 (the next deadline still needs applying)
                self._frame_error('applying deadlines', error)

    def _frame_error(self, what: str, error: BaseException) -> None:
        """Log (throttled) and count an exception raised while handling one frame."""
        with self.lock:
            self.counters['frame_errors'] += 1
        self._throttled_error(f'{what} failed: {error!r}')

    def _warn(self, text: str) -> None:
        if self._log is not None:
            self._log.warning(text)
