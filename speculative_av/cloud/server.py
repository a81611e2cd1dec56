"""
Serve a torchvision detector over gRPC, as the data center side of speculative execution.

Run ``python -m speculative_av.cloud.server --help``. Once listening it prints one line,
``cloud_server listening on HOST:PORT``, to stdout; the health service reports SERVING once the
model is loaded. SIGTERM or SIGINT stops it cleanly with exit code 0.

Over-the-air model updates: started with ``--model-manifest`` (a signed release,
:mod:`speculative_av.fleet.model_manifest`) and ``--trusted-keys``, the server re-reads the
manifest on SIGHUP, verifies it, loads and warms the model up beside the one serving, then swaps
it in between batches: no restart, no refused request. Each reply names the model that produced
it (a batch runs wholly on one model). A failed update is logged and counted; the current model
goes on serving.
"""
from __future__ import annotations

import argparse
from concurrent import futures
from dataclasses import dataclass
import logging
import signal
import sys
import threading
import time
from typing import Callable, NoReturn, Protocol, TextIO, TypeVar

from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]
import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
import numpy as np
import numpy.typing as npt
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.cloud import detection_pb2_grpc
from speculative_av.cloud.scheduler import (
    BatchScheduler, DeadlineQueue, InferenceEstimate, NO_DEADLINE, POLICIES, Status)
from speculative_av.cloud.security import add_server_arguments, SecurityError, ServerSecurity
from speculative_av.cloud.server_metrics import ServerMetrics
from speculative_av.cloud.server_process import positive_int, start_process
from speculative_av.core.detections import Detections
from speculative_av.detectors.torchvision_detector import (BACKENDS, detection_models,
                                                           TorchvisionDetector)
from speculative_av.fleet.model_manifest import load_public_keys, verify_manifest
from speculative_av.fleet.released_model import load_released

_LOG = logging.getLogger('cloud_server')
_Request = TypeVar('_Request', bound=Message)

SERVICE_NAME = detection_pb2.DESCRIPTOR.services_by_name['CloudDetector'].full_name
DEFAULT_MODEL = 'fasterrcnn_mobilenet_v3_large_fpn'
SHUTDOWN_GRACE_S = 2.0
SPARE_WORKERS = 4
WARM_UP_SIZE = (480, 640)  # height, width of the blank frames timed before serving
WARM_UP_PASSES = 3


class _Context(Protocol):
    """The parts of ``grpc.ServicerContext`` used here, typed (``abort`` always raises)."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the RPC with ``code``."""

    def time_remaining(self) -> float | None:
        """Return the seconds left before the client's deadline (None: no deadline)."""

    def add_callback(self, callback: Callable[[], object]) -> bool:
        """Call ``callback`` when the RPC ends; False if it has ended already."""


class MalformedRequest:
    """What the request deserializer returns for bytes that are not a valid request message."""

    def __init__(self, reason: str) -> None:
        """Keep protobuf's ``reason`` for the reply's details."""
        self.reason = reason


def _lenient_parser(
        message: type[_Request]) -> Callable[[bytes], _Request | MalformedRequest]:
    """
    Return a request deserializer that never raises.

    gRPC answers a raising deserializer with INTERNAL and logs a traceback per request; a
    malformed request is the client's error, so the handler answers INVALID_ARGUMENT instead.
    """
    def parse(data: bytes) -> _Request | MalformedRequest:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc))
    return parse


class _Throttle:
    """Allow one event per ``interval_s``; count the ones suppressed in between."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._next_s = 0.0
        self._suppressed = 0

    def admit(self) -> int | None:
        """Return how many were suppressed since the last admitted event, or None to suppress."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_s:
                self._suppressed += 1
                return None
            self._next_s = now + self._interval_s
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


@dataclass(frozen=True)
class SchedulingOptions:
    """How Detect requests are queued and batched (see README, 'Serving a fleet')."""

    policy: str = 'deadline'
    concurrency: int = 1
    max_batch_size: int = 1
    max_queue_delay_ms: float = 0.0
    max_queue: int = 16

    @property
    def max_detect_calls(self) -> int:
        """Return how many Detect calls may be in the server: queued plus being inferred."""
        return self.max_queue + self.concurrency * self.max_batch_size


