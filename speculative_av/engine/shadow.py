"""
Shadow mode: a candidate local model runs beside the deployed one and is only ever compared.

Before a candidate drives, it answers the same frames on the vehicle: its agreement with the
deployed model's result and with the cloud's (the teacher) says, per lighting condition, whether
it behaves as the offline gate predicted. It runs on its own thread, on every Nth frame and only
within a share of one core's wall time, so the deployed pipeline keeps its deadline; it is fed
from the engine sink's ``local`` and ``settled`` callbacks with cheap enqueues and never writes
to anything the fused output is built from.

On the vehicle there is no ground truth, so the condition is estimated from the image:
:func:`image_period` thresholds its brightness (calibrated on the scene generator with
:mod:`speculative_av.tools.period_calibration`).
"""
from __future__ import annotations

from collections import deque, OrderedDict
from dataclasses import dataclass
import threading
import time
import traceback
from typing import Any, Callable, Hashable, Protocol

import numpy as np
import numpy.typing as npt
from speculative_av.core.detections import Detections
from speculative_av.core.matching import match
from speculative_av.core.throttled_log import ErrorLogger, ThrottledErrors

Image = npt.NDArray[np.uint8]
PERIODS = ('day', 'dusk', 'night')
# Brightness (the 90th percentile of luma, see image_brightness) below which a frame is night,
# and below which it is dusk; fitted on generated scenes 0-399 (tools/period_calibration.py).
NIGHT_BELOW = 72.6
DUSK_BELOW = 120.5
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601
_SUBSAMPLE = 4  # every 4th row and column: the percentile hardly moves, the cost drops 16-fold


def image_brightness(rgb: Image) -> float:
    """
    Return the 90th percentile of the image's luma (0-255).

    The bright end (sky, lit walls) tells the time of day better than the mean, which the
    share of dark road and cars in view moves as much as the light does.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f'expected a non-empty (H, W, 3) RGB image, got shape {rgb.shape}')
    luma = rgb[::_SUBSAMPLE, ::_SUBSAMPLE].astype(np.float32) @ _LUMA
    return float(np.percentile(luma, 90))


def image_period(rgb: Image, night_below: float = NIGHT_BELOW,
                 dusk_below: float = DUSK_BELOW) -> str:
    """Return 'day', 'dusk' or 'night', estimated from the image's brightness alone."""
    brightness = image_brightness(rgb)
    return 'night' if brightness < night_below else 'dusk' if brightness < dusk_below else 'day'


class Candidate(Protocol):
    """What shadow mode needs of the candidate detector."""

    def detect(self, rgb: Image) -> Detections:
        """Detect objects in one (H, W, 3) uint8 RGB image."""


@dataclass(frozen=True)
class ShadowSettings:
    """How often the candidate runs and how its answers are compared."""

    every_nth: int = 1  # offer the candidate every Nth frame with a local result
    cpu_share: float = 0.25  # of one core's wall time, averaged over burst_s; 1.0 = no budget
    iou: float = 0.5  # two boxes of one class overlapping this much are the same object
    min_score: float = 0.5  # detections below this are left out of the comparison
    burst_s: float = 1.0  # unused budget is kept for at most this much wall time
    max_pending: int = 32  # frames waiting for their cloud result; the oldest are given up

    def __post_init__(self) -> None:
        """Refuse settings that could not bound the candidate or compare anything."""
        if self.every_nth < 1:
            raise ValueError(f'every_nth must be at least 1, got {self.every_nth}')
        if not 0.0 < self.cpu_share <= 1.0:
            raise ValueError(f'cpu_share must be in (0, 1], got {self.cpu_share}')
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f'iou must be in (0, 1], got {self.iou}')
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f'min_score must be in [0, 1], got {self.min_score}')
        if self.burst_s <= 0:
            raise ValueError(f'burst_s must be positive, got {self.burst_s}')
        if self.max_pending < 1:
            raise ValueError(f'max_pending must be at least 1, got {self.max_pending}')


