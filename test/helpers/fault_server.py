"""
Test process: a cloud endpoint that misbehaves in one way, for the node's fault tests.

    fault_server.py KIND --port PORT

KIND is one of

* ``silent-tcp``: accepts TCP connections and never reads or writes a byte (a wedged server, or
  a port forwarded to nothing): gRPC never gets past connecting, health checks time out.
* ``hung-detect``: a gRPC server whose health service says SERVING (as a load balancer in front
  of a stuck backend would) but whose Detect calls never answer; each ends only by the caller's
  deadline or cancellation.
* ``oversized``: health SERVING, and every Detect reply is a valid DetectResponse larger than the
  node's 16 MiB receive limit.

Both gRPC kinds answer GetModelInfo with the COCO categories of the node's detector, so the
node's label check passes and frames reach the fault.

Prints ``fault_server listening on 127.0.0.1:PORT`` once ready, runs until SIGINT or SIGTERM,
then prints a summary line (``requests=N``) to stderr and exits with 0.
"""
import argparse
from concurrent import futures
import signal
import socket
import sys
import threading
import time

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from speculative_av.cloud import detection_pb2
from speculative_av.detectors.torchvision_detector import coco_categories

SERVICE_NAME = detection_pb2.DESCRIPTOR.services_by_name['CloudDetector'].full_name
OVERSIZED_BYTES = 17 * 1024 * 1024


class Counter:
    """Requests seen, from any thread."""

    def __init__(self) -> None:
        """Start at zero."""
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        """Count one request."""
        with self._lock:
            self.value += 1


def silent_tcp(port: int, stop: threading.Event, counter: Counter) -> None:
    """Accept connections and hold them open without a byte either way until stopped."""
    held = []
    with socket.create_server(('127.0.0.1', port)) as listener:
        listener.settimeout(0.1)
        print(f'fault_server listening on 127.0.0.1:{port}', flush=True)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            counter.add()
            held.append(connection)
    for connection in held:
        connection.close()


def grpc_fault(kind: str, port: int, stop: threading.Event, counter: Counter) -> None:
    """Serve health SERVING and a Detect that hangs (hung-detect) or answers too big."""
    oversized = detection_pb2.DetectResponse(
        model_name='x' * OVERSIZED_BYTES).SerializeToString()
    model_info = detection_pb2.ModelInfo(model_name=f'fault-{kind}',
                                         categories=coco_categories()).SerializeToString()

    def detect(request: bytes, context: grpc.ServicerContext) -> bytes:
        counter.add()
        if kind == 'oversized':
            return oversized
        while context.is_active() and not stop.is_set():
            time.sleep(0.02)
        context.abort(grpc.StatusCode.UNAVAILABLE, 'never answered')

    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        'Detect': grpc.unary_unary_rpc_method_handler(
            detect, request_deserializer=bytes, response_serializer=bytes),
        'GetModelInfo': grpc.unary_unary_rpc_method_handler(
            lambda request, context: model_info, request_deserializer=bytes,
            response_serializer=bytes)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32),
                         handlers=[handler], maximum_concurrent_rpcs=64)
    servicer = health.HealthServicer()
    for name in ('', SERVICE_NAME):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f'127.0.0.1:{port}')
    server.start()
    print(f'fault_server listening on 127.0.0.1:{port}', flush=True)
    stop.wait()
    server.stop(0).wait()


def main() -> int:
    """Serve KIND until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument('kind', choices=('silent-tcp', 'hung-detect', 'oversized'))
    parser.add_argument('--port', type=int, required=True)
    options = parser.parse_args()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    counter = Counter()
    if options.kind == 'silent-tcp':
        silent_tcp(options.port, stop, counter)
    else:
        grpc_fault(options.kind, options.port, stop, counter)
    print(f'fault_server summary: kind={options.kind} requests={counter.value}',
          file=sys.stderr, flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
