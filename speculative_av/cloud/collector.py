"""
The snippet collector: the cloud side of fleet data upload (``snippet_collector``).

Vehicles upload triggered snippets over gRPC (``protos/collector.proto``): ``Offset`` says where
an upload resumes, or that the content is already stored; ``Upload`` streams chunks. Content
lands in a :class:`~speculative_av.cloud.collector_store.CollectorStore` on a file system.

Bounds: a chunk larger than ``--max-chunk-kb`` is refused by gRPC before it is decoded; at most
``--max-uploads`` streams run at once (more: RESOURCE_EXHAUSTED), and a stream that sends
nothing for ``--idle-timeout-s`` is cancelled, so stalled clients cannot hold the slots. Health
checking, TLS, mutual TLS and bearer tokens work as on the cloud server
(:mod:`speculative_av.cloud.security`). Once listening it prints ``snippet_collector listening on
HOST:PORT``; SIGTERM or SIGINT stops it with exit code 0.
"""
from __future__ import annotations

import argparse
from concurrent import futures
import contextlib
import itertools
import logging
from pathlib import Path
import sys
import threading
import time
from typing import Callable, Iterator, NoReturn, Protocol, TextIO

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from speculative_av.cloud import collector_pb2
from speculative_av.cloud import collector_pb2_grpc
from speculative_av.cloud.collector_store import (CollectorStore, Refusal, StoreLimits,
                                                  UploadRefused)
from speculative_av.cloud.security import add_server_arguments, SecurityError, ServerSecurity
from speculative_av.cloud.server_process import positive_int, start_process

_LOG = logging.getLogger('snippet_collector')

SERVICE_NAME = collector_pb2.DESCRIPTOR.services_by_name['SnippetCollector'].full_name
SPARE_WORKERS = 4  # threads beyond the upload slots: Offset and health checks
SHUTDOWN_GRACE_S = 2.0
_MESSAGE_OVERHEAD = 1024  # hash, size, offset and name around a chunk's data
_CODES = {Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
          Refusal.OFFSET: grpc.StatusCode.FAILED_PRECONDITION,
          Refusal.BUSY: grpc.StatusCode.ABORTED,
          Refusal.FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
          Refusal.MISMATCH: grpc.StatusCode.DATA_LOSS}


class _Context(Protocol):
    """The parts of ``grpc.ServicerContext`` used here (``abort`` always raises)."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the RPC with ``code``."""

    def cancel(self) -> None:
        """Cancel the RPC."""

    def peer(self) -> str:
        """Return the client's address."""


class StallWatch:
    """Cancel streams that sent nothing for ``idle_timeout_s``; one supervised thread."""

    def __init__(self, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Watch with ``idle_timeout_s`` (> 0); :meth:`stop` ends the thread."""
        if not idle_timeout_s > 0:
            raise ValueError(f'idle_timeout_s must be positive, got {idle_timeout_s}')
        self.idle_timeout_s = idle_timeout_s
        self.cancelled = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[int, tuple[_Context, float]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='collector-stalls', daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, context: _Context) -> Iterator[Callable[[], None]]:
        """Watch one stream while the block runs; call the yielded function on each chunk."""
        key = next(self._ids)

        def touch() -> None:
            with self._lock:
                self._streams[key] = (context, self._clock())

        touch()
        try:
            yield touch
        finally:
            with self._lock:
                self._streams.pop(key, None)  # the watch removes streams it cancels

    def stop(self) -> None:
        """End the thread."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.idle_timeout_s / 4):
            try:
                now = self._clock()
                with self._lock:
                    stalled = [(key, context) for key, (context, last) in self._streams.items()
                               if now - last > self.idle_timeout_s]
                    for key, _ in stalled:
                        del self._streams[key]
                for _, context in stalled:
                    _LOG.warning('cancelling a stalled upload from %s (nothing for %.0f s)',
                                 context.peer(), self.idle_timeout_s)
                    context.cancel()
                    self.cancelled += 1
            except Exception:  # noqa: B902 (one bad stream must not end the watch)
                _LOG.exception('stall watch failed; continuing')


class CollectorService(collector_pb2_grpc.SnippetCollectorServicer):
    """Offset and Upload over a :class:`CollectorStore`."""

    def __init__(self, store: CollectorStore, max_uploads: int, watch: StallWatch) -> None:
        """Serve ``store`` with at most ``max_uploads`` concurrent streams."""
        self.store = store
        self.max_uploads = max_uploads
        self._slots = threading.BoundedSemaphore(max_uploads)
        self._watch = watch

    def Offset(self, request: collector_pb2.OffsetRequest,  # noqa: N802 (gRPC's name)
               context: _Context) -> collector_pb2.OffsetReply:
        """Return where an upload of the content resumes, or that it is stored."""
        try:
            received, stored = self.store.offset(request.sha256, request.size)
        except UploadRefused as refusal:
            context.abort(_CODES[refusal.kind], str(refusal))
        return collector_pb2.OffsetReply(received=received, stored=stored)

    def Upload(self, request_iterator: Iterator[collector_pb2.UploadChunk],  # noqa: N802
               context: _Context) -> collector_pb2.UploadReply:
        """Append a stream's chunks; verify and store the content once complete."""
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f'all {self.max_uploads} upload slots are busy; retry later')
        try:
            with self._watch.watching(context) as touch:
                return self._receive(request_iterator, context, touch)
        finally:
            self._slots.release()

    def _receive(self, chunks: Iterator[collector_pb2.UploadChunk], context: _Context,
                 touch: Callable[[], None]) -> collector_pb2.UploadReply:
        upload = None
        try:
            for chunk in chunks:
                touch()
                if upload is None:
                    upload = self.store.begin(chunk.sha256, chunk.size, chunk.name,
                                              context.peer())
                    if upload is None:
                        return collector_pb2.UploadReply(stored=True, duplicate=True,
                                                         received=chunk.size)
                upload.append(chunk.sha256, chunk.size, chunk.offset, chunk.data)
                if upload.complete:
                    upload.finish()
                    return collector_pb2.UploadReply(stored=True, received=upload.size)
            if upload is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'empty upload stream')
            return collector_pb2.UploadReply(stored=False, received=upload.received)
        except UploadRefused as refusal:
            context.abort(_CODES[refusal.kind], str(refusal))
        except grpc.RpcError:  # the client went away or the stall watch cancelled it
            _LOG.info('upload of %s from %s ended early at %s bytes (kept for a resume)',
                      upload.sha256 if upload else '?', context.peer(),
                      upload.received if upload else 0)
            return collector_pb2.UploadReply(stored=False,
                                             received=upload.received if upload else 0)
        finally:
            if upload is not None:
                upload.close()