# The status code that answers each scheduler outcome other than OK (its detail is the details).
_REPLIES = {
    Status.LATE_REJECTED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Status.DROPPED_UNREACHABLE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Status.EXPIRED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Status.CANCELLED: grpc.StatusCode.CANCELLED,
    Status.REFUSED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.FAILED: grpc.StatusCode.INTERNAL,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


@dataclass(frozen=True)
class ServedModel:
    """The detector serving now and the name and version its replies carry."""

    detector: TorchvisionDetector
    name: str
    version: str


Answer = tuple[Detections, ServedModel]  # a request's detections and the model that made them


class DetectionService(detection_pb2_grpc.CloudDetectorServicer):
    """
    Answer Detect through a deadline-aware batch scheduler around one detector.

    At most ``options.max_detect_calls`` Detect calls are in the server at once (decoding,
    queued or being inferred); beyond that Detect answers RESOURCE_EXHAUSTED at once, so a
    burst never takes the worker threads that health checks need.
    """

    def __init__(self, options: SchedulingOptions = SchedulingOptions(),
                 extra_latency_ms: float = 0.0) -> None:
        """Create the service; Detect answers UNAVAILABLE until :meth:`set_detector`."""
        self.options = options
        self._model: ServedModel | None = None
        self._scheduler: BatchScheduler[npt.NDArray[np.uint8], Answer] | None = None
        self.model_swaps = 0
        self._extra_latency_s = extra_latency_ms / 1e3
        self.max_detect_calls = options.max_detect_calls
        self._lock = threading.Lock()
        self._detect_calls = 0
        self.metrics = ServerMetrics(options.max_batch_size, self._queue_depth)
        self._invalid_log = _Throttle()

    def _queue_depth(self) -> int:
        scheduler = self._scheduler
        return 0 if scheduler is None else scheduler.queue_depth

    def set_detector(self, detector: TorchvisionDetector, estimate: InferenceEstimate,
                     name: str = '', version: str = '') -> None:
        """
        Answer with ``detector`` from the next batch on; ``estimate`` is its inference time.

        Replies name it ``name`` ``version`` (by default the detector's own). The first call
        starts the scheduler, seeded with ``estimate``; a later one is a swap: batches in progress
        finish on the model they started with, and the scheduler's estimate learns the new
        model's times from its batches.
        """
        self._model = ServedModel(detector, name or detector.model_name,
                                  version or detector.model_version)
        if self._scheduler is not None:
            self.model_swaps += 1
            return
        options = self.options
        queue: DeadlineQueue[npt.NDArray[np.uint8], Answer] = DeadlineQueue(
            options.policy, max_queue=options.max_queue, max_batch_size=options.max_batch_size,
            max_queue_delay_s=options.max_queue_delay_ms / 1e3, workers=options.concurrency,
            estimate=estimate)
        self._scheduler = BatchScheduler(self._infer, queue, on_batch=self.metrics.batch,
                                         name='inference')

    @property
    def model(self) -> ServedModel | None:
        """Return the model serving now (None while loading)."""
        return self._model

    def _infer(self, images: list[npt.NDArray[np.uint8]]) -> list[Answer]:
        """Run one batch on the model serving now (read once: the whole batch is its)."""
        model = self._model
        assert model is not None  # the scheduler starts with the first model
        return [(detections, model) for detections in model.detector.detect_batch(images)]

    def close(self) -> None:
        """Answer queued requests UNAVAILABLE and stop the inference threads."""
        if self._scheduler is not None:
            self._scheduler.close(SHUTDOWN_GRACE_S)
        self.metrics.close()

    def summary(self) -> str:
        """Return a one-line account of the requests served so far."""
        return self.metrics.summary()

    def Detect(  # noqa: N802 (gRPC's name)
            self, request: detection_pb2.DetectRequest | MalformedRequest,
            context: _Context) -> detection_pb2.DetectResponse:
        """Check and decode the request, schedule it, answer with its outcome."""
        receive_unix_ns = time.time_ns()
        if isinstance(request, MalformedRequest):
            self._fail(context, 'invalid', grpc.StatusCode.INVALID_ARGUMENT,
                       f'malformed DetectRequest: {request.reason}')
        scheduler = self._scheduler
        if scheduler is None:
            self._fail(context, 'unavailable', grpc.StatusCode.UNAVAILABLE, 'model is loading')
        with self._lock:
            admitted = self._detect_calls < self.max_detect_calls
            if admitted:
                self._detect_calls += 1
        if not admitted:
            self._fail(context, 'refused', grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f'{self.max_detect_calls} Detect calls in progress')
        try:
            return self._detect(scheduler, request, context, receive_unix_ns)
        finally:
            with self._lock:
                self._detect_calls -= 1

    def _detect(self, scheduler: BatchScheduler[npt.NDArray[np.uint8], Answer],
                request: detection_pb2.DetectRequest, context: _Context,
                receive_unix_ns: int) -> detection_pb2.DetectResponse:
        """Serve one admitted Detect call; a request that would be refused is not decoded."""
        deadline_s = _monotonic_deadline(request, context)
        # A negative deadline is invalid: the decoder's checks answer it.
        refusal = scheduler.refusal(deadline_s) if request.deadline_unix_ns >= 0 else None
        if refusal is not None:
            self._fail(context, refusal.status.value, _REPLIES[refusal.status], refusal.detail)
        start = time.perf_counter()
        try:
            rgb = codec.decode_request_image(request)
        except ValueError as exc:
            frame_id = request.frame_id[:codec.MAX_FRAME_ID_CHARS]
            self._fail(context, 'invalid', grpc.StatusCode.INVALID_ARGUMENT,
                       f'frame {frame_id!r}: {exc}')
        decoded = time.perf_counter()
        ticket = scheduler.submit(rgb, deadline_s)
        if not context.add_callback(ticket.cancel):  # the RPC ended already
            ticket.cancel()
        outcome = ticket.wait()
        assert outcome is not None  # wait() without a timeout returns the outcome
        if outcome.status != Status.OK or outcome.result is None:
            self._fail(context, outcome.status.value, _REPLIES[outcome.status], outcome.detail)
        self.metrics.queued(outcome.queue_s)
        detections, model = outcome.result
        response = codec.detections_to_response(
            codec.to_original_coordinates(detections, request, rgb.shape[1], rgb.shape[0]),
            model_name=model.name, model_version=model.version,
            server_receive_unix_ns=receive_unix_ns, queue_ms=outcome.queue_s * 1e3,
            decode_ms=(decoded - start) * 1e3, inference_ms=outcome.inference_s * 1e3)
        response.batch_size = outcome.batch_size
        if self._extra_latency_s > 0:
            time.sleep(self._extra_latency_s)
        self.metrics.count('ok')
        self.metrics.replied('no_deadline' if deadline_s == NO_DEADLINE else
                             'in_time' if time.monotonic() <= deadline_s else 'late')
        return response

    def GetModelInfo(  # noqa: N802 (gRPC's name)
            self, request: detection_pb2.ModelInfoRequest | MalformedRequest,
            context: _Context) -> detection_pb2.ModelInfo:
        """Describe the loaded model."""
        if isinstance(request, MalformedRequest):
            self._fail(context, 'invalid', grpc.StatusCode.INVALID_ARGUMENT,
                       f'malformed ModelInfoRequest: {request.reason}')
        model = self._model
        if model is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, 'model is loading')
        detector = model.detector
        return detection_pb2.ModelInfo(
            model_name=model.name, model_version=model.version,
            categories=detector.categories, device=detector.device,
            score_threshold=detector.score_threshold)

    def _fail(self, context: _Context, key: str, code: grpc.StatusCode,
              details: str) -> NoReturn:
        """Count and log a failed request, then end it with ``code`` (raises)."""
        self.metrics.count(key)
        if key != 'invalid':
            _LOG.debug('%s: %s', code.name, details)
        else:
            suppressed = self._invalid_log.admit()
            if suppressed is not None:
                _LOG.warning('%s: %s%s', code.name, details,
                             f' ({suppressed} more invalid requests not logged)'
                             if suppressed else '')
        context.abort(code, details)


