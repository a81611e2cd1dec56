"""
Upload triggered snippets to the collector, at the lowest priority on the vehicle's link.

:class:`SnippetUploader` runs one supervised thread. For each pending snippet of its source it
asks the collector's ``Offset`` (stored already: a duplicate, nothing sent), then streams the
rest in small chunks. Before every chunk it checks ``link_busy()`` (detection calls in flight)
and, while it is true, waits on a condition that :meth:`SnippetUploader.link_changed` notifies,
so at most one chunk competes with a detection call. A stream paused longer than
``max_pause_s``, or open for half its deadline, ends early; the collector keeps what arrived and
the next stream resumes there. Failures back off exponentially; snippets the collector refuses
as malformed are skipped for the rest of the run; everything is counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import itertools
import logging
import os
from pathlib import Path
import threading
import time
from typing import Callable, Generic, Iterator, Protocol, Sequence, TypeVar

import grpc
from speculative_av.cloud import collector_pb2
from speculative_av.cloud import collector_pb2_grpc

_LOG = logging.getLogger('snippet_uploader')

LINK_RECHECK_S = 1.0  # a paused upload re-reads link_busy() this often even if not notified
MAX_REJECTED = 10_000  # refused hashes remembered (skipped) for the rest of the run
# Refusals that retrying the same file cannot fix.
PERMANENT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS,
                       grpc.StatusCode.OUT_OF_RANGE})


class PendingSnippet(Protocol):
    """A snippet file waiting for upload, as the source lists it."""

    @property
    def path(self) -> str | os.PathLike[str]:
        """Return the file's path."""

    @property
    def sha256(self) -> str:
        """Return the file's SHA-256, lowercase hex."""

    @property
    def size(self) -> int:
        """Return the file's size in bytes."""


Entry = TypeVar('Entry', bound=PendingSnippet)


class SnippetSource(Protocol[Entry]):
    """Where snippets come from (the trigger recorder's ``SnippetStore``)."""

    def pending(self) -> Sequence[Entry]:
        """Return the snippets not yet uploaded, in the order to upload them."""

    def mark_uploaded(self, entry: Entry) -> None:
        """Record that the collector stores ``entry``."""


@dataclass(frozen=True)
class UploaderSettings:
    """How the uploader uses the link."""

    chunk_bytes: int = 32 << 10
    rpc_timeout_s: float = 10.0  # Offset
    stream_timeout_s: float = 60.0  # one Upload stream; chunks stop at half of it
    max_pause_s: float = 5.0  # a stream paused longer ends; the next one resumes
    poll_s: float = 10.0  # with nothing pending, look again this often (or when notified)
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        """Refuse settings that cannot work."""
        if self.chunk_bytes < 1:
            raise ValueError(f'chunk_bytes must be at least 1, got {self.chunk_bytes}')
        for name in ('rpc_timeout_s', 'stream_timeout_s', 'max_pause_s', 'poll_s',
                     'backoff_initial_s', 'backoff_max_s'):
            if not getattr(self, name) > 0:
                raise ValueError(f'{name} must be positive, got {getattr(self, name)}')


@dataclass
class UploadStats:
    """Counters since the uploader started."""

    uploaded: int = 0  # snippets the collector stored from this vehicle's bytes
    duplicates: int = 0  # snippets it already had (nothing sent)
    resumed: int = 0  # streams that continued a partial upload
    streams: int = 0
    chunks: int = 0
    bytes_sent: int = 0
    pauses: int = 0  # times a chunk waited for detection calls to end
    paused_s: float = 0.0
    failures: int = 0  # failed attempts (each followed by a back-off)
    rejected: int = 0  # snippets skipped: refused as malformed, or size unlike the index
    vanished: int = 0  # snippets deleted before upload (evicted by the store)
    errors: int = 0  # unexpected exceptions survived by the thread


class _StreamEnded(Exception):
    """An upload stream could not continue (the reason is in the message)."""


