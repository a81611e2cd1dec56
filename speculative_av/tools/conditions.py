"""
Test sets per condition: mAP by time of day, object size, occlusion and class, and a gate.

A candidate model replaces the deployed one only if :func:`gate` accepts it: its total mAP on
held-out drives improves and no condition (night, small objects, occluded pedestrians'
class, ...) loses more than a stated tolerance. Conditions with too few ground-truth boxes
for a stable number are reported but not gated. Conditions:

- ``period:day|dusk|night``: the frames of that time of day;
- ``size:small|medium|large``: COCO's area ranges (pycocotools' own ``areaRng``);
- ``occlusion:visible|occluded``: boxes whose object shows at least / less than
  :data:`OCCLUDED_BELOW` of its pixels; the other boxes become ignore regions;
- ``class:<name>``: one category's AP.

Held-out drives are ``render_drive`` seeds from :data:`HELDOUT_DRIVE_SEED_BASE` on, a range
no training run (``generate_scene(data_seed * 10_000_000 + k)``), held-out scene list
(``train.heldout_seeds``) or shipped recording uses, chosen so every period is covered.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
from pycocotools.cocoeval import COCOeval
from speculative_av.core.detections import Detections
from speculative_av.scenes import render_drive, world
from speculative_av.tools.coco_metrics import coco_evaluation

HELDOUT_DRIVE_SEED_BASE = 1_500_000_000
OCCLUDED_BELOW = 0.9  # visible fraction under which an object counts as occluded
# Measured (README, "Test sets per condition and the gate"): between samples of 24 drives of
# 15 frames, the mAP gap between two models varies by at most 1.3 points (sd) on conditions
# of 300+ boxes, by 6 on large objects (~215 boxes); a smaller loss is no evidence.
DEFAULT_TOLERANCE = 0.02
DEFAULT_MIN_BOXES = 300
TOTAL = 'total'
SIZES = {'small': (0.0, 32.0 ** 2), 'medium': (32.0 ** 2, 96.0 ** 2), 'large': (96.0 ** 2, 1e10)}
_SIZE_STAT = {'small': 3, 'medium': 4, 'large': 5}  # COCOeval.stats index
_BACKGROUND = '__background__'

Detect = Callable[[npt.NDArray[np.uint8]], Detections]


@dataclass(frozen=True)
class FrameTruth:
    """What a held-out frame shows: its boxes, each box's visible fraction, its time of day."""

    truth: Detections
    visible: npt.NDArray[np.float32]
    period: str

    def __post_init__(self) -> None:
        """Refuse a visible fraction per box that does not fit the boxes."""
        if self.visible.shape != (len(self.truth),):
            raise ValueError(f'{len(self.truth)} boxes but visible has shape '
                             f'{self.visible.shape}')
        if self.period not in world.PERIODS:
            raise ValueError(f'period must be one of {world.PERIODS}, got {self.period!r}')


@dataclass(frozen=True)
class ConditionScore:
    """One condition's mAP (IoU 0.5:0.95) and how many ground-truth boxes it rests on."""

    boxes: int
    mAP: float  # nan when the condition has no boxes


@dataclass(frozen=True)
class HeldoutDrives:
    """Which held-out drives to evaluate on and how they are sampled."""

    seeds: tuple[int, ...]
    frames: int = 15  # per drive
    fps: float = 2.0  # frames 0.5 s apart: less alike than consecutive 10 Hz frames
    width: int = 640
    height: int = 480


def heldout_drive_seeds(per_period: int,
                        base: int = HELDOUT_DRIVE_SEED_BASE) -> tuple[int, ...]:
    """Return ``per_period`` drive seeds of each time of day, the first ones from ``base``."""
    if per_period < 1:
        raise ValueError(f'per_period must be at least 1, got {per_period}')
    found: dict[str, list[int]] = {period: [] for period in world.PERIODS}
    seed = base
    while any(len(seeds) < per_period for seeds in found.values()):
        period = drive_period(seed)
        if len(found[period]) < per_period:
            found[period].append(seed)
        seed += 1
    return tuple(sorted(s for seeds in found.values() for s in seeds))


def drive_period(seed: int) -> str:
    """Return the time of day of drive ``seed`` (sampled first, so no frame is rendered)."""
    return world.random_world(np.random.default_rng(seed), 64, 48).lighting.period


