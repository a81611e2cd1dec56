"""
Which frames are worth keeping for training: the trigger rules, and a rate limit.

Speculative execution has a teacher on every frame: the cloud's detector answers too. A frame
where the vehicle's model and the cloud disagree, where the vehicle's model is unsure, where a
class of interest shows, or where the cloud missed its deadline is a candidate training example.
Pure logic (no ROS, no gRPC): the caller passes the results, the frame's account and the time.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Sequence

import numpy as np
from speculative_av.core.arbiter import FrameRecord
from speculative_av.core.detections import Detections
from speculative_av.core.matching import match

CLOUD_ONLY_OBJECT = 'cloud_only_object'  # the cloud found an object the vehicle did not
LOCAL_ONLY_OBJECT = 'local_only_object'  # the vehicle found an object the cloud did not
LOW_CONFIDENCE = 'low_confidence'  # the vehicle saw something it was unsure of
CLASS_OF_INTEREST = 'class_of_interest'  # either detector found a class asked for
CLOUD_DEADLINE_MISS = 'cloud_deadline_miss'  # the cloud was asked and had nothing in time
REASONS = (CLOUD_ONLY_OBJECT, LOCAL_ONLY_OBJECT, LOW_CONFIDENCE, CLASS_OF_INTEREST,
           CLOUD_DEADLINE_MISS)


@dataclass(frozen=True)
class TriggerSettings:
    """
    What makes a frame worth keeping, and how many may be kept per minute.

    A detection counts when it scores at least ``min_score``. ``disagreement``: an object of
    ``disagreement_classes`` (empty = every class) that one detector found and the other did
    not at ``iou``. ``low_confidence`` (0 = off): a local detection scoring in
    [low_confidence, min_score). ``classes_of_interest``: a counted detection of these classes
    by either detector. ``deadline_miss``: the cloud was asked and nothing arrived in time.
    ``max_per_minute`` with ``burst``: a token bucket over every triggered frame.
    """

    disagreement: bool = True
    disagreement_classes: tuple[str, ...] = ()
    iou: float = 0.5
    min_score: float = 0.5
    low_confidence: float = 0.0
    classes_of_interest: tuple[str, ...] = ()
    deadline_miss: bool = False
    max_per_minute: float = 6.0
    burst: int = 3

    def __post_init__(self) -> None:
        """Refuse settings that could never be meant (they would silently never trigger)."""
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f'iou must be in (0, 1], got {self.iou}')
        if not 0.0 < self.min_score <= 1.0:
            raise ValueError(f'min_score must be in (0, 1], got {self.min_score}')
        if not (self.low_confidence == 0.0 or 0.0 < self.low_confidence < self.min_score):
            raise ValueError(f'low_confidence must be 0 (off) or in (0, min_score='
                             f'{self.min_score}), got {self.low_confidence}')
        if not (math.isfinite(self.max_per_minute) and self.max_per_minute > 0):
            raise ValueError(f'max_per_minute must be > 0, got {self.max_per_minute}')
        if self.burst < 1:
            raise ValueError(f'burst must be at least 1, got {self.burst}')
        for name in ('disagreement_classes', 'classes_of_interest'):
            classes = getattr(self, name)
            if any(not c for c in classes) or len(set(classes)) != len(classes):
                raise ValueError(f'{name} must be distinct, non-empty class names, got {classes}')

    @property
    def any_rule(self) -> bool:
        """Return whether any rule is on (otherwise nothing can ever trigger)."""
        return (self.disagreement or self.low_confidence > 0 or bool(self.classes_of_interest)
                or self.deadline_miss)

    def check_classes(self, categories: Sequence[str]) -> None:
        """Raise ValueError naming any class the detector does not know (a typo never fires)."""
        unknown = sorted(set(self.disagreement_classes + self.classes_of_interest)
                         - set(categories))
        if unknown:
            raise ValueError(f'unknown class names {unknown}; the detector knows '
                             f'{[c for c in categories if c and c != "N/A"]}')


class TriggerRules:
    """The settings compiled against a detector's label map, evaluated per settled frame."""

    def __init__(self, settings: TriggerSettings, categories: Sequence[str]) -> None:
        """Check the class names against ``categories`` (the local detector's label map)."""
        settings.check_classes(categories)
        self.settings = settings
        self._disagreement_ids = _ids(settings.disagreement_classes, categories)
        self._interest_ids = _ids(settings.classes_of_interest, categories)

    def reasons(self, local: Detections, cloud: Detections | None,
                cloud_missed_deadline: bool) -> list[str]:
        """
        Return why this frame should be kept (empty: it should not), in :data:`REASONS` order.

        ``cloud`` is the cloud's result (None: none arrived, even late); disagreement needs it.
        """
        s = self.settings
        reasons = []
        counted_local = local.above(s.min_score)
        counted_cloud = cloud.above(s.min_score) if cloud is not None else None
        if s.disagreement and counted_cloud is not None:
            matching = match(counted_local, counted_cloud, s.iou)
            if _any_of(counted_cloud.labels[matching.only_b], self._disagreement_ids):
                reasons.append(CLOUD_ONLY_OBJECT)
            if _any_of(counted_local.labels[matching.only_a], self._disagreement_ids):
                reasons.append(LOCAL_ONLY_OBJECT)
        if s.low_confidence > 0 and bool(np.any(
                (local.scores >= s.low_confidence) & (local.scores < s.min_score))):
            reasons.append(LOW_CONFIDENCE)
        if self._interest_ids is not None and (
                _any_of(counted_local.labels, self._interest_ids)
                or (counted_cloud is not None
                    and _any_of(counted_cloud.labels, self._interest_ids))):
            reasons.append(CLASS_OF_INTEREST)
        if s.deadline_miss and cloud_missed_deadline:
            reasons.append(CLOUD_DEADLINE_MISS)
        return reasons


def _ids(classes: tuple[str, ...], categories: Sequence[str]) -> np.ndarray | None:
    """Return the label ids of ``classes`` (None: no class given, i.e. every class)."""
    if not classes:
        return None
    return np.array([i for i, name in enumerate(categories) if name in classes], np.int64)


def _any_of(labels: np.ndarray, wanted: np.ndarray | None) -> bool:
    """Return whether any of ``labels`` is ``wanted`` (None: any label at all)."""
    if wanted is None:
        return len(labels) > 0
    return bool(np.isin(labels, wanted).any())


def cloud_missed_deadline(record: FrameRecord, cloud_sources: Sequence[str]) -> bool:
    """Return whether the cloud was asked for this frame and no endpoint answered in time."""
    tried = [name for name in cloud_sources if name in record.attempts]
    return bool(tried) and all(record.missed_deadline(name) for name in tried)


class RateLimiter:
    """A token bucket on an injected clock: ``burst`` at once, ``per_minute`` sustained."""

    def __init__(self, per_minute: float, burst: int, now_s: float) -> None:
        """Start full at time ``now_s`` (seconds on the caller's monotonic clock)."""
        self._rate_per_s = per_minute / 60.0
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._last_s = now_s

    def take(self, now_s: float) -> bool:
        """Take one token if there is one at ``now_s``; return whether it was taken."""
        elapsed = max(0.0, now_s - self._last_s)  # a clock stepping back refills nothing
        self._last_s = max(self._last_s, now_s)
        self._tokens = min(self._capacity, self._tokens + elapsed * self._rate_per_s)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
