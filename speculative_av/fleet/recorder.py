"""
Keep triggered frames: evaluate the triggers per settled frame, write snippets off the hot path.

:meth:`TriggerRecorder.offer` runs in the engine's ``settled`` callback, under the engine's lock:
it only evaluates the rules, takes a rate-limit token and appends to a bounded queue (full:
the frame is dropped and counted). Its own supervised thread encodes the jpeg and writes the
snippet into the :class:`~speculative_av.fleet.snippets.SnippetStore`; a failed write is logged
(throttled), counted and the thread goes on.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import threading
import time
import traceback
from typing import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
from speculative_av.cloud.codec import encode_frame
from speculative_av.core.arbiter import FrameRecord
from speculative_av.core.detections import Detections
from speculative_av.core.throttled_log import ErrorLogger, ThrottledErrors
from speculative_av.fleet.snippets import Snippet, SnippetStore
from speculative_av.fleet.triggers import (cloud_missed_deadline, RateLimiter,
                                           REASONS, TriggerRules, TriggerSettings)


@dataclass(frozen=True)
class _Pending:
    """A triggered frame waiting for the writer: everything the snippet needs but the jpeg."""

    camera: str
    stamp_ns: int
    frame_id: str
    rgb: npt.NDArray[np.uint8]
    local: Detections
    cloud: Detections | None
    winner: str
    late: bool
    reasons: tuple[str, ...]
    local_model: str
    cloud_model: str


class TriggerRecorder:
    """Evaluate triggers on settled frames and write the triggered ones as snippets."""

    def __init__(self, settings: TriggerSettings, store: SnippetStore,
                 categories: Sequence[str], *, queue_size: int = 4, jpeg_quality: int = 90,
                 clock: Callable[[], float] = time.monotonic,
                 logger: ErrorLogger | None = None) -> None:
        """
        Check the settings against ``categories`` (the local label map); nothing runs yet.

        ``clock`` (seconds) paces the rate limit; ``queue_size`` frames at most wait for the
        writer (each holds its RGB image).
        """
        if queue_size < 1:
            raise ValueError(f'queue_size must be at least 1, got {queue_size}')
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f'jpeg_quality must be in 1..100, got {jpeg_quality}')
        self.rules = TriggerRules(settings, categories)
        self.store = store
        self.categories = tuple(categories)
        self._queue_size = queue_size
        self._jpeg_quality = jpeg_quality
        self._clock = clock
        self._limiter = RateLimiter(settings.max_per_minute, settings.burst, clock())
        self._log = logger
        self._queue: deque[_Pending] = deque()
        self._ready = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._throttled_error = ThrottledErrors(logger)  # logs one error a second at most
        self.fatal = ''  # why the writer thread died; set once
        self.counters: dict[str, int] = {
            'triggered': 0, **{f'reason_{r}': 0 for r in REASONS}, 'rate_limited': 0,
            'queue_full': 0, 'no_image': 0, 'written': 0, 'write_errors': 0}

    def offer(self, camera: str, stamp_ns: int, frame_id: str,
              rgb: npt.NDArray[np.uint8] | None, record: FrameRecord,
              cloud_sources: Sequence[str], local_model: str,
              cloud_models: Mapping[str, str] | None = None) -> list[str]:
        """
        Evaluate a settled frame; queue it for writing if it triggers. Return its reasons.

        Called under the engine's lock: no encoding, no I/O, no waiting here. ``rgb`` None (the
        image was not kept) is counted as ``no_image``. ``cloud_models`` names the model each
        endpoint answered with (``Frame.cloud_models``); the snippet records the answering one.
        """
        local_attempt = record.attempts.get('local')
        local = (local_attempt.detections if local_attempt is not None
                 and local_attempt.detections is not None else Detections.empty())
        endpoint, cloud = record.cloud_answer(cloud_sources)
        model = (cloud_models or {}).get(endpoint)
        cloud_model = f'{endpoint} {model}' if model else endpoint
        reasons = self.rules.reasons(local, cloud, cloud_missed_deadline(record, cloud_sources))
        if not reasons:
            return reasons
        self.counters['triggered'] += 1
        for reason in reasons:
            self.counters[f'reason_{reason}'] += 1
        if not self._limiter.take(self._clock()):
            self.counters['rate_limited'] += 1
            return reasons
        if rgb is None:
            self.counters['no_image'] += 1
            return reasons
        decision = record.decision
        pending = _Pending(camera, stamp_ns, frame_id, rgb, local, cloud, decision.winner or '',
                           decision.late, tuple(reasons), local_model, cloud_model)
        with self._ready:
            if len(self._queue) >= self._queue_size:
                self.counters['queue_full'] += 1
                return reasons
            self._queue.append(pending)
            self._ready.notify()
        return reasons

    def snapshot(self) -> dict[str, int]:
        """Return the counters with the store's, for diagnostics."""
        with self._ready:
            queued = len(self._queue)
        return {**self.counters, **self.store.counters, 'queued': queued,
                'bytes_on_disk': self.store.bytes_on_disk}

    # The writer thread -------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        self._running = True
        self._thread = threading.Thread(target=self._supervised, name='snippet-writer',
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer thread."""
        with self._ready:
            self._running = False
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _supervised(self) -> None:
        try:
            self._write_loop()
        except BaseException as error:  # noqa: B902 (whatever killed it is reported)
            self.fatal = f'snippet writer thread died: {error!r}'
            if self._log is not None:
                self._log.error(f'{self.fatal}\n{traceback.format_exc()}')

    def _write_loop(self) -> None:
        while True:
            with self._ready:
                while self._running and not self._queue:
                    self._ready.wait()
                if not self._queue:
                    return  # stopped, and everything queued is written
                pending = self._queue.popleft()
            try:
                self._write(pending)
            except Exception as error:  # noqa: B902 (one failed write must not stop the next)
                self.counters['write_errors'] += 1
                self._throttled_error(f'writing the snippet of {pending.frame_id!r} at '
                                      f'{pending.stamp_ns / 1e9:.3f} s failed: {error!r}')

    def _write(self, pending: _Pending) -> None:
        """Encode the frame's jpeg and store its snippet (on the writer thread)."""
        jpeg = encode_frame(pending.rgb, jpeg_quality=self._jpeg_quality).data
        self.store.add(Snippet(
            pending.camera, pending.stamp_ns, pending.frame_id, jpeg, pending.local,
            pending.cloud, pending.winner, pending.late, pending.reasons, pending.local_model,
            pending.cloud_model, self.categories))
        self.counters['written'] += 1