def run_detectors(detectors: Mapping[str, Detect], drives: HeldoutDrives,
                  progress: Callable[[int], None] | None = None
                  ) -> tuple[list[FrameTruth], dict[str, list[Detections]], dict[str, float]]:
    """
    Render every held-out frame once and run each detector on it.

    Returns the frames' truths, each detector's predictions frame by frame and its mean
    seconds per frame. ``progress`` is called with the number of frames done so far.
    """
    truths: list[FrameTruth] = []
    predictions: dict[str, list[Detections]] = {name: [] for name in detectors}
    seconds = dict.fromkeys(detectors, 0.0)
    for seed in drives.seeds:
        for scene in render_drive(seed, drives.frames, drives.width, drives.height, drives.fps):
            truths.append(FrameTruth(scene.ground_truth(), scene.visible, scene.period))
            for name, detect in detectors.items():
                started = time.perf_counter()
                predictions[name].append(detect(scene.image))
                seconds[name] += time.perf_counter() - started
            if progress is not None:
                progress(len(truths))
    return truths, predictions, {name: s / max(1, len(truths)) for name, s in seconds.items()}


def condition_map(predictions: Sequence[Detections], truths: Sequence[FrameTruth],
                  categories: Sequence[str],
                  image_size: tuple[int, int]) -> dict[str, ConditionScore]:
    """Return the score of every condition (and ``total``) of ``predictions`` on ``truths``."""
    if len(predictions) != len(truths):
        raise ValueError(f'{len(predictions)} predictions for {len(truths)} frames')
    gt = [t.truth for t in truths]
    scores: dict[str, ConditionScore] = {}
    everything = coco_evaluation(predictions, gt, categories, image_size)
    scored = [i for i, name in enumerate(categories) if name != _BACKGROUND]
    labels = np.concatenate([d.labels for d in gt]) if gt else np.zeros(0, np.int64)
    boxes = np.concatenate([d.boxes for d in gt]) if gt else np.zeros((0, 4), np.float32)
    in_scored = np.isin(labels, scored)
    scores[TOTAL] = ConditionScore(int(in_scored.sum()), _stat(everything.stats[0]))
    for period in world.PERIODS:
        chosen = [i for i, t in enumerate(truths) if t.period == period]
        count = int(sum(np.isin(truths[i].truth.labels, scored).sum() for i in chosen))
        value = (_stat(coco_evaluation([predictions[i] for i in chosen], [gt[i] for i in chosen],
                                       categories, image_size).stats[0])
                 if chosen else math.nan)
        scores[f'period:{period}'] = ConditionScore(count, value if count else math.nan)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for size, (low, high) in SIZES.items():
        count = int(((areas >= low) & (areas <= high) & in_scored).sum())  # COCO's closed ranges
        scores[f'size:{size}'] = ConditionScore(count, _stat(everything.stats[_SIZE_STAT[size]]))
    for name, keep in (('visible', lambda v: v >= OCCLUDED_BELOW),
                       ('occluded', lambda v: v < OCCLUDED_BELOW)):
        kept = [keep(t.visible) for t in truths]
        count = int(sum((k & np.isin(t.truth.labels, scored)).sum()
                        for k, t in zip(kept, truths)))
        value = _stat(coco_evaluation(predictions, gt, categories, image_size,
                                      ignored=[~k for k in kept]).stats[0]) if count else math.nan
        scores[f'occlusion:{name}'] = ConditionScore(count, value)
    for position, label in enumerate(everything.params.catIds):
        count = int((labels == label).sum())
        scores[f'class:{categories[label]}'] = ConditionScore(
            count, _class_ap(everything, position) if count else math.nan)
    return scores


