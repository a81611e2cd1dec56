"""
The collector's file-system store of uploaded snippets: partial files, verified, then published.

Layout under the root: ``partial/<sha256>.part`` (an upload in progress or interrupted; its length
is where the upload resumes), ``snippets/<sha256>.mcap`` (complete, verified content; its name
is its hash, so a second upload of the same content is a duplicate), and ``index.jsonl`` (one
JSON line per stored snippet: sha256, bytes, the vehicle's file name, the client, the time).

No gRPC here: refusals are :class:`UploadRefused` with a :class:`Refusal` kind, which the
service maps to status codes. Only one upload of a given hash runs at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
import enum
import hashlib
import json
import logging
import os
from pathlib import Path
import re
import shutil
import threading
import time
from typing import Callable

_LOG = logging.getLogger('snippet_collector')

SHA256 = re.compile(r'^[0-9a-f]{64}$')
MAX_NAME_LENGTH = 200
_HASH_BLOCK = 1 << 20


class Refusal(enum.Enum):
    """Why an upload or offset request is refused."""

    INVALID = 'invalid'  # malformed hash, size, chunk or name
    OFFSET = 'offset'  # the chunk does not continue the content received so far
    BUSY = 'busy'  # another upload of this hash is in progress
    FULL = 'full'  # the disk would fall below the collector's reserve
    MISMATCH = 'mismatch'  # the complete content does not hash to its sha256


class UploadRefused(ValueError):
    """A request the store refuses; ``kind`` says why, the message says what."""

    def __init__(self, kind: Refusal, message: str) -> None:
        """Refuse for ``kind`` with a message a client can act on."""
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class StoreLimits:
    """Bounds on what one client can make the collector hold."""

    max_snippet_bytes: int = 64 << 20
    max_chunk_bytes: int = 1 << 20
    min_free_bytes: int = 1 << 30  # refuse uploads that would leave less free disk than this

    def __post_init__(self) -> None:
        """Refuse bounds that make no sense."""
        if self.max_snippet_bytes < 1 or self.max_chunk_bytes < 1 or self.min_free_bytes < 0:
            raise ValueError(f'invalid store limits {self}')


class Upload:
    """One stream's writes into a partial file; the store hands it out, one per hash."""

    def __init__(self, store: CollectorStore, sha256: str, size: int, name: str,
                 client: str) -> None:
        """Open the partial file of ``sha256`` for appending (the store checked the request)."""
        self.sha256, self.size, self.name, self.client = sha256, size, name, client
        self._store = store
        self.path = store.partial_path(sha256)
        self._file = open(self.path, 'ab')  # noqa: SIM115 (closed by close())
        self.received = self._file.tell()

    @property
    def complete(self) -> bool:
        """Return whether every byte arrived."""
        return self.received == self.size

    def append(self, sha256: str, size: int, offset: int, data: bytes) -> None:
        """Write one chunk; it must name this upload and continue it exactly."""
        if sha256 != self.sha256 or size != self.size:
            raise UploadRefused(Refusal.INVALID, 'every chunk must carry the sha256 and size of '
                                'the first')
        if offset != self.received:
            raise UploadRefused(Refusal.OFFSET, f'chunk at offset {offset}, but the collector '
                                f'holds {self.received} bytes: resume there (Offset)')
        if not data:
            raise UploadRefused(Refusal.INVALID, 'empty chunk')
        if len(data) > self._store.limits.max_chunk_bytes:
            raise UploadRefused(Refusal.INVALID, f'chunk of {len(data)} bytes exceeds '
                                f'{self._store.limits.max_chunk_bytes}')
        if offset + len(data) > self.size:
            raise UploadRefused(Refusal.INVALID, f'chunk ends at {offset + len(data)}, past the '
                                f'declared size {self.size}')
        self._file.write(data)
        self._file.flush()  # the file's length is the resume point, also for Offset
        self.received += len(data)

    def finish(self) -> None:
        """Verify the complete content and publish it; a mismatch discards the partial file."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = hashlib.sha256()
        with open(self.path, 'rb') as content:
            for block in iter(lambda: content.read(_HASH_BLOCK), b''):
                digest.update(block)
        if digest.hexdigest() != self.sha256:
            self.path.unlink()
            raise UploadRefused(Refusal.MISMATCH, f'the {self.size} bytes received hash to '
                                f'{digest.hexdigest()}, not {self.sha256}; discarded')
        self._store.publish(self)

    def close(self) -> None:
        """Keep what arrived (durably, for a resume) and let the next upload of the hash in."""
        try:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
        finally:
            self._store.release(self.sha256)


class CollectorStore:
    """Snippets on a file system; thread-safe."""

    def __init__(self, root: Path, limits: StoreLimits = StoreLimits(),
                 clock: Callable[[], float] = time.time) -> None:
        """Use (and create) ``root``; ``clock`` stamps index lines (Unix seconds)."""
        self.root = root
        self.limits = limits
        self._clock = clock
        self._partial = root / 'partial'
        self._snippets = root / 'snippets'
        self.index_path = root / 'index.jsonl'
        self._partial.mkdir(parents=True, exist_ok=True)
        self._snippets.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._active: set[str] = set()

    def partial_path(self, sha256: str) -> Path:
        """Return where an upload of ``sha256`` accumulates."""
        return self._partial / f'{sha256}.part'

    def snippet_path(self, sha256: str) -> Path:
        """Return where the verified content of ``sha256`` is stored."""
        return self._snippets / f'{sha256}.mcap'

    def check(self, sha256: str, size: int) -> None:
        """Refuse a malformed hash or a size outside (0, max_snippet_bytes]."""
        if not isinstance(sha256, str) or not SHA256.match(sha256):
            raise UploadRefused(Refusal.INVALID, 'sha256 must be 64 lowercase hex digits')
        if not 0 < size <= self.limits.max_snippet_bytes:
            raise UploadRefused(Refusal.INVALID, f'size {size} is not in 1..'
                                f'{self.limits.max_snippet_bytes}')

    def offset(self, sha256: str, size: int) -> tuple[int, bool]:
        """Return (bytes received, stored) for content ``sha256`` of ``size`` bytes."""
        self.check(sha256, size)
        if self.snippet_path(sha256).exists():
            return size, True
        try:
            received = self.partial_path(sha256).stat().st_size
        except FileNotFoundError:
            return 0, False
        # A partial longer than the size claimed now cannot be this content: start over.
        return (received if received <= size else 0), False

    def begin(self, sha256: str, size: int, name: str, client: str) -> Upload | None:
        """Start (or resume) an upload; None when the content is already stored."""
        self.check(sha256, size)
        if len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise UploadRefused(Refusal.INVALID, f'name must be printable and at most '
                                f'{MAX_NAME_LENGTH} characters')
        with self._lock:
            if self.snippet_path(sha256).exists():
                return None
            if sha256 in self._active:
                raise UploadRefused(Refusal.BUSY, 'another upload of this snippet is in '
                                    'progress')
            self._active.add(sha256)
        try:
            received, _ = self.offset(sha256, size)
            if received == 0:
                self.partial_path(sha256).unlink(missing_ok=True)  # an over-long leftover
            free = shutil.disk_usage(self.root).free
            if free - (size - received) < self.limits.min_free_bytes:
                raise UploadRefused(Refusal.FULL, f'{size - received} more bytes would leave '
                                    f'less than {self.limits.min_free_bytes} bytes free')
            return Upload(self, sha256, size, name, client)
        except BaseException:
            self.release(sha256)
            raise

    def publish(self, upload: Upload) -> None:
        """Move verified content into place (atomically) and index it."""
        target = self.snippet_path(upload.sha256)
        os.replace(upload.path, target)
        _fsync_directory(self._snippets)
        line = json.dumps({'sha256': upload.sha256, 'bytes': upload.size, 'name': upload.name,
                           'client': upload.client, 'stored_unix': round(self._clock(), 3)})
        with self._lock, open(self.index_path, 'a') as index:
            index.write(line + '\n')
            index.flush()
            os.fsync(index.fileno())
        _LOG.info('stored %s (%d bytes) from %s', upload.sha256, upload.size, upload.client)

    def release(self, sha256: str) -> None:
        """End the upload of ``sha256`` (called by :meth:`Upload.close`)."""
        with self._lock:
            self._active.discard(sha256)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
