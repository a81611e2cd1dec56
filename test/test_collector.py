"""The snippet collector and the vehicle's uploader over real gRPC on loopback (issue 10)."""
from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import os
from pathlib import Path
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
import pytest
from speculative_av.cloud import collector_pb2
from speculative_av.cloud import collector_pb2_grpc
from speculative_av.cloud.collector import parse_args, serve, SERVICE_NAME
from speculative_av.fleet.uploader import SnippetUploader, UploaderSettings

CHUNK = 4096
MAX_CHUNK_KB = 64
MAX_SNIPPET_MB = 1


def _wait(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = '') -> None:
    """Poll ``condition`` (state in another process or thread) until true or fail."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f'timed out waiting for {what or condition}'
        time.sleep(0.01)


class _Announce:
    """Catches the collector's listening line."""

    def __init__(self) -> None:
        self.text = ''
        self.ready = threading.Event()

    def write(self, text: str) -> int:
        self.text += text
        if '\n' in self.text:
            self.ready.set()
        return len(text)

    def flush(self) -> None:
        pass


@dataclass
class Collector:
    root: Path
    target: str
    channel: grpc.Channel

    @property
    def stub(self) -> collector_pb2_grpc.SnippetCollectorStub:
        return collector_pb2_grpc.SnippetCollectorStub(self.channel)

    def partial_size(self, sha: str) -> int:
        path = self.root / 'partial' / f'{sha}.part'
        return path.stat().st_size if path.exists() else 0


def _collector_args(root: Path, port: int = 0, *extra: str) -> list[str]:
    return ['--root', str(root), '--host', '127.0.0.1', '--port', str(port), '--insecure',
            '--min-free-mb', '0', '--max-chunk-kb', str(MAX_CHUNK_KB), '--max-snippet-mb',
            str(MAX_SNIPPET_MB), *extra]


@pytest.fixture
def start_collector(tmp_path: Path) -> Iterator[Callable[..., Collector]]:
    """Start in-process collectors (each serve() on its own thread); stop them afterwards."""
    running: list[tuple[threading.Event, threading.Thread, grpc.Channel]] = []

    def start(*extra: str) -> Collector:
        root = tmp_path / f'store{len(running)}'
        stop, announce = threading.Event(), _Announce()
        thread = threading.Thread(target=serve, args=(parse_args(_collector_args(
            root, 0, *extra)), stop, announce), daemon=True)
        thread.start()
        assert announce.ready.wait(20)
        target = '127.0.0.1:' + announce.text.split(':')[-1].strip()
        channel = grpc.insecure_channel(target)
        running.append((stop, thread, channel))
        return Collector(root, target, channel)

    yield start
    for stop, thread, channel in running:
        channel.close()
        stop.set()
        thread.join(10)


@dataclass(frozen=True)
class Entry:
    path: Path
    sha256: str
    size: int


class Source:
    """A SnippetSource over files; records what the uploader marks."""

    def __init__(self, *paths: Path) -> None:
        self.entries = [Entry(p, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size)
                        for p in paths]
        self.uploaded: list[Entry] = []
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def pending(self) -> list[Entry]:
        with self._lock:
            return [e for e in self.entries if e not in self.uploaded]

    def mark_uploaded(self, entry: Entry) -> None:
        with self._lock:
            self.uploaded.append(entry)
            self.changed.notify_all()

    def wait_uploaded(self, count: int, timeout_s: float = 20.0) -> None:
        with self._lock:
            assert self.changed.wait_for(lambda: len(self.uploaded) >= count, timeout_s), (
                f'{len(self.uploaded)} of {count} uploaded')


def _snippet(directory: Path, name: str, size: int, seed: int = 0) -> Path:
    path = directory / name
    path.write_bytes(hashlib.shake_256(f'{name}{seed}'.encode()).digest(size))
    return path


FAST = UploaderSettings(chunk_bytes=CHUNK, backoff_initial_s=0.05, backoff_max_s=0.2,
                        poll_s=0.05)


def _uploader(source: Source, target: str, **kwargs: object) -> SnippetUploader[Entry]:
    settings = kwargs.pop('settings', FAST)
    uploader = SnippetUploader(source, grpc.insecure_channel(target),
                               settings=settings, **kwargs)  # type: ignore[arg-type]
    uploader.start()
    return uploader


# --- upload, dedup, index ----------------------------------------------------------------


