"""
Drive the vehicle's own :class:`SpeculativeEngine` through a recording in simulated time.

Offline numbers must come from the code that runs on the vehicle, so nothing of the race is
re-implemented here: the real engine, dispatcher and arbiter decide every frame, and only the
world around them is simulated, as discrete events on a virtual clock:

* frames arrive at their recorded stamps (a frame arriving while the detector is busy waits in
  the engine's newest-frame slot, as live);
* the local detector returns the frame's precomputed detections and takes that frame's measured
  inference time; cloud replies and deadlines falling due meanwhile are handled meanwhile, as
  the endpoints' and the deadline thread do live;
* a cloud endpoint decodes the JPEG the engine actually sent, as the server does, runs the cloud
  detector on it (cached per frame and encoding: a fixed encoding repeats across runs) and
  answers after the network model's delay for the real request and response sizes plus the
  measured server time (decode + inference, divided by ``cloud_speedup``). A reply that would
  come after the call's timeout, or never (an outage), fails at the timeout, as gRPC reports a
  call's own deadline.

Encoding the frame takes no virtual time (about 2 ms of a 640x480 frame here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
import hashlib
import heapq
import itertools
import time
from typing import Callable, Protocol, Sequence

import numpy as np
import numpy.typing as npt
from speculative_av.cloud.codec import (build_request, decode_request_image,
                                        detections_to_response, EncodedFrame,
                                        to_original_coordinates)
from speculative_av.cloud.dispatch import CloudDispatcher
from speculative_av.cloud.reply import CloudReply
from speculative_av.core.arbiter import Decision, FrameRecord
from speculative_av.core.detections import Detections
from speculative_av.core.uplink import AdaptiveUplink
from speculative_av.engine.engine import (CALL_TIMED_OUT, EngineSettings, Frame,
                                          SpeculativeEngine)
from speculative_av.netem.profiles import NetworkModel

Image = npt.NDArray[np.uint8]
CAMERA = 'camera'
ENDPOINT = 'cloud'
CLOUD_PRIORITY = 10
UNIX_EPOCH_OFFSET_NS = 1_700_000_000 * 10**9  # virtual wall clock: the request's Unix deadline


@dataclass(frozen=True)
class DriveFrame:
    """A recorded frame with the local detector's answer and its measured inference time."""

    stamp_ns: int
    rgb: Image
    local: Detections
    local_s: float


class CloudDetector(Protocol):
    """What the simulated server needs of the cloud detector."""

    @property
    def model_name(self) -> str:
        """Return the served model's name."""

    @property
    def model_version(self) -> str:
        """Return the served model's version."""

    def detect(self, rgb: Image) -> Detections:
        """Detect objects in one (H, W, 3) uint8 RGB image."""


@dataclass(frozen=True)
class ServerAnswer:
    """The cloud server's answer to one request, and what producing it cost."""

    detections: Detections  # in the camera's coordinates, as the server replies
    decode_s: float
    inference_s: float
    response_bytes: int