@dataclass
class ConditionSummary:
    """The candidate's record under one condition."""

    frames: int = 0  # the candidate answered
    agreement_deployed_sum: float = 0.0
    cloud_frames: int = 0  # ... and the cloud answered too
    agreement_cloud_sum: float = 0.0
    cloud_missing: int = 0  # ... and the frame settled without a cloud answer
    inference_s_sum: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Return frames, mean agreements (with deployed, with cloud) and mean inference ms."""
        return {'frames': self.frames,
                'agreement_deployed': round(self.agreement_deployed_sum / self.frames, 4)
                if self.frames else 0.0,
                'agreement_cloud': round(self.agreement_cloud_sum / self.cloud_frames, 4)
                if self.cloud_frames else 0.0,
                'cloud_frames': self.cloud_frames, 'cloud_missing': self.cloud_missing,
                'inference_ms': round(self.inference_s_sum / self.frames * 1e3, 2)
                if self.frames else 0.0}


@dataclass
class _Frame:
    """A frame offered to the candidate, until both its candidate and cloud results are in."""

    rgb: Image | None
    deployed: Detections
    period: str = ''
    candidate: Detections | None = None
    settled: bool = False
    cloud: Detections | None = None


class ShadowRunner:
    """Run a candidate detector on some frames beside the deployed one and score its agreement."""

    def __init__(self, candidate: Candidate, settings: ShadowSettings = ShadowSettings(), *,
                 name: str = 'candidate', label_map: npt.NDArray[np.int64] | None = None,
                 timer: Callable[[], float] = time.perf_counter,
                 logger: ErrorLogger | None = None) -> None:
        """
        Build the runner; nothing runs until :meth:`start` (or hand-driven :meth:`run_once`).

        ``name`` says which candidate this is in reports; ``label_map`` translates the
        candidate's label ids into the deployed model's (see
        ``core.detections.label_mapping``); ``timer`` (s) measures inference and the budget.
        """
        self.candidate = candidate
        self.name = name
        self.settings = settings
        self._label_map = label_map
        self._timer = timer
        self._log = logger
        self._lock = threading.Condition()
        self._slot: tuple[Hashable, _Frame] | None = None  # the newest frame not yet taken
        self._pending: OrderedDict[Hashable, _Frame] = OrderedDict()
        self._ready: deque[_Frame] = deque()  # both results in: to score against the cloud
        self._budget_s = settings.cpu_share * settings.burst_s
        self._budget_at = timer()
        self._busy_s = 0.0
        self._started_at = self._budget_at
        self.summaries = {period: ConditionSummary() for period in PERIODS}
        self.counters = {'offered': 0, 'skipped_nth': 0, 'skipped_budget': 0, 'replaced': 0,
                         'ran': 0, 'candidate_errors': 0, 'errors': 0, 'unpaired': 0}
        self._running = False
        self._thread: threading.Thread | None = None
        self._throttled_error = ThrottledErrors(logger)  # logs one error a second at most
        self.fatal = ''  # why the thread died; set once

    # Inputs: the engine's sink calls these --------------------------------------------------

    def offer(self, key: Hashable, rgb: Image, deployed: Detections) -> bool:
        """
        Take a frame and its deployed result; return whether the candidate will see it.

        Cheap (no copy, no inference): called on the engine's worker before the local result
        goes to the arbiter. A frame still waiting is replaced (newest wins, counted).
        """
        with self._lock:
            self.counters['offered'] += 1
            if (self.counters['offered'] - 1) % self.settings.every_nth:
                self.counters['skipped_nth'] += 1
                return False
            if not self._within_budget():
                self.counters['skipped_budget'] += 1
                return False
            if self._slot is not None:
                self.counters['replaced'] += 1
                self._pending.pop(self._slot[0], None)
            frame = _Frame(rgb, deployed)
            self._pending[key] = frame
            while len(self._pending) > self.settings.max_pending:
                self._pending.popitem(last=False)
                self.counters['unpaired'] += 1
            self._slot = (key, frame)
            self._lock.notify()
            return True

    def settled(self, key: Hashable, cloud: Detections | None) -> None:
        """Take a settled frame's cloud result (None: the cloud never answered); O(1)."""
        with self._lock:
            frame = self._pending.get(key)
            if frame is None:
                return
            frame.settled, frame.cloud = True, cloud
            if frame.candidate is not None:
                del self._pending[key]
                self._ready.append(frame)
                self._lock.notify()

    # Running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the runner's supervised thread."""
        self._running = True
        self._thread = threading.Thread(target=self._supervised, name='shadow', daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after the inference in progress, if any."""
        with self._lock:
            self._running = False
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None

    def run_once(self, timeout_s: float | None = None) -> bool:
        """Score what is ready and run the candidate on the waiting frame; False: idle."""
        with self._lock:
            if self._slot is None and not self._ready and self._running:
                self._lock.wait(timeout_s)
            ready = list(self._ready)
            self._ready.clear()
            taken, self._slot = self._slot, None
        for frame in ready:
            self._guarded('scoring against the cloud', self._score_cloud, frame)
        if taken is not None:
            self._guarded('running the candidate', self._run, *taken)
        return bool(ready) or taken is not None

    def snapshot(self) -> dict[str, float]:
        """Return the counters, the share of wall time used and each condition's summary."""
        with self._lock:
            elapsed = self._timer() - self._started_at
            values: dict[str, float] = {
                **self.counters,
                'cpu_share_used': round(self._busy_s / elapsed, 4) if elapsed > 0 else 0.0}
            for period, summary in self.summaries.items():
                for name, value in summary.as_dict().items():
                    values[f'{period}_{name}'] = value
        return values

    # The thread's steps -------------------------------------------------------------------

    def _within_budget(self) -> bool:
        """Refill the budget for the time passed; return whether any is left (under the lock)."""
        if self.settings.cpu_share >= 1.0:
            return True
        now = self._timer()
        self._budget_s = min(self.settings.cpu_share * self.settings.burst_s,
                             self._budget_s + self.settings.cpu_share * (now - self._budget_at))
        self._budget_at = now
        return self._budget_s > 0

    def _run(self, key: Hashable, frame: _Frame) -> None:
        """Run the candidate on one frame and score it against the deployed result."""
        with self._lock:
            if not self._within_budget():  # an inference since the offer spent it
                self.counters['skipped_budget'] += 1
                self._pending.pop(key, None)
                return
        assert frame.rgb is not None
        rgb, frame.rgb = frame.rgb, None
        try:
            period = image_period(rgb)
        except ValueError as error:
            with self._lock:
                self.counters['errors'] += 1
                self._pending.pop(key, None)
            self._throttled_error(f'shadow mode: {error}')
            return
        began = self._timer()
        try:
            result = self.candidate.detect(rgb)
        except Exception as error:  # noqa: B902 (a failing candidate must not stop shadow mode)
            with self._lock:
                self.counters['candidate_errors'] += 1
                self._pending.pop(key, None)
            self._throttled_error(f'shadow candidate failed: {error!r}')
            return
        finally:
            spent = self._timer() - began
            with self._lock:
                self._budget_s -= spent
                self._busy_s += spent
        if self._label_map is not None:
            result = result.relabeled(self._label_map)
        agreement = self._agreement(result, frame.deployed)
        with self._lock:
            self.counters['ran'] += 1
            summary = self.summaries[period]
            summary.frames += 1
            summary.agreement_deployed_sum += agreement
            summary.inference_s_sum += spent
            frame.period, frame.candidate = period, result
            if frame.settled and self._pending.get(key) is frame:
                del self._pending[key]
            else:
                return
        self._score_cloud(frame)

    def _score_cloud(self, frame: _Frame) -> None:
        """Add a frame whose candidate and cloud results are both in to its condition."""
        assert frame.candidate is not None
        agreement = (self._agreement(frame.candidate, frame.cloud)
                     if frame.cloud is not None else None)
        with self._lock:
            summary = self.summaries[frame.period]
            if agreement is None:
                summary.cloud_missing += 1
            else:
                summary.cloud_frames += 1
                summary.agreement_cloud_sum += agreement

    def _agreement(self, candidate: Detections, other: Detections) -> float:
        minimum = self.settings.min_score
        return match(candidate.above(minimum), other.above(minimum), self.settings.iou).agreement

    def _guarded(self, what: str, step: Callable[..., None], *args: Any) -> None:
        """Run one step; an exception is logged (throttled) and counted, the thread goes on."""
        try:
            step(*args)
        except Exception as error:  # noqa: B902 (one bad frame must not end shadow mode)
            with self._lock:
                self.counters['errors'] += 1
            self._throttled_error(f'shadow mode: {what} failed: {error!r}')

    def _supervised(self) -> None:
        """Run frames until stopped; should the thread die anyway, say why."""
        try:
            while self._running:
                self.run_once(timeout_s=0.5)
        except BaseException as error:  # noqa: B902 (whatever killed it is reported)
            self.fatal = f'shadow thread died: {error!r}'
            if self._log is not None:
                self._log.error(f'{self.fatal}\n{traceback.format_exc()}')
