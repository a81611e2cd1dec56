"""
What every cloud endpoint shares, whatever protocol it speaks: health, label checks and calls.

An endpoint is healthy only while its server serves AND the model behind it was verified since
it last became serving: the model's labels map onto the vehicle's (native protocol), or the
model declares the tensor contract (Open Inference Protocol). A supervised background thread
runs one health *session* after another (a grpc.health.v1 Watch stream, or a series of readiness
polls); after a session fails the next one waits, with exponential backoff, unless the channel
connects first. Replies come back in the vehicle's label ids; a reply from a model other than
the verified one is refused and the endpoint verifies again. Callers skip endpoints that are
not :attr:`Endpoint.healthy`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
import logging
import threading
import time
from typing import Any, Callable, Generic, Protocol, TypeVar

import grpc
from speculative_av.cloud.codec import EncodedFrame
from speculative_av.cloud.reply import CloudReply
from speculative_av.cloud.security import ChannelSecurity

_LOG = logging.getLogger(__name__)

SERVING = 'SERVING'
NOT_SERVING = 'NOT_SERVING'
UNREACHABLE = 'UNREACHABLE'
UNVERIFIED = 'UNVERIFIED'  # the server serves, but its model failed the label/contract check
UNKNOWN = 'UNKNOWN'
VERIFY_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class EndpointHealth:
    """A snapshot of an endpoint's health tracking; times are on the endpoint's clock (s)."""

    state: str
    consecutive_failures: int  # health sessions that failed in a row
    next_check_in_s: float  # longest wait before the next check (0 while a stream is open)
    last_check_s: float
    last_change_s: float
    last_error: str


HealthListener = Callable[[str, str, str, str], None]  # endpoint, old state, new state, error
ReplyListener = Callable[[CloudReply], None]


class CallHandle(Protocol):
    """A call in flight; cancelling it ends it with a 'CANCELLED' reply."""

    def cancel(self) -> bool:
        """Cancel the call; return False if it already ended."""


class VerificationError(Exception):
    """The served model cannot be used: its labels or tensors do not fit (message says why)."""


class ReplyError(ValueError):
    """A reply that cannot be used (malformed tensors, out-of-range values)."""


class ModelChanged(ReplyError):
    """A reply came from another model than the verified one."""


ModelT = TypeVar('ModelT')  # what a verification found: the model's identity and label map


class Endpoint(abc.ABC, Generic[ModelT]):
    """One cloud detector the vehicle can send frames to, over one gRPC channel."""

    def __init__(self, name: str, target: str, *, security: ChannelSecurity,
                 categories: list[str], max_message_mb: int = 16,
                 backoff_initial_s: float = 0.25, backoff_max_s: float = 5.0,
                 reconnect_max_s: float = 0.8, clock: Callable[[], float] = time.monotonic,
                 on_health_change: HealthListener | None = None,
                 private_connection: bool = False) -> None:
        """
        Open the channel to ``target`` ('host:port'); subclasses then call :meth:`_start`.

        ``categories`` are the vehicle's class names (index = local label id): replies are
        translated into them. After a failed health session the next one waits
        ``backoff_initial_s``, doubling per failure up to ``backoff_max_s``, unless the channel
        connects first. The channel retries a lost connection at least every
        ``reconnect_max_s`` (plus gRPC's 20 % jitter), which bounds how long a server that is
        back goes unnoticed. ``on_health_change`` is called on every state change, on the
        endpoint's thread. ``security`` has no default: plaintext
        (:meth:`ChannelSecurity.insecure`) must be a choice. gRPC shares one connection
        between channels to the same target; ``private_connection`` gives this endpoint its
        own, as a separate vehicle has (``fleet_load`` simulates many in one process).
        """
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError('need 0 < backoff_initial_s <= backoff_max_s, got '
                             f'{backoff_initial_s} and {backoff_max_s}')
        if not categories:
            raise ValueError('an endpoint needs the local categories to map replies onto')
        self._name = name
        self._target = target
        self._categories = list(categories)
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
            *([('grpc.use_local_subchannel_pool', 1)] if private_connection else []),
        ])
        self._lock = threading.Lock()
        now = clock()
        self._health = EndpointHealth(UNKNOWN, 0, 0.0, now, now, '')
        self._verified: ModelT | None = None  # set only while SERVING
        self._interrupted: tuple[str, str] | None = None  # why the open session must end
        self._stop = threading.Event()
        self._connected = threading.Event()  # the channel became READY: check again now
        self._thread = threading.Thread(target=self._track_health, name=f'health-{name}',
                                        daemon=True)

    def _start(self) -> None:
        """Start tracking health (once the subclass has its stubs)."""
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)
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
        """Return whether the server serves a verified model."""
        return self.health_state == SERVING

    @property
    def health_state(self) -> str:
        """Return SERVING, NOT_SERVING, UNREACHABLE, UNVERIFIED or UNKNOWN (not checked yet)."""
        with self._lock:
            return self._health.state

    def health(self) -> EndpointHealth:
        """Return a snapshot of the health tracking."""
        with self._lock:
            return self._health

    def submit(self, frame: EncodedFrame, frame_id: str, stamp_ns: int, timeout_s: float,
               deadline_unix_ns: int, on_done: ReplyListener) -> CallHandle:
        """
        Start a call; ``on_done`` receives its :class:`CloudReply` exactly once.

        ``on_done`` runs on a gRPC thread (on this one if the call ends before ``submit``
        returns), also when the caller cancels the returned handle (then with error
        'CANCELLED'). A call failing with UNAVAILABLE marks the endpoint unreachable until the
        next successful health check. A reply is refused ('labels not verified') unless the
        model was verified, and ('model changed') if another model answered. Do not submit
        after :meth:`stop`.
        """
        start = self._clock()
        future = self._start_call(frame, frame_id, stamp_ns, timeout_s, deadline_unix_ns)

        def finish(done: Any) -> None:
            round_trip_ms = (self._clock() - start) * 1e3
            try:
                reply = self._reply(done, frame, frame_id, round_trip_ms)
            except Exception as exc:  # noqa: B902 (the frame must still resolve)
                _LOG.exception('%s: handling the reply to frame %s failed', self._name, frame_id)
                reply = CloudReply(self._name, False, error=f'reply handling failed: {exc!r}',
                                   frame_id=frame_id, round_trip_ms=round_trip_ms)
            try:
                on_done(reply)
            except Exception:  # noqa: B902 (a gRPC thread must not die of a caller's bug)
                _LOG.exception('%s: on_done raised for frame %s', self._name, frame_id)

        future.add_done_callback(finish)
        return future

    def stop(self) -> None:
        """Stop tracking health and close the channel (pending calls end CANCELLED)."""
        self._stop.set()
        self._connected.set()
        self._end_session()
        if self._thread.is_alive():
            self._thread.join()
        self._channel.unsubscribe(self._on_connectivity)
        self._channel.close()

    def __enter__(self) -> Endpoint[ModelT]:
        """Return the endpoint; :meth:`stop` runs when the block ends."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the endpoint."""
        self.stop()

    # What each protocol provides -----------------------------------------------------------

    @abc.abstractmethod
    def _start_call(self, frame: EncodedFrame, frame_id: str, stamp_ns: int, timeout_s: float,
                    deadline_unix_ns: int) -> grpc.Future:
        """Start the inference call for ``frame``."""

    @abc.abstractmethod
    def _parse(self, response: Any, model: ModelT, frame: EncodedFrame, frame_id: str,
               round_trip_ms: float) -> CloudReply:
        """Turn a successful response into a reply; raise :class:`ReplyError` if unusable."""

    @abc.abstractmethod
    def _verify(self) -> ModelT:
        """Check the served model; raise :class:`VerificationError` if it cannot be used."""

    @abc.abstractmethod
    def _session(self) -> tuple[bool, str, str]:
        """
        Run one health session until it ends; return how it ended.

        A session reports what it sees through :meth:`_serving` and :meth:`_record`; it ends
        when the server cannot be reached, when :meth:`_serving` says so, or when
        :meth:`_end_session` is called. Returns (whether it was ever healthy, the state after
        it, the error).
        """

    @abc.abstractmethod
    def _end_session(self) -> None:
        """Make the open session (if any) return soon; called from any thread."""

    def _on_channel_change(self, state: grpc.ChannelConnectivity) -> None:
        """React to a connectivity change beyond READY (default: nothing)."""

    # Shared machinery ----------------------------------------------------------------------

    def _reply(self, future: Any, frame: EncodedFrame, frame_id: str,
               round_trip_ms: float) -> CloudReply:
        """Turn a finished call into a reply."""
        def failed(error: str) -> CloudReply:
            return CloudReply(self._name, False, error=error, frame_id=frame_id,
                              round_trip_ms=round_trip_ms)

        if future.cancelled():
            return failed('CANCELLED')
        exc = future.exception()
        if exc is not None:
            error = error_text(exc)
            shed = self._shed_load(exc) if isinstance(exc, grpc.Call) else ''
            if shed:
                return failed(f'{shed} ({error})')
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._interrupt(UNREACHABLE, error)  # a new session tells if it is still there
            return failed(error)
        with self._lock:
            model = self._verified
        if model is None:
            return failed('labels not verified')
        try:
            return self._parse(future.result(), model, frame, frame_id, round_trip_ms)
        except ModelChanged as changed:
            error = f'model changed: {changed}'
            self._interrupt(UNVERIFIED, error)
            return failed(error)
        except ReplyError as bad:
            _LOG.warning('%s: unusable reply to frame %s: %s', self._name, frame_id, bad)
            return failed(f'bad reply: {bad}')

    def _shed_load(self, call: grpc.Call) -> str:
        """
        Return how to report a failed call that is the server shedding load, else ''.

        Such a call is "not in time", not a sign of a dead server; the reported error starts
        with the gRPC code a server with this project's semantics would have used.
        """
        return ''

    def _serving(self, next_check_in_s: float) -> bool:
        """
        Note that the server serves, verifying its model first unless it is verified already.

        Return whether the endpoint is healthy now; False (verification failed, the state is
        UNVERIFIED) means the session must end.
        """
        with self._lock:
            model = self._verified if self._health.state == SERVING else None
        if model is None:
            try:
                model = self._verify()
            except VerificationError as exc:
                self._record(UNVERIFIED, str(exc), None)
                return False
        self._record(SERVING, '', next_check_in_s, model)
        return True

    def _interrupt(self, state: str, error: str) -> None:
        """Record ``state`` now and end the open session, which ends in that state."""
        self._record(state, error, None)
        with self._lock:
            self._interrupted = (state, error)
        self._end_session()

    def _session_interrupted(self) -> bool:
        """Return whether :meth:`_interrupt` or :meth:`stop` asked the session to end."""
        with self._lock:
            return self._interrupted is not None or self._stop.is_set()

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        """On a gRPC thread: a connection that is (back) up deserves a health check now."""
        if state is grpc.ChannelConnectivity.READY:
            self._connected.set()
        self._on_channel_change(state)

    def _track_health(self) -> None:
        """Run sessions until stopped; between them, wait for a connection or the backoff."""
        backoff_s = self._backoff_initial_s
        while not self._stop.is_set():
            self._connected.clear()
            try:
                served, state, error = self._session()
            except Exception as exc:  # noqa: B902 (health tracking must outlive a bug)
                _LOG.exception('%s: health session failed', self._name)
                served, state, error = False, UNREACHABLE, f'health session failed: {exc!r}'
            if self._stop.is_set():
                break
            with self._lock:
                if self._interrupted is not None:
                    state, error = self._interrupted
                    self._interrupted = None
            backoff_s = self._backoff_initial_s if served else backoff_s
            self._record(state, error, backoff_s, failed_session=True)
            self._connected.wait(backoff_s)
            backoff_s = min(2 * backoff_s, self._backoff_max_s)

    def _record(self, state: str, error: str, next_check_in_s: float | None,
                verified: ModelT | None = None, failed_session: bool = False) -> None:
        """
        Store a health observation (``next_check_in_s`` None keeps the current schedule).

        Leaving SERVING forgets the verified model: the next SERVING verifies again.
        """
        now = self._clock()
        with self._lock:
            old = self._health
            failures = 0 if state == SERVING else old.consecutive_failures + failed_session
            self._health = EndpointHealth(
                state, failures,
                old.next_check_in_s if next_check_in_s is None else next_check_in_s, now,
                now if state != old.state else old.last_change_s, error)
            if state != SERVING:
                self._verified = None
            elif verified is not None:
                self._verified = verified
        if state == old.state:
            return
        _LOG.info('%s (%s): %s -> %s %s', self._name, self._target, old.state, state, error)
        if self._on_health_change is not None:
            try:
                self._on_health_change(self._name, old.state, state, error)
            except Exception:  # noqa: B902 (health tracking must outlive a listener's bug)
                _LOG.exception('%s: on_health_change raised', self._name)


def failure_state(exc: grpc.RpcError) -> str:
    """Return the health state a failed health call means: NOT_FOUND is NOT_SERVING."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    return NOT_SERVING if code == grpc.StatusCode.NOT_FOUND else UNREACHABLE


def error_text(exc: BaseException) -> str:
    """Return 'CODE: details' for a failed gRPC call ('CODE' alone without details)."""
    if isinstance(exc, grpc.Call):
        details = exc.details()
        return f'{exc.code().name}: {details}' if details else exc.code().name
    return f'{type(exc).__name__}: {exc}'