def serve(args: argparse.Namespace, stop: threading.Event, announce: TextIO) -> int:
    """Listen and serve until ``stop`` is set; return the exit code (2: refused settings)."""
    try:
        security = ServerSecurity.from_args(args)
        limits = StoreLimits(args.max_snippet_mb << 20, args.max_chunk_kb << 10,
                             args.min_free_mb << 20)
        store = CollectorStore(Path(args.root), limits)
        watch = StallWatch(args.idle_timeout_s)
    except (SecurityError, ValueError) as exc:
        _LOG.error('%s', exc)
        return 2
    except OSError as exc:
        _LOG.error('cannot use --root %s: %s', args.root, exc)
        return 2
    service = CollectorService(store, args.max_uploads, watch)
    max_bytes = limits.max_chunk_bytes + _MESSAGE_OVERHEAD
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.max_uploads + SPARE_WORKERS,
                                   thread_name_prefix='rpc'),
        options=[('grpc.max_receive_message_length', max_bytes),
                 ('grpc.keepalive_permit_without_calls', 1),
                 ('grpc.http2.min_ping_interval_without_data_ms', 5000)],
        interceptors=security.interceptors)
    collector_pb2_grpc.add_SnippetCollectorServicer_to_server(service, server)
    health_service = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
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
        watch.stop()
        return 1
    server.start()
    for name in ('', SERVICE_NAME):
        health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f'snippet_collector listening on {address}:{port}', file=announce, flush=True)
    _LOG.info('collecting into %s: snippets up to %d MiB, chunks up to %d KiB, %d upload(s) at '
              'once, %d MiB kept free; %s', store.root, args.max_snippet_mb, args.max_chunk_kb,
              args.max_uploads, args.min_free_mb, security.description)
    stop.wait()
    health_service.enter_graceful_shutdown()
    server.stop(SHUTDOWN_GRACE_S).wait()
    watch.stop()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description='gRPC collector of fleet snippets')
    parser.add_argument('--root', required=True, help='directory of the store (created)')
    parser.add_argument('--host', default='0.0.0.0')
    parser.add_argument('--port', type=int, default=50061, help='0 picks a free port')
    parser.add_argument('--max-snippet-mb', type=positive_int, default=64,
                        help='largest snippet accepted')
    parser.add_argument('--max-chunk-kb', type=positive_int, default=1024,
                        help='largest chunk; a larger message is refused before decoding')
    parser.add_argument('--max-uploads', type=positive_int, default=16,
                        help='concurrent upload streams; more answer RESOURCE_EXHAUSTED')
    parser.add_argument('--min-free-mb', type=int, default=1024,
                        help='refuse uploads that would leave less free disk than this')
    parser.add_argument('--idle-timeout-s', type=float, default=30.0,
                        help='cancel an upload stream that sends nothing this long')
    parser.add_argument('--log-level', default='INFO',
                        choices=('DEBUG', 'INFO', 'WARNING', 'ERROR'))
    add_server_arguments(parser, call_limit=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the collector until SIGTERM or SIGINT."""
    args = parse_args(argv)
    stop = start_process(args.log_level, _LOG)
    return serve(args, stop, sys.stdout)


if __name__ == '__main__':
    sys.exit(main())