class SimulatedServer:
    """The cloud detector behind the simulated endpoints, answering each distinct JPEG once."""

    def __init__(self, detector: CloudDetector,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        """Serve ``detector``; its answers and times measured on ``timer`` are cached."""
        self.detector = detector
        self._timer = timer
        self._answers: dict[tuple[int, bytes], ServerAnswer] = {}

    def answer(self, request_image: EncodedFrame, stamp_ns: int) -> ServerAnswer:
        """Return the answer to ``request_image`` of the frame stamped ``stamp_ns``."""
        key = (stamp_ns, hashlib.sha256(request_image.data).digest())
        if key not in self._answers:
            self._answers[key] = self._serve(request_image)
        return self._answers[key]

    @property
    def answers(self) -> list[ServerAnswer]:
        """Return every answer computed so far."""
        return list(self._answers.values())

    def _serve(self, frame: EncodedFrame) -> ServerAnswer:
        """Decode and detect as the server does, timing both."""
        request = build_request(frame, '', 0, 0)
        started = self._timer()
        rgb = decode_request_image(request)
        decoded = self._timer()
        detections = to_original_coordinates(self.detector.detect(rgb), request,
                                             rgb.shape[1], rgb.shape[0])
        inferred = self._timer()
        response = detections_to_response(
            detections, model_name=self.detector.model_name,
            model_version=self.detector.model_version, server_receive_unix_ns=0, queue_ms=0,
            decode_ms=(decoded - started) * 1e3, inference_ms=(inferred - decoded) * 1e3)
        return ServerAnswer(detections, decoded - started, inferred - decoded,
                            response.ByteSize())


class VirtualClock:
    """Nanoseconds that move only when the simulation moves them."""

    def __init__(self, start_ns: int) -> None:
        """Start at ``start_ns``."""
        self.now_ns = start_ns

    def __call__(self) -> int:
        """Return the virtual time."""
        return self.now_ns


class EventQueue:
    """Timed actions, run in time order (ties in scheduling order) as the clock advances."""

    def __init__(self, clock: VirtualClock) -> None:
        """Schedule on ``clock``; deadlines come from :meth:`attach`'s engine."""
        self.clock = clock
        self._events: list[tuple[int, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._engine: SpeculativeEngine[DriveFrame, None] | None = None

    def attach(self, engine: SpeculativeEngine[DriveFrame, None]) -> None:
        """Apply ``engine``'s deadlines as events too (after other events due at that time)."""
        self._engine = engine

    def schedule(self, at_ns: int, action: Callable[[], None]) -> None:
        """Run ``action`` when the clock reaches ``at_ns`` (at once if that has passed)."""
        heapq.heappush(self._events, (max(at_ns, self.clock()), next(self._order), action))

    def advance_to(self, until_ns: int) -> None:
        """Run every event due by ``until_ns`` at its time, then set the clock there."""
        while self.run_next(until_ns):
            pass
        self.clock.now_ns = max(self.clock.now_ns, until_ns)

    def run_next(self, until_ns: int | None = None) -> bool:
        """Run the earliest event or deadline due by ``until_ns`` (any if None); return if any."""
        deadline_ns = self._engine.next_deadline_ns() if self._engine is not None else None
        event_ns = self._events[0][0] if self._events else None
        due = [t for t in (event_ns, deadline_ns) if t is not None]
        if not due or (until_ns is not None and min(due) > until_ns):
            return False
        if event_ns is not None and (deadline_ns is None or event_ns <= deadline_ns):
            at_ns, _, action = heapq.heappop(self._events)
            self.clock.now_ns = max(self.clock.now_ns, at_ns)
            action()
        else:
            assert self._engine is not None and deadline_ns is not None
            self.clock.now_ns = max(self.clock.now_ns, deadline_ns)
            self._engine.tick()
        return True


class SimulatedDetector:
    """The local detector: a frame's precomputed answer after its measured inference time."""

    def __init__(self, frames: Sequence[DriveFrame], events: EventQueue) -> None:
        """Answer for ``frames``, recognised by their image (the engine passes it through)."""
        self._frames = {id(frame.rgb): frame for frame in frames}
        self._events = events

    def detect(self, rgb: Image) -> Detections:
        """Return the frame's local detections once its inference time has passed."""
        return self.detect_batch([rgb])[0]

    def detect_batch(self, images: Sequence[Image]) -> list[Detections]:
        """Answer several frames, one after the other (no batching speed-up is assumed)."""
        frames = [self._frames[id(image)] for image in images]
        self._events.advance_to(self._events.clock() + round(
            sum(frame.local_s for frame in frames) * 1e9))
        return [frame.local for frame in frames]


@dataclass(frozen=True)
class CallRecord:
    """One simulated cloud call: what was sent and when its reply came or would have come."""

    stamp_ns: int
    sent_ns: int
    image_bytes: int  # the JPEG the engine encoded
    request_bytes: int  # the whole request on the wire
    reply_ns: int | None  # when the reply would arrive, ignoring the timeout; None: outage
    timeout_ns: int

    @property
    def in_time(self) -> bool:
        """Return whether the reply arrived before the call timed out."""
        return self.reply_ns is not None and self.reply_ns <= self.timeout_ns


@dataclass
class SimulatedCall:
    """A call in flight; cancelling it resolves it CANCELLED at once, as gRPC does."""

    endpoint: str
    frame_id: str
    on_done: Callable[[CloudReply], None]
    finished: bool = False

    def finish(self, reply: CloudReply) -> None:
        """Deliver ``reply`` unless the call already ended."""
        if not self.finished:
            self.finished = True
            self.on_done(reply)

    def cancel(self) -> bool:
        """Cancel the call; return False if it already ended."""
        if self.finished:
            return False
        self.finish(CloudReply(self.endpoint, False, error='CANCELLED: Locally cancelled',
                               frame_id=self.frame_id))
        return True


class SimulatedEndpoint:
    """A cloud endpoint behind an emulated network (the dispatcher's ``Endpoint`` protocol)."""

    def __init__(self, name: str, server: SimulatedServer, network: NetworkModel,
                 events: EventQueue, start_ns: int, cloud_speedup: float = 1.0) -> None:
        """Serve through ``network``, whose time 0 is ``start_ns`` on the virtual clock."""
        if not cloud_speedup > 0:
            raise ValueError(f'cloud_speedup must be positive, got {cloud_speedup}')
        self._name = name
        self._server = server
        self._network = network
        self._events = events
        self._start_ns = start_ns
        self._speedup = cloud_speedup
        self.calls: list[CallRecord] = []

    @property
    def name(self) -> str:
        """Return the endpoint's name."""
        return self._name

    @property
    def healthy(self) -> bool:
        """Return True: the simulated server always serves a verified model."""
        return True

    def submit(self, frame: EncodedFrame, frame_id: str, stamp_ns: int, timeout_s: float,
               deadline_unix_ns: int, on_done: Callable[[CloudReply], None]) -> SimulatedCall:
        """Start a call whose reply or timeout is scheduled on the virtual clock."""
        now_ns = self._events.clock()
        request_bytes = build_request(frame, frame_id, stamp_ns, deadline_unix_ns).ByteSize()
        answer = self._server.answer(frame, stamp_ns)
        delay_s = self._network.request_delay_s((now_ns - self._start_ns) / 1e9, request_bytes,
                                                answer.response_bytes)
        decode_s, inference_s = answer.decode_s / self._speedup, answer.inference_s / self._speedup
        round_trip_s = None if delay_s is None else delay_s + decode_s + inference_s
        record = CallRecord(stamp_ns, now_ns, frame.nbytes, request_bytes,
                            None if round_trip_s is None else now_ns + round(round_trip_s * 1e9),
                            now_ns + round(timeout_s * 1e9))
        self.calls.append(record)
        call = SimulatedCall(self._name, frame_id, on_done)
        if record.in_time:
            assert record.reply_ns is not None and round_trip_s is not None
            self._events.schedule(record.reply_ns, lambda: call.finish(CloudReply(
                self._name, True, answer.detections, server_inference_ms=inference_s * 1e3,
                model_name=self._server.detector.model_name,
                model_version=self._server.detector.model_version, frame_id=frame_id,
                round_trip_ms=round_trip_s * 1e3)))
        else:
            self._events.schedule(record.timeout_ns, lambda: call.finish(CloudReply(
                self._name, False, error=CALL_TIMED_OUT, frame_id=frame_id,
                round_trip_ms=timeout_s * 1e3)))
        return call


@dataclass
class FrameOutcome:
    """What the engine handed out for one frame, with when (virtual ns)."""

    local: Detections | None = None
    cloud: dict[str, tuple[Detections, int]] = field(default_factory=dict)
    decision: Decision | None = None
    record: FrameRecord | None = None
    deadline_ns: int = 0


class DriveSink:
    """Collects the engine's outputs per frame stamp; each output checked to come once."""

    def __init__(self, clock: VirtualClock,
                 on_settled: Callable[[Frame[None], FrameRecord], None] | None = None) -> None:
        """Stamp cloud results with ``clock``; pass each settled frame on to ``on_settled``."""
        self._clock = clock
        self._on_settled = on_settled
        self.frames: dict[int, FrameOutcome] = {}

    def wants_image(self, camera: str) -> bool:
        """Return False: no debug view offline."""
        return False

    def local(self, frame: Frame[None], detections: Detections) -> None:
        """Keep the local result."""
        outcome = self._outcome(frame)
        assert outcome.local is None, 'one local result per frame'
        outcome.local = detections

    def cloud(self, frame: Frame[None], endpoint: str, detections: Detections) -> None:
        """Keep a cloud result and when it arrived."""
        self._outcome(frame).cloud[endpoint] = (detections, self._clock())

    def fused(self, frame: Frame[None], decision: Decision) -> None:
        """Keep the fused decision."""
        outcome = self._outcome(frame)
        assert outcome.decision is None, 'one fused result per frame'
        outcome.decision = decision

    def settled(self, frame: Frame[None], record: FrameRecord) -> None:
        """Keep the frame's account (and hand it on, as the node hands it to its recorder)."""
        self._outcome(frame).record = record
        if self._on_settled is not None:
            self._on_settled(frame, record)

    def _outcome(self, frame: Frame[None]) -> FrameOutcome:
        outcome = self.frames.setdefault(frame.stamp_ns, FrameOutcome())
        outcome.deadline_ns = frame.deadline_ns
        return outcome


@dataclass
class DriveResult:
    """A simulated drive: per-frame outputs, the cloud calls made and the engine's counters."""

    frames: dict[int, FrameOutcome]  # by stamp; frames dropped unprocessed are absent
    calls: list[CallRecord]
    counters: dict[str, int | float]

    def cloud_in_time(self, stamp_ns: int) -> Detections | None:
        """Return the frame's cloud result if one arrived by its deadline, else None."""
        outcome = self.frames.get(stamp_ns)
        if outcome is None:
            return None
        for detections, at_ns in outcome.cloud.values():
            if at_ns <= outcome.deadline_ns:
                return detections
        return None

    def bytes_sent(self, stamp_ns: int) -> int:
        """Return the JPEG bytes sent to the cloud for the frame stamped ``stamp_ns``."""
        return sum(call.image_bytes for call in self.calls if call.stamp_ns == stamp_ns)


def simulate_drive(frames: Sequence[DriveFrame], server: SimulatedServer,
                   network: NetworkModel, settings: EngineSettings, *,
                   cloud_speedup: float = 1.0, max_outstanding: int = 4,
                   on_settled: Callable[[Frame[None], FrameRecord], None] | None = None
                   ) -> DriveResult:
    """
    Run ``frames`` (in stamp order) through a :class:`SpeculativeEngine` in virtual time.

    The network model's time 0 is the first frame's stamp; use a fresh model per drive so
    that equal calls draw equal delays. ``settings.uplink`` chooses fixed or adaptive
    encoding; the adaptive uplink starts unlearned and runs on the virtual clock. Every frame
    the engine processed is decided. ``on_settled`` sees each frame's account once all its
    sources have finished, on the virtual clock (the trigger recorder's place on the vehicle).
    """
    if not frames:
        raise ValueError('a drive needs at least one frame')
    stamps = [frame.stamp_ns for frame in frames]
    if any(later <= earlier for earlier, later in zip(stamps, stamps[1:])):
        raise ValueError('frames must be in strictly increasing stamp order')
    clock = VirtualClock(stamps[0])
    events = EventQueue(clock)
    endpoint = SimulatedEndpoint(ENDPOINT, server, network, events, stamps[0], cloud_speedup)
    sink = DriveSink(clock, on_settled)
    engine: SpeculativeEngine[DriveFrame, None] = SpeculativeEngine(
        SimulatedDetector(frames, events), lambda frame: frame.rgb, sink,
        cloud=CloudDispatcher([endpoint], {ENDPOINT: CLOUD_PRIORITY},
                              max_outstanding=max_outstanding, clock=lambda: clock() / 1e9),
        uplink=AdaptiveUplink(clock=lambda: clock() / 1e9),
        settings=settings, clock=clock, wall_clock=lambda: UNIX_EPOCH_OFFSET_NS + clock())
    events.attach(engine)
    for frame in frames:
        events.schedule(frame.stamp_ns,
                        partial(engine.submit, CAMERA, frame, frame.stamp_ns, CAMERA, None))
    while True:
        while engine.process(timeout_s=0):  # the worker: busy while frames wait
            pass
        if not events.run_next():
            break
    undecided = [s for s, outcome in sink.frames.items() if outcome.decision is None]
    if undecided or engine.counters['frame_errors']:
        raise RuntimeError(f'the engine left {len(undecided)} frames undecided and counted '
                           f'{engine.counters["frame_errors"]} frame errors')
    return DriveResult(sink.frames, endpoint.calls, engine.snapshot())
