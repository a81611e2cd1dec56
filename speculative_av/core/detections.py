"""The one detections type every layer passes around."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Detections:
    """
    Objects found in one image, boxes in that image's pixel coordinates.

    ``boxes`` is (N, 4) float32 ``x1, y1, x2, y2``; ``scores`` (N,) float32; ``labels`` (N,)
    int64 class ids of the detector's label map.
    """

    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        """Normalise dtypes and shapes so consumers never need to check."""
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f'detections need one score and label per box, got {len(boxes)} boxes, '
                f'{len(scores)} scores, {len(labels)} labels')
        object.__setattr__(self, 'boxes', boxes)
        object.__setattr__(self, 'scores', scores)
        object.__setattr__(self, 'labels', labels)

    @classmethod
    def empty(cls) -> Detections:
        """Return a result with no objects."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        """Return the number of objects."""
        return len(self.scores)

    def above(self, min_score: float) -> Detections:
        """Keep the objects scoring at least ``min_score``."""
        keep = self.scores >= min_score
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])

    def relabeled(self, mapping: npt.NDArray[np.int64]) -> Detections:
        """Translate labels through ``mapping`` (old id -> new id); drop unmapped and -1 ones."""
        new = np.full(len(self.labels), -1, np.int64)
        known = (self.labels >= 0) & (self.labels < len(mapping))
        new[known] = mapping[self.labels[known]]
        keep = new >= 0
        return Detections(self.boxes[keep], self.scores[keep], new[keep])

    def scaled(self, scale_x: float, scale_y: float) -> Detections:
        """Map boxes to an image resized by ``scale_x`` horizontally and ``scale_y`` vertically."""
        factors = np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
        return Detections(self.boxes * factors, self.scores, self.labels)


def label_mapping(source: Sequence[str], target: Sequence[str]) -> npt.NDArray[np.int64]:
    """Return, per ``source`` label id, the ``target`` id of the same class name (-1 if none)."""
    index = {name: i for i, name in enumerate(target)}
    return np.array([index.get(name, -1) for name in source], np.int64)