def _monotonic_deadline(request: detection_pb2.DetectRequest, context: _Context) -> float:
    """Return the earlier of the request's and the call's deadline on the monotonic clock."""
    now_s = time.monotonic()
    deadline_s = NO_DEADLINE
    if request.deadline_unix_ns:
        deadline_s = now_s + (request.deadline_unix_ns - time.time_ns()) / 1e9
    remaining_s = context.time_remaining()
    if remaining_s is not None:
        deadline_s = min(deadline_s, now_s + remaining_s)
    return deadline_s


def add_to_server(service: DetectionService, server: grpc.Server) -> None:
    """
    Register ``service`` like the generated code does, with deserializers that never raise.

    Malformed request bytes then reach the handler, which answers INVALID_ARGUMENT.
    """
    handlers = {
        'Detect': grpc.unary_unary_rpc_method_handler(
            service.Detect,
            request_deserializer=_lenient_parser(detection_pb2.DetectRequest),
            response_serializer=detection_pb2.DetectResponse.SerializeToString),
        'GetModelInfo': grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo,
            request_deserializer=_lenient_parser(detection_pb2.ModelInfoRequest),
            response_serializer=detection_pb2.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def load_model(args: argparse.Namespace) -> ServedModel:
    """
    Load what the command line names: the verified release of --model-manifest, else --model.

    Raises ValueError (ManifestError for a release that does not verify), RuntimeError, OSError.
    """
    if not args.model_manifest:
        detector = TorchvisionDetector(args.model, args.weights, args.device,
                                       args.score_threshold, args.threads, backend=args.backend)
        return ServedModel(detector, detector.model_name, detector.model_version)
    manifest = verify_manifest(args.model_manifest, load_public_keys(args.trusted_keys))
    detector = load_released(manifest, device=args.device, score_threshold=args.score_threshold,
                             threads=args.threads, backend=args.backend)
    return ServedModel(detector, manifest.name, manifest.version)


def _reload_on_request(args: argparse.Namespace, service: DetectionService,
                       reload: threading.Event, stop: threading.Event) -> None:
    """
    On its own thread: each time ``reload`` is set, verify, load and warm up, then swap.

    Every failure is logged and counted; the model serving goes on. Ends when ``stop`` is set.
    """
    failures = 0
    while not stop.is_set():
        reload.wait()
        reload.clear()
        if stop.is_set():
            return
        try:
            began = time.perf_counter()
            model = load_model(args)
            loaded = time.perf_counter()
            estimate = warm_up(model.detector, args.max_batch_size)
            service.set_detector(model.detector, estimate, model.name, model.version)
            _LOG.info('now serving %s %s (verified and loaded in %.0f ms, warmed up in %.0f ms; '
                      '%d swaps so far)', model.name, model.version, (loaded - began) * 1e3,
                      (time.perf_counter() - loaded) * 1e3, service.model_swaps)
        except Exception as exc:  # noqa: B902 (a bad release must not end the reloads)
            failures += 1
            _LOG.error('model update from %s refused (%d so far); still serving the current '
                       'model: %s', args.model_manifest, failures, exc)


def serve(args: argparse.Namespace, stop: threading.Event, announce: TextIO,
          reload: threading.Event | None = None) -> int:
    """
    Listen, load the model, serve until ``stop`` is set; return the exit code.

    With a ``--model-manifest``, setting ``reload`` (SIGHUP does) swaps in the release the
    manifest names now.

    The listening line goes to ``announce``, the only thing ever written there. Without TLS
    and without ``--insecure`` it refuses to start (exit code 2).
    """
    try:
        security = ServerSecurity.from_args(args)
    except SecurityError as exc:
        _LOG.error('%s', exc)
        return 2
    service = DetectionService(SchedulingOptions(
        args.scheduling, args.concurrency, args.max_batch_size, args.max_queue_delay_ms,
        args.max_queue), args.extra_latency_ms)
    # Detect calls hold at most max_detect_calls workers; the spare ones serve health checks
    # and GetModelInfo. No maximum_concurrent_rpcs: it would refuse health checks under load.
    workers = service.max_detect_calls + SPARE_WORKERS
    max_bytes = args.max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix='rpc'),
        options=[('grpc.max_receive_message_length', max_bytes),
                 ('grpc.max_send_message_length', max_bytes),
                 ('grpc.keepalive_permit_without_calls', 1),
                 ('grpc.http2.min_ping_interval_without_data_ms', 5000)],
        interceptors=security.interceptors)
    add_to_server(service, server)
    health_service = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    for name in ('', SERVICE_NAME):
        health_service.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f'[{args.host}]' if ':' in args.host and not args.host.startswith('[') else (
        args.host)
    try:
        port = (server.add_insecure_port(f'{address}:{args.port}')
                if security.credentials is None
                else server.add_secure_port(f'{address}:{args.port}', security.credentials))
    except RuntimeError as exc:
        _LOG.error('could not listen on %s:%d: %s', address, args.port, exc)
        return 1
    server.start()
    print(f'cloud_server listening on {address}:{port}', file=announce, flush=True)
    if args.metrics_port >= 0:
        try:
            metrics_port = service.metrics.serve(args.metrics_port, args.host)
        except OSError as exc:
            _LOG.error('could not serve metrics on port %d: %s', args.metrics_port, exc)
            server.stop(None)
            return 1
        _LOG.info('metrics on http://%s:%d/metrics', address, metrics_port)
    try:
        model = load_model(args)
    except (ValueError, RuntimeError, OSError) as exc:
        _LOG.error('could not load %s: %s', args.model_manifest or args.model, exc)
        server.stop(None)
        service.close()
        return 1
    detector = model.detector
    service.set_detector(detector, warm_up(detector, args.max_batch_size), model.name,
                         model.version)
    for name in ('', SERVICE_NAME):
        health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    _LOG.info('serving %s (%s) on %s with %d inference slot(s), %s scheduling, batches of up '
              'to %d (waiting up to %.0f ms), queue of %d, extra latency %.0f ms; %s',
              model.name, model.version, detector.device, args.concurrency,
              args.scheduling, args.max_batch_size, args.max_queue_delay_ms, args.max_queue,
              args.extra_latency_ms, security.description)
    if reload is not None:
        reloader = threading.Thread(target=_reload_on_request, name='model-reloader',
                                    args=(args, service, reload, stop), daemon=True)
        reloader.start()
    stop.wait()
    if reload is not None:
        reload.set()  # wakes the reloader, which sees stop and ends
        reloader.join()
    health_service.enter_graceful_shutdown()
    server.stop(SHUTDOWN_GRACE_S).wait()
    service.close()
    _LOG.info('summary: %s', service.summary())
    return 0


