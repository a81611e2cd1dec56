"""
The vehicle's side of one cloud detector endpoint: asynchronous Detect calls and health.

Health is event-driven: a background thread keeps a grpc.health.v1 ``Watch`` stream open, so the
server pushes every change of its serving status the moment it happens. When the stream breaks
(the server died, the network is gone) the endpoint is unreachable; the thread opens a new
stream as soon as the channel reports it is connected again, and otherwise retries with
exponential backoff. Callers skip endpoints that are not :attr:`CloudEndpoint.healthy`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import logging
import threading
import time
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.cloud import detection_pb2_grpc
from speculative_av.cloud.security import ChannelSecurity
from speculative_av.core.detections import Detections

_LOG = logging.getLogger(__name__)

SERVICE_NAME = detection_pb2.DESCRIPTOR.services_by_name['CloudDetector'].full_name
SERVING = 'SERVING'
NOT_SERVING = 'NOT_SERVING'
UNREACHABLE = 'UNREACHABLE'
UNKNOWN = 'UNKNOWN'


@dataclass(frozen=True)
class CloudReply:
    """The outcome of one Detect call; ``detections`` are in original image coordinates."""

    endpoint: str
    ok: bool
    detections: Detections = field(default_factory=Detections.empty)
    error: str = ''
    server_inference_ms: float = 0.0
    server_queue_ms: float = 0.0
    model_name: str = ''
    model_version: str = ''
    frame_id: str = ''
    round_trip_ms: float = 0.0


@dataclass(frozen=True)
class EndpointHealth:
    """A snapshot of an endpoint's health tracking; times are on the endpoint's clock (s)."""

    state: str
    consecutive_failures: int  # health streams that failed in a row
    next_check_in_s: float  # longest wait before the next stream (0 while one is open)
    last_check_s: float
    last_change_s: float
    last_error: str


HealthListener = Callable[[str, str, str, str], None]  # endpoint, old state, new state, error


class CloudEndpoint:
    """One gRPC cloud detector the vehicle can send frames to."""

    def __init__(self, name: str, target: str, *, security: ChannelSecurity,
                 max_message_mb: int = 16, backoff_initial_s: float = 0.25,
                 backoff_max_s: float = 5.0, reconnect_max_s: float = 0.8,
                 clock: Callable[[], float] = time.monotonic,
                 on_health_change: HealthListener | None = None) -> None:
        """
        Connect to ``target`` ('host:port') and start tracking its health.

        After a failed health stream the next one waits ``backoff_initial_s``, doubling per
        failure up to ``backoff_max_s``, unless the channel connects first. The channel itself
        retries a lost connection at least every ``reconnect_max_s`` (plus gRPC's 20 % jitter),
        which bounds how long a server that is back goes unnoticed. ``on_health_change`` is
        called on every state change, on the endpoint's thread. ``security`` has no default:
        plaintext (:meth:`ChannelSecurity.insecure`) must be a choice. The health stream uses
        the same channel, TLS and token as Detect.
        """
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError('need 0 < backoff_initial_s <= backoff_max_s, got '
                             f'{backoff_initial_s} and {backoff_max_s}')
        self._name = name
        self._target = target
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._on_health_change = on_health_change
        max_bytes = max_message_mb * 1024 * 1024
        self._channel = security.channel(target, options=[
            ('grpc.max_send_message_length', max_bytes),
            ('grpc.max_receive_message_length', max_bytes),
            # A connection whose peer vanished (half-open, blackholed) fails within ~15 s.
            ('grpc.keepalive_time_ms', 10_000),
            ('grpc.keepalive_timeout_ms', 5_000),
            ('grpc.keepalive_permit_without_calls', 1),
            # A keepalive ping may ride on a ping already in flight (BDP probing), which waits
            # grpc.http2.ping_timeout_ms (1 min by default): measured 60 s to notice a
            # half-open connection before this.
            ('grpc.http2.ping_timeout_ms', 5_000),
            ('grpc.http2.max_pings_without_data', 0),  # keep pinging an idle health stream
            # gRPC's own reconnect backoff grows to 120 s; a vehicle wants its cloud back soon.
            ('grpc.initial_reconnect_backoff_ms', int(min(backoff_initial_s, reconnect_max_s)
                                                      * 1e3)),
            ('grpc.max_reconnect_backoff_ms', int(reconnect_max_s * 1e3)),
        ])
        self._stub = detection_pb2_grpc.CloudDetectorStub(self._channel)
        self._health_stub = health_pb2_grpc.HealthStub(self._channel)
        self._lock = threading.Lock()
        now = clock()
        self._health = EndpointHealth(UNKNOWN, 0, 0.0, now, now, '')
        self._stop = threading.Event()
        self._connected = threading.Event()  # the channel became READY: watch again now
        self._watch: Any = None  # the open Watch call, cancelled by stop()
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)
        self._thread = threading.Thread(target=self._track_health, name=f'health-{name}',
                                        daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        """Return what replies and logs call this endpoint."""
        return self._name

    @property
    def target(self) -> str:
        """Return the 'host:port' this endpoint connects to."""
        return self._target

    @property
    def healthy(self) -> bool:
        """Return whether the last health poll saw the detector serving."""
        return self.health_state == SERVING

    @property
    def health_state(self) -> str:
        """Return 'SERVING', 'NOT_SERVING', 'UNREACHABLE' or 'UNKNOWN' (not polled yet)."""
        with self._lock:
            return self._health.state

    def health(self) -> EndpointHealth:
        """Return a snapshot of the health tracking."""
        with self._lock:
            return self._health

    def submit(self, frame: codec.EncodedFrame, frame_id: str, stamp_ns: int, timeout_s: float,
               deadline_unix_ns: int, on_done: Callable[[CloudReply], None]) -> grpc.Future:
        """
        Start a Detect call; ``on_done`` receives its :class:`CloudReply` exactly once.

        ``on_done`` runs on a gRPC thread (on this one if the call ends before ``submit``
        returns), also when the caller cancels the returned future (then with error
        'CANCELLED'). A call failing with UNAVAILABLE marks the endpoint unhealthy until the
        next successful health poll. Do not submit after :meth:`stop`.
        """
        request = codec.build_request(frame, frame_id, stamp_ns, deadline_unix_ns)
        start = self._clock()
        future = self._stub.Detect.future(request, timeout=timeout_s)

        def finish(done: Any) -> None:
            reply = self._reply(done, frame_id, (self._clock() - start) * 1e3)
            try:
                on_done(reply)
            except Exception:  # noqa: B902 (a gRPC thread must not die of a caller's bug)
                _LOG.exception('%s: on_done raised for frame %s', self._name, frame_id)

        future.add_done_callback(finish)
        return future

    def model_info(self, timeout_s: float) -> detection_pb2.ModelInfo | None:
        """Return the served model's description, or None if the call fails."""
        try:
            info: detection_pb2.ModelInfo = self._stub.GetModelInfo(
                detection_pb2.ModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            _LOG.debug('%s: GetModelInfo failed: %s', self._name, _error_text(exc))
            return None
        return info

    def stop(self) -> None:
        """Stop tracking health and close the channel (pending calls end CANCELLED)."""
        self._stop.set()
        self._connected.set()
        self._cancel_watch()
        self._thread.join()
        self._channel.unsubscribe(self._on_connectivity)
        self._channel.close()

    def __enter__(self) -> CloudEndpoint:
        """Return the endpoint; :meth:`stop` runs when the block ends."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the endpoint."""
        self.stop()

    def _reply(self, future: Any, frame_id: str, round_trip_ms: float) -> CloudReply:
        """Turn a finished Detect future into a reply."""
        if future.cancelled():
            return CloudReply(self._name, False, error='CANCELLED', frame_id=frame_id,
                              round_trip_ms=round_trip_ms)
        exc = future.exception()
        if exc is not None:
            error = _error_text(exc)
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._record(UNREACHABLE, error, next_check_in_s=None)
                self._cancel_watch()  # a fresh stream tells whether the server is still there
            return CloudReply(self._name, False, error=error, frame_id=frame_id,
                              round_trip_ms=round_trip_ms)
        response: detection_pb2.DetectResponse = future.result()
        return CloudReply(
            self._name, True, codec.response_to_detections(response),
            server_inference_ms=response.inference_ms, server_queue_ms=response.queue_ms,
            model_name=response.model_name, model_version=response.model_version,
            frame_id=frame_id, round_trip_ms=round_trip_ms)

    def _cancel_watch(self) -> None:
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        """On a gRPC thread: a connection that is (back) up deserves a health stream now."""
        if state is grpc.ChannelConnectivity.READY:
            self._connected.set()

    def _track_health(self) -> None:
        """Keep a health stream open until stopped; between streams, wait for a connection."""
        backoff_s = self._backoff_initial_s
        while not self._stop.is_set():
            self._connected.clear()
            served, state, error = self._watch_health()
            if self._stop.is_set():
                break
            backoff_s = self._backoff_initial_s if served else backoff_s
            self._record(state, error, backoff_s, failed_stream=True)
            self._connected.wait(backoff_s)
            backoff_s = min(2 * backoff_s, self._backoff_max_s)

    def _watch_health(self) -> tuple[bool, str, str]:
        """
        Follow the server's health stream until it ends; return how it ended.

        Returns (whether the stream ever said SERVING, the state after it, the error).
        """
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        served = False
        with self._lock:
            if self._stop.is_set():
                return served, UNKNOWN, 'stopped'
            self._watch = self._health_stub.Watch(request)
        try:
            for response in self._watch:
                serving = response.status == health_pb2.HealthCheckResponse.SERVING
                served = served or serving
                self._record(SERVING if serving else NOT_SERVING, '' if serving else
                             health_pb2.HealthCheckResponse.ServingStatus.Name(response.status),
                             0.0)
            return served, UNREACHABLE, 'the health stream ended'
        except grpc.RpcError as exc:
            state = NOT_SERVING if exc.code() == grpc.StatusCode.NOT_FOUND else UNREACHABLE
            return served, state, _error_text(exc)
        finally:
            with self._lock:
                self._watch = None

    def _record(self, state: str, error: str, next_check_in_s: float | None,
                failed_stream: bool = False) -> None:
        """Store a health observation (``next_check_in_s`` None keeps the current schedule)."""
        now = self._clock()
        with self._lock:
            old = self._health
            failures = 0 if state == SERVING else old.consecutive_failures + failed_stream
            self._health = EndpointHealth(
                state, failures,
                old.next_check_in_s if next_check_in_s is None else next_check_in_s, now,
                now if state != old.state else old.last_change_s, error)
        if state == old.state:
            return
        _LOG.info('%s (%s): %s -> %s %s', self._name, self._target, old.state, state, error)
        if self._on_health_change is not None:
            try:
                self._on_health_change(self._name, old.state, state, error)
            except Exception:  # noqa: B902 (health tracking must outlive a listener's bug)
                _LOG.exception('%s: on_health_change raised', self._name)


def _error_text(exc: BaseException) -> str:
    """Return 'CODE: details' for a failed gRPC call ('CODE' alone without details)."""
    if isinstance(exc, grpc.Call):
        details = exc.details()
        return f'{exc.code().name}: {details}' if details else exc.code().name
    return f'{type(exc).__name__}: {exc}'