class SnippetUploader(Generic[Entry]):
    """Upload a source's pending snippets over ``channel``; thread-safe."""

    def __init__(self, source: SnippetSource[Entry], channel: grpc.Channel, *,
                 link_busy: Callable[[], bool] = lambda: False,
                 settings: UploaderSettings = UploaderSettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Upload from ``source``; call :meth:`link_changed` when ``link_busy`` may change."""
        self.settings = settings
        self._source = source
        self._stub = collector_pb2_grpc.SnippetCollectorStub(channel)
        self._link_busy = link_busy
        self._clock = clock
        self._stats = UploadStats()
        self._rejected: dict[str, None] = {}  # insertion-ordered, bounded
        self._condition = threading.Condition()
        self._stopping = False
        self._work = False  # notify_pending() since the last look
        self._thread = threading.Thread(target=self._run, name='snippet-uploader', daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """End the thread after the chunk in flight; the collector keeps what arrived."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def link_changed(self) -> None:
        """Wake a paused upload to re-read ``link_busy()`` (cheap; any thread)."""
        with self._condition:
            self._condition.notify_all()

    def notify_pending(self) -> None:
        """Look for pending snippets now rather than at the next poll."""
        with self._condition:
            self._work = True
            self._condition.notify_all()

    def stats(self) -> UploadStats:
        """Return a copy of the counters."""
        with self._condition:
            return UploadStats(**asdict(self._stats))

    # The thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.settings.backoff_initial_s
        while not self._stopping:
            try:
                self._upload_pending()
                backoff = self.settings.backoff_initial_s
                self._wait(self.settings.poll_s, lambda: self._work)
            except (grpc.RpcError, _StreamEnded, OSError) as error:
                self._count(failures=1)
                _LOG.warning('upload failed, retrying in %.1f s: %s', backoff, _describe(error))
                self._wait(backoff, lambda: False)
                backoff = min(backoff * 2, self.settings.backoff_max_s)
            except Exception:  # noqa: B902 (the thread outlives any one bad snippet or bug)
                self._count(errors=1)
                _LOG.exception('uploader error, retrying in %.1f s', backoff)
                self._wait(backoff, lambda: False)
                backoff = min(backoff * 2, self.settings.backoff_max_s)

    def _upload_pending(self) -> None:
        with self._condition:
            self._work = False
        for entry in self._source.pending():
            if self._stopping:
                return
            if entry.sha256 not in self._rejected:
                self._upload(entry)

    def _upload(self, entry: Entry) -> None:
        path = Path(os.fspath(entry.path))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            self._count(vanished=1)
            return
        if size != entry.size:
            self._reject(entry, f'{path} has {size} bytes, its index entry says {entry.size}')
            return
        sent_before = self.stats().bytes_sent
        while not self._stopping:
            if not self._pause_for_link(None):
                return
            offset = self._stub.Offset(
                collector_pb2.OffsetRequest(sha256=entry.sha256, size=size),
                timeout=self.settings.rpc_timeout_s)
            if offset.stored:
                self._source.mark_uploaded(entry)
                if self.stats().bytes_sent == sent_before:
                    self._count(duplicates=1)
                else:  # stored by this uploader's earlier stream whose reply was lost
                    self._count(uploaded=1)
                return
            if offset.received > size:
                raise _StreamEnded(f'the collector holds {offset.received} bytes of a '
                                   f'{size}-byte snippet')
            try:
                reply = self._stream(entry, path, size, offset.received)
            except grpc.RpcError as error:
                if error.code() in PERMANENT:
                    self._reject(entry, _describe(error))
                    return
                raise
            except _StreamEnded as error:  # the file shrank under us
                self._reject(entry, str(error))
                return
            if reply is not None and reply.stored:
                self._source.mark_uploaded(entry)
                self._count(**({'duplicates': 1} if reply.duplicate else {'uploaded': 1}))
                return

    def _stream(self, entry: Entry, path: Path, size: int,
                offset: int) -> collector_pb2.UploadReply | None:
        """Send one stream from ``offset``; it may end before the file does (None: no chunk)."""
        failure: list[BaseException] = []
        settings = self.settings

        def chunks() -> Iterator[collector_pb2.UploadChunk]:
            # Runs on gRPC's thread: an exception here would cancel the call, so it is kept.
            try:
                started = self._clock()
                with open(path, 'rb') as content:
                    content.seek(offset)
                    position = offset
                    while position < size:
                        if self._clock() - started > settings.stream_timeout_s / 2:
                            return
                        if not self._pause_for_link(settings.max_pause_s):
                            return
                        data = content.read(min(settings.chunk_bytes, size - position))
                        if not data:
                            raise _StreamEnded(f'{path} ended at {position} of {size} bytes')
                        yield collector_pb2.UploadChunk(
                            sha256=entry.sha256, size=size, offset=position, data=data,
                            name=path.name)
                        position += len(data)
                        self._count(chunks=1, bytes_sent=len(data))
            except Exception as error:  # noqa: B902 (re-raised on the uploader's thread)
                failure.append(error)

        stream = chunks()
        first = next(stream, None)  # an empty stream would be refused as malformed
        if first is not None:
            self._count(streams=1, resumed=1 if offset else 0)
        reply = (None if first is None else
                 self._stub.Upload(itertools.chain([first], stream),
                                   timeout=settings.stream_timeout_s))
        if failure:
            raise failure[0]
        return reply

    def _pause_for_link(self, limit_s: float | None) -> bool:
        """Wait while detection calls are in flight; False if stopping or ``limit_s`` passed."""
        with self._condition:
            if self._stopping:
                return False
            if not self._link_busy():
                return True
            self._stats.pauses += 1
            start = self._clock()
            while not self._stopping and self._link_busy():
                left = LINK_RECHECK_S if limit_s is None else limit_s - (self._clock() - start)
                if left <= 0:
                    break
                self._condition.wait(min(left, LINK_RECHECK_S))
            self._stats.paused_s += self._clock() - start
            return not self._stopping and not self._link_busy()

    def _wait(self, seconds: float, woken: Callable[[], bool]) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._stopping or woken(), seconds)

    def _reject(self, entry: Entry, reason: str) -> None:
        _LOG.error('skipping snippet %s for this run: %s', entry.sha256, reason)
        with self._condition:
            self._stats.rejected += 1
            if len(self._rejected) >= MAX_REJECTED:
                del self._rejected[next(iter(self._rejected))]
            self._rejected[entry.sha256] = None

    def _count(self, **increments: int) -> None:
        with self._condition:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f'{error.code().name}: {error.details()}'
    return str(error) or repr(error)