def warm_up(detector: TorchvisionDetector, max_batch_size: int) -> InferenceEstimate:
    """
    Run the model once untimed (first passes are slow), then time batches of 1 and of the max.

    The times seed the scheduler's estimate, so the first requests are admitted on a
    measurement of this model on this machine rather than on a guess.
    """
    estimate = InferenceEstimate()
    blank = np.zeros((*WARM_UP_SIZE, 3), np.uint8)
    detector.detect(blank)
    sizes = sorted({1, max_batch_size})
    for size in sizes:
        for _ in range(WARM_UP_PASSES):
            start = time.perf_counter()
            detector.detect_batch([blank] * size)
            estimate.observe(size, time.perf_counter() - start)
    _LOG.info('warm-up: estimated inference %s (with margin)', ', '.join(
        f'{estimate.seconds(size) * 1e3:.0f} ms for a batch of {size}' for size in sizes))
    return estimate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description='gRPC cloud object detector')
    parser.add_argument('--model', default=DEFAULT_MODEL, help='torchvision detection builder')
    parser.add_argument('--weights', default='DEFAULT',
                        help="'DEFAULT' (pretrained, downloaded), a checkpoint path, or 'random'")
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--score-threshold', type=float, default=0.3)
    parser.add_argument('--host', default='0.0.0.0')
    parser.add_argument('--port', type=int, default=50051, help='0 picks a free port')
    parser.add_argument('--max-message-mb', type=int, default=16)
    parser.add_argument('--concurrency', type=positive_int, default=1,
                        help='inferences (batches) run at the same time')
    parser.add_argument('--scheduling', choices=POLICIES, default='deadline',
                        help='deadline: earliest deadline first, hopeless requests refused at '
                             'once; fifo: first in, first out (the behaviour before issue 8)')
    parser.add_argument('--max-batch-size', type=positive_int, default=1,
                        help='requests inferred in one forward pass')
    parser.add_argument('--max-queue-delay-ms', type=_non_negative_float, default=0.0,
                        help='longest wait for a batch to fill (never past a deadline)')
    parser.add_argument('--max-queue', type=positive_int, default=16,
                        help='requests waiting for inference; beyond: RESOURCE_EXHAUSTED')
    parser.add_argument('--metrics-port', type=int, default=-1,
                        help='Prometheus /metrics port: -1 none, 0 a free one (logged)')
    parser.add_argument('--extra-latency-ms', type=float, default=0.0,
                        help='delay every reply, emulating a distant data center')
    parser.add_argument('--threads', type=positive_int, default=None, help='torch CPU threads')
    parser.add_argument('--backend', choices=BACKENDS, default=BACKENDS[0],
                        help="what runs the model: eager 'torch' or 'onnxruntime' (exported once, "
                        'cached)')
    parser.add_argument('--log-level', default='INFO',
                        choices=('DEBUG', 'INFO', 'WARNING', 'ERROR'))
    parser.add_argument('--model-manifest', default='',
                        help='a signed model release (model_release sign) to serve instead of '
                        '--model/--weights; SIGHUP re-reads it and swaps the model in')
    parser.add_argument('--trusted-keys', nargs='+', default=[],
                        help='Ed25519 public keys (PEM) a --model-manifest must be signed with')
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    if args.model_manifest and not args.trusted_keys:
        parser.error('--model-manifest needs --trusted-keys')
    if args.model not in detection_models():
        parser.error(f'--model {args.model!r} is not one of {", ".join(detection_models())}')
    return args


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'must be at least 0, got {value}')
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT."""
    args = parse_args(argv)
    stop = start_process(args.log_level, _LOG)
    reload = None
    if args.model_manifest:
        reload = threading.Event()
        signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
    # Keep stdout to the listening line: torch hub, for one, prints download progress there.
    announce, sys.stdout = sys.stdout, sys.stderr
    try:
        return serve(args, stop, announce, reload)
    finally:
        sys.stdout = announce


if __name__ == '__main__':
    sys.exit(main())