@dataclass(frozen=True)
class ConditionVerdict:
    """One condition of the gate: before, after, change and what the gate made of it."""

    name: str
    boxes: int
    before: float
    after: float
    status: str  # 'improved', 'held', 'regressed' or 'too_few_boxes'

    @property
    def change(self) -> float:
        """Return after minus before (mAP points as a fraction; nan without boxes)."""
        return self.after - self.before


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision with the reasons and the per-condition rows it rests on."""

    accepted: bool
    reasons: tuple[str, ...]
    total: ConditionVerdict
    conditions: tuple[ConditionVerdict, ...]
    tolerance: float
    min_boxes: int

    def as_dict(self) -> dict:
        """Return plain data, strict-JSON ready (an undefined mAP is None)."""
        return {'accepted': self.accepted, 'reasons': list(self.reasons),
                'tolerance': self.tolerance, 'min_boxes': self.min_boxes,
                'rows': [{'condition': r.name, 'boxes': r.boxes, 'before': _defined(r.before),
                          'after': _defined(r.after), 'change': _defined(r.change),
                          'status': r.status}
                         for r in (self.total, *self.conditions)]}


def gate(before: Mapping[str, ConditionScore], after: Mapping[str, ConditionScore],
         tolerance: float = DEFAULT_TOLERANCE, min_boxes: int = DEFAULT_MIN_BOXES
         ) -> GateVerdict:
    """
    Accept ``after`` over ``before`` only if the total improves and no condition regresses.

    A condition regresses when it loses more than ``tolerance`` (absolute mAP, 0.01 = one
    point); one with fewer than ``min_boxes`` ground-truth boxes is reported, not gated. Both
    must come from the same frames (same conditions, same box counts), else ValueError.
    """
    if not (0.0 <= tolerance < 1.0):
        raise ValueError(f'tolerance must be in [0, 1), got {tolerance}')
    if min_boxes < 1:
        raise ValueError(f'min_boxes must be at least 1, got {min_boxes}')
    if TOTAL not in before or set(before) != set(after):
        raise ValueError('before and after must score the same conditions, total included')
    rows = []
    for name in before:
        old, new = before[name], after[name]
        if old.boxes != new.boxes:
            raise ValueError(f'{name}: {old.boxes} boxes before but {new.boxes} after: not '
                             'the same held-out frames')
        if old.boxes >= min_boxes and (math.isnan(old.mAP) or math.isnan(new.mAP)):
            raise ValueError(f'{name}: mAP is nan although it has {old.boxes} boxes')
        if old.boxes < min_boxes:
            status = 'too_few_boxes'
        elif new.mAP < old.mAP - tolerance:
            status = 'regressed'
        else:
            status = 'improved' if new.mAP > old.mAP else 'held'
        rows.append(ConditionVerdict(name, old.boxes, old.mAP, new.mAP, status))
    total = next(r for r in rows if r.name == TOTAL)
    conditions = tuple(r for r in rows if r.name != TOTAL)
    reasons = []
    if total.status == 'too_few_boxes':
        reasons.append(f'only {total.boxes} boxes in total (at least {min_boxes} needed)')
    elif not total.after > total.before:
        reasons.append(f'total mAP did not improve: {total.before:.4f} -> {total.after:.4f}')
    reasons += [f'{r.name} regressed {r.before:.4f} -> {r.after:.4f} (tolerance '
                f'{tolerance:.4f})' for r in conditions if r.status == 'regressed']
    return GateVerdict(not reasons, tuple(reasons), total, conditions, tolerance, min_boxes)


def format_table(verdict: GateVerdict, names: tuple[str, str] = ('deployed', 'candidate')
                 ) -> str:
    """Return the verdict as a fixed-width text table, one condition per line."""
    header = f'{"condition":<22} {"boxes":>6} {names[0]:>10} {names[1]:>10} {"change":>8}  status'
    lines = [header, '-' * len(header)]
    for row in (verdict.total, *verdict.conditions):
        lines.append(f'{row.name:<22} {row.boxes:>6} {row.before:>10.4f} {row.after:>10.4f} '
                     f'{row.change:>+8.4f}  {row.status}')
    decision = 'ACCEPTED' if verdict.accepted else 'REJECTED: ' + '; '.join(verdict.reasons)
    return '\n'.join(lines + [f'verdict: {decision}'])


def _class_ap(evaluation: COCOeval, position: int) -> float:
    """Return one category's AP (IoU 0.5:0.95, all areas, 100 detections) as summarize does."""
    precision = evaluation.eval['precision'][:, :, position, 0, -1]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else math.nan


def _defined(value: float) -> float | None:
    return None if math.isnan(value) else value


def _stat(value: float) -> float:
    """Map pycocotools' -1 (nothing to score) to nan."""
    return math.nan if value < 0 else float(value)
