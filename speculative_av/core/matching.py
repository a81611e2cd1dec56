"""
Matching two detectors' answers for one image, object by object.

The fleet loop compares the vehicle's model with the cloud's (triggers) and a candidate model
with both (shadow mode); both need the same notion of "the same object": same class, boxes
overlapping by at least an IoU, each object matched at most once, higher scores first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from speculative_av.core.detections import Detections


@dataclass(frozen=True)
class Matching:
    """Which objects of ``a`` and ``b`` (indices into each) were matched, and which were not."""

    pairs: list[tuple[int, int]]
    only_a: list[int]
    only_b: list[int]

    @property
    def agreement(self) -> float:
        """Return matched objects over all objects (F1 of a against b); 1.0 when both are empty."""
        total = 2 * len(self.pairs) + len(self.only_a) + len(self.only_b)
        return 1.0 if total == 0 else 2 * len(self.pairs) / total


def box_iou(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Return the (len(a), len(b)) IoU matrix of ``x1, y1, x2, y2`` boxes."""
    a64, b64 = a.astype(np.float64).reshape(-1, 1, 4), b.astype(np.float64).reshape(1, -1, 4)
    width = np.clip(np.minimum(a64[..., 2], b64[..., 2]) - np.maximum(a64[..., 0], b64[..., 0]),
                    0.0, None)
    height = np.clip(np.minimum(a64[..., 3], b64[..., 3])
                     - np.maximum(a64[..., 1], b64[..., 1]), 0.0, None)
    intersection = width * height
    area_a = (a64[..., 2] - a64[..., 0]).clip(0) * (a64[..., 3] - a64[..., 1]).clip(0)
    area_b = (b64[..., 2] - b64[..., 0]).clip(0) * (b64[..., 3] - b64[..., 1]).clip(0)
    union = area_a + area_b - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def match(a: Detections, b: Detections, iou: float = 0.5) -> Matching:
    """
    Match ``a``'s objects to ``b``'s greedily: same class, IoU >= ``iou``, best pairs first.

    Pairs are taken in order of falling IoU, so one crowded region cannot steal a better
    partner's match; filter by score (``Detections.above``) before matching.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f'iou must be in (0, 1], got {iou}')
    overlap = box_iou(a.boxes, b.boxes)
    overlap[a.labels.reshape(-1, 1) != b.labels.reshape(1, -1)] = 0.0
    candidates = np.argwhere(overlap >= iou)
    order = np.argsort(-overlap[candidates[:, 0], candidates[:, 1]], kind='stable')
    used_a, used_b, pairs = set(), set(), []
    for i, j in candidates[order].tolist():
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return Matching(sorted(pairs), [i for i in range(len(a)) if i not in used_a],
                    [j for j in range(len(b)) if j not in used_b])