def test_snippets_are_uploaded_verified_indexed_and_not_sent_twice(start_collector, tmp_path):
    collector = start_collector()
    health = health_pb2_grpc.HealthStub(collector.channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    files = [_snippet(tmp_path, f's{i}.mcap', 10_000 + 7_000 * i) for i in range(3)]
    source = Source(*files)
    uploader = _uploader(source, collector.target)
    try:
        source.wait_uploaded(3)
    finally:
        uploader.stop()
    for entry in source.entries:
        assert (collector.root / 'snippets' / f'{entry.sha256}.mcap').read_bytes() == (
            entry.path.read_bytes())
    lines = (collector.root / 'index.jsonl').read_text().splitlines()
    index = [json.loads(line) for line in lines]
    assert [(i['sha256'], i['bytes'], i['name']) for i in index] == [
        (e.sha256, e.size, e.path.name) for e in source.entries]
    stats = uploader.stats()
    assert (stats.uploaded, stats.duplicates, stats.bytes_sent) == (
        3, 0, sum(e.size for e in source.entries))
    assert stats.chunks == sum(-(-e.size // CHUNK) for e in source.entries)
    # Another vehicle (or this one after a restart) with the same content sends nothing.
    copy = tmp_path / 'copy'
    copy.mkdir()
    again = Source(*(Path(os.path.join(copy, f.name)) for f in files
                     if (copy / f.name).write_bytes(f.read_bytes())))
    second = _uploader(again, collector.target)
    try:
        again.wait_uploaded(3)
    finally:
        second.stop()
    assert (second.stats().duplicates, second.stats().bytes_sent) == (3, 0)
    assert len((collector.root / 'index.jsonl').read_text().splitlines()) == 3


def test_an_upload_stream_of_stored_content_is_answered_duplicate(start_collector, tmp_path):
    collector = start_collector()
    data = b'x' * 100
    sha = hashlib.sha256(data).hexdigest()
    chunk = collector_pb2.UploadChunk(sha256=sha, size=100, offset=0, data=data, name='a')
    assert collector.stub.Upload(iter([chunk]), timeout=5).stored
    reply = collector.stub.Upload(iter([chunk]), timeout=5)
    assert (reply.stored, reply.duplicate, reply.received) == (True, True, 100)


# --- resume -------------------------------------------------------------------------------

_HALF_CLIENT = r"""
import sys, threading, grpc
from speculative_av.cloud import collector_pb2, collector_pb2_grpc
target, path, sha, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = open(path, 'rb').read()
def chunks():
    for offset in range(0, len(data) // 2, chunk):
        yield collector_pb2.UploadChunk(sha256=sha, size=len(data), offset=offset,
                                        data=data[offset:offset + chunk], name='half')
    threading.Event().wait()  # hang mid-stream until killed
collector_pb2_grpc.SnippetCollectorStub(grpc.insecure_channel(target)).Upload(chunks())
"""


def test_an_upload_killed_mid_stream_resumes_where_the_collector_stopped(
        start_collector, tmp_path):
    collector = start_collector()
    path = _snippet(tmp_path, 'big.mcap', 200 * 1024)
    source = Source(path)
    sha = source.entries[0].sha256
    half = (200 * 1024 // 2 + CHUNK - 1) // CHUNK * CHUNK
    client = subprocess.Popen([sys.executable, '-c', _HALF_CLIENT, collector.target, str(path),
                               sha, str(CHUNK)])
    try:
        _wait(lambda: collector.partial_size(sha) >= half, what='half the snippet to arrive')
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    request = collector_pb2.OffsetRequest(sha256=sha, size=path.stat().st_size)
    _wait(lambda: collector.stub.Offset(request, timeout=5).received == half,
          what='the offset to report the half')
    uploader = _uploader(source, collector.target)
    try:
        source.wait_uploaded(1)
    finally:
        uploader.stop()
    stats = uploader.stats()
    # It resumed rather than starting over (a first try may meet the killed stream's handler
    # still holding the hash: ABORTED, retried).
    assert stats.uploaded == 1 and stats.resumed >= 1
    assert stats.bytes_sent <= path.stat().st_size - half + stats.failures * CHUNK
    assert (collector.root / 'snippets' / f'{sha}.mcap').read_bytes() == path.read_bytes()
    assert not (collector.root / 'partial' / f'{sha}.part').exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def test_the_uploader_survives_a_collector_that_is_down_and_then_comes_up(tmp_path):
    source = Source(_snippet(tmp_path, 'a.mcap', 50_000))
    port = _free_port()
    uploader = _uploader(source, f'127.0.0.1:{port}')
    process = None
    try:
        _wait(lambda: uploader.stats().failures >= 2, what='failures against a down collector')
        assert uploader.stats().uploaded == 0
        process = subprocess.Popen(
            [sys.executable, '-m', 'speculative_av.cloud.collector',
             *_collector_args(tmp_path / 'store', port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None
        assert 'listening' in process.stdout.readline()
        source.wait_uploaded(1, timeout_s=30)
    finally:
        uploader.stop()
        if process is not None:
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
    assert uploader.stats().uploaded == 1 and uploader.stats().errors == 0


# --- the link: detection calls first ------------------------------------------------------


class Link:
    """link_busy(): idle for the first ``idle_checks`` calls, then busy until released."""

    def __init__(self, idle_checks: int) -> None:
        self.idle_checks = idle_checks
        self.calls = 0
        self.busy_checks = 0
        self.released = False
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def __call__(self) -> bool:
        with self._lock:
            self.calls += 1
            busy = self.calls > self.idle_checks and not self.released
            self.busy_checks += busy
            self.changed.notify_all()
            return busy

    def wait_busy_checks(self, count: int) -> None:
        with self._lock:
            assert self.changed.wait_for(lambda: self.busy_checks >= count, 20)


def test_upload_pauses_between_chunks_while_detection_calls_are_in_flight(start_collector,
                                                                          tmp_path):
    collector = start_collector()
    source = Source(_snippet(tmp_path, 'a.mcap', 10 * CHUNK))
    sha = source.entries[0].sha256
    # Checks: before Offset, before chunk 1: idle. Before chunk 2 detection calls start.
    link = Link(idle_checks=2)
    uploader = _uploader(source, collector.target, link_busy=link,
                         settings=UploaderSettings(chunk_bytes=CHUNK, max_pause_s=60))
    try:
        link.wait_busy_checks(1)
        _wait(lambda: collector.partial_size(sha) == CHUNK, what='the first chunk to land')
        for _ in range(3):  # spurious wake-ups: it looks again and stays paused
            checks = link.busy_checks
            uploader.link_changed()
            link.wait_busy_checks(checks + 1)
        assert collector.partial_size(sha) == CHUNK, 'only the chunk sent before the calls'
        assert uploader.stats().chunks == 1 and uploader.stats().pauses == 1
        with link.changed:
            link.released = True
        uploader.link_changed()
        source.wait_uploaded(1)
    finally:
        uploader.stop()
    stats = uploader.stats()
    assert (stats.uploaded, stats.chunks, stats.streams) == (1, 10, 1)


def test_a_long_pause_ends_the_stream_and_the_upload_resumes_in_a_new_one(start_collector,
                                                                          tmp_path):
    collector = start_collector()
    source = Source(_snippet(tmp_path, 'a.mcap', 3 * CHUNK))
    link = Link(idle_checks=2)
    uploader = _uploader(source, collector.target, link_busy=link,
                         settings=UploaderSettings(chunk_bytes=CHUNK, max_pause_s=0.05))
    try:
        # The stream paused past max_pause_s ends; a new one waits for the link before Offset.
        _wait(lambda: uploader.stats().streams == 1 and uploader.stats().pauses >= 2,
              what='the stream to end and the uploader to wait again')
        assert uploader.stats().chunks == 1
        with link.changed:
            link.released = True
        uploader.link_changed()
        source.wait_uploaded(1)
    finally:
        uploader.stop()
    stats = uploader.stats()
    assert (stats.uploaded, stats.streams, stats.resumed) == (1, 2, 1)
    assert stats.bytes_sent == 3 * CHUNK
    assert (collector.root / 'snippets' / f'{source.entries[0].sha256}.mcap').exists()


# --- hostile input ------------------------------------------------------------------------


def _chunk(data: bytes, *, sha: str | None = None, size: int | None = None, offset: int = 0,
           name: str = 'x.mcap') -> collector_pb2.UploadChunk:
    return collector_pb2.UploadChunk(
        sha256=hashlib.sha256(data).hexdigest() if sha is None else sha,
        size=len(data) if size is None else size, offset=offset, data=data, name=name)


def _refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def test_hostile_uploads_are_refused_and_leave_nothing_stored(start_collector):
    collector = start_collector()
    stub = collector.stub
    data = os.urandom(3 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()

    def upload(*chunks: collector_pb2.UploadChunk) -> tuple[grpc.StatusCode, str]:
        return _refused(lambda: stub.Upload(iter(chunks), timeout=5))

    assert upload(_chunk(data[:CHUNK], sha=sha, size=len(data), offset=CHUNK))[0] == (
        grpc.StatusCode.FAILED_PRECONDITION)
    assert upload(_chunk(data, sha=hashlib.sha256(b'other').hexdigest()))[0] == (
        grpc.StatusCode.DATA_LOSS)
    assert upload(_chunk(b'x' * 10, size=(MAX_SNIPPET_MB << 20) + 1))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT)
    oversize_chunk = os.urandom((MAX_CHUNK_KB << 10) + 2048)
    assert upload(_chunk(oversize_chunk))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for sha_text in ('', '../../etc/passwd', sha.upper(), sha[:-1], sha + '0'):
        assert upload(_chunk(data, sha=sha_text))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert _refused(lambda: stub.Offset(collector_pb2.OffsetRequest(
            sha256=sha_text, size=10), timeout=5))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert upload(_chunk(data, size=0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert upload(_chunk(data, name='a\nb'))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert upload(_chunk(data, name='n' * 201))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert upload(_chunk(b'', sha=sha, size=len(data)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert upload(_chunk(data[:CHUNK], sha=sha, size=len(data)),
                  _chunk(data[CHUNK:], sha=hashlib.sha256(b'x').hexdigest(), size=len(data),
                         offset=CHUNK))[0] == grpc.StatusCode.INVALID_ARGUMENT
    overrun = _chunk(data[:CHUNK], sha=sha, size=CHUNK // 2)
    assert upload(overrun)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert upload()[0] == grpc.StatusCode.INVALID_ARGUMENT  # an empty stream
    # Garbage that is not an UploadChunk at all, and a stream of it.
    raw = collector.channel.stream_unary('/speculative_av.v1.SnippetCollector/Upload')
    code, _ = _refused(lambda: raw(iter([b'\xff' * 64, os.urandom(1000)]), timeout=5))
    assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert not list((collector.root / 'snippets').iterdir())
    assert not (collector.root / 'index.jsonl').exists()
    # Still serving: the content uploads in one proper stream (the first chunk was kept).
    assert stub.Offset(collector_pb2.OffsetRequest(sha256=sha, size=len(data)),
                       timeout=5).received == 0
    chunks = [_chunk(data[o:o + CHUNK], sha=sha, size=len(data), offset=o)
              for o in range(0, len(data), CHUNK)]
    assert stub.Upload(iter(chunks), timeout=5).stored


def test_concurrent_uploads_of_one_hash_one_wins_the_other_is_aborted(start_collector):
    collector = start_collector()
    data = os.urandom(2 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    hold = threading.Event()

    def held() -> Iterator[collector_pb2.UploadChunk]:
        yield _chunk(data[:CHUNK], sha=sha, size=len(data))
        hold.wait(10)
        yield _chunk(data[CHUNK:], sha=sha, size=len(data), offset=CHUNK)

    first = collector.stub.Upload.future(held(), timeout=20)
    _wait(lambda: collector.partial_size(sha) == CHUNK, what='the first stream to write')
    code, details = _refused(lambda: collector.stub.Upload(
        iter([_chunk(data[:CHUNK], sha=sha, size=len(data))]), timeout=5))
    assert code == grpc.StatusCode.ABORTED and 'in progress' in details
    hold.set()
    assert first.result(timeout=20).stored


def test_stalled_streams_are_cancelled_and_upload_slots_are_bounded(start_collector):
    collector = start_collector('--idle-timeout-s', '0.3', '--max-uploads', '1')
    data = os.urandom(2 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    never = threading.Event()

    def stalled() -> Iterator[collector_pb2.UploadChunk]:
        yield _chunk(data[:CHUNK], sha=sha, size=len(data))
        never.wait(30)

    staller = collector.stub.Upload.future(stalled(), timeout=30)
    _wait(lambda: collector.partial_size(sha) == CHUNK, what='the stalled stream to start')
    other = os.urandom(100)
    code, details = _refused(lambda: collector.stub.Upload(iter([_chunk(other)]), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and 'slots' in details
    with pytest.raises(grpc.RpcError) as ended:
        staller.result(timeout=10)
    never.set()
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    # The slot is free again (once the cancelled handler unwound) and the stalled content
    # resumes from what arrived.

    def upload_other() -> bool:
        try:
            return collector.stub.Upload(iter([_chunk(other)]), timeout=5).stored
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    _wait(upload_other, what='the slot of the cancelled stream to be free')
    assert collector.stub.Offset(collector_pb2.OffsetRequest(sha256=sha, size=len(data)),
                                 timeout=5).received == CHUNK


def test_tokens_guard_the_streaming_upload_too(start_collector, tmp_path):
    tokens = tmp_path / 'tokens'
    tokens.write_text('car1 0123456789abcdef0123 Offset,Upload\n')
    tokens.chmod(0o600)
    collector = start_collector('--tokens', str(tokens))
    data = b'payload'
    code, _ = _refused(lambda: collector.stub.Upload(iter([_chunk(data)]), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _refused(lambda: collector.stub.Offset(collector_pb2.OffsetRequest(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data)), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    metadata = (('authorization', 'Bearer 0123456789abcdef0123'),)
    assert collector.stub.Upload(iter([_chunk(data)]), timeout=5, metadata=metadata).stored
    index = json.loads((collector.root / 'index.jsonl').read_text())
    assert re.match(r'^ipv4:127\.0\.0\.1:\d+$', index['client'])
    assert not list((collector.root / 'partial').iterdir())
