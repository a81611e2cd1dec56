"""COCO-style box mAP of detections against ground truth, computed by pycocotools."""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from speculative_av.core.detections import Detections

# COCOeval.stats index of each reported number (maxDets 100 for the APs).
_STATS = {'mAP': 0, 'mAP50': 1, 'mAP75': 2, 'mAP_small': 3, 'mAP_medium': 4, 'mAP_large': 5,
          'AR100': 8}
_BACKGROUND = '__background__'


def coco_map(predictions: Sequence[Detections], ground_truth: Sequence[Detections],
             categories: Sequence[str], image_size: tuple[int, int]) -> dict[str, float]:
    """
    Return COCO box metrics of ``predictions`` against ``ground_truth``, image by image.

    ``categories`` names the label ids (index = id; '__background__' is not scored) and
    ``image_size`` is ``(width, height)`` of every image. Keys: ``mAP`` (IoU 0.5:0.95),
    ``mAP50``, ``mAP75``, ``mAP_small``, ``mAP_medium``, ``mAP_large`` (COCO's area ranges:
    below 32², up to 96², above) and ``AR100``; a range without ground-truth objects is nan.
    """
    evaluation = coco_evaluation(predictions, ground_truth, categories, image_size)
    return {name: _nan_if_absent(float(evaluation.stats[index])) for name, index in _STATS.items()}


def coco_evaluation(predictions: Sequence[Detections], ground_truth: Sequence[Detections],
                    categories: Sequence[str], image_size: tuple[int, int],
                    ignored: Sequence[npt.NDArray[np.bool_]] | None = None) -> COCOeval:
    """
    Return the evaluated, accumulated and summarized pycocotools evaluation (see coco_map).

    ``ignored`` marks, per image, ground-truth boxes that are neither to be found nor
    counted against a detector: a detection matching one is dropped (COCO's crowd regions),
    so a metric can be restricted to one condition's objects.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f'{len(predictions)} predictions for {len(ground_truth)} images')
    if ignored is not None and [len(i) for i in ignored] != [len(t) for t in ground_truth]:
        raise ValueError('ignored needs one flag per ground-truth box of every image')
    width, height = image_size
    images = [{'id': i, 'width': width, 'height': height} for i in range(len(ground_truth))]
    known = {i for i, name in enumerate(categories) if name != _BACKGROUND}
    scored = [{'id': i, 'name': categories[i]} for i in sorted(known)]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = _dataset(images, scored,
                         _annotations(ground_truth, known, with_scores=False, ignored=ignored))
        found = _dataset(images, scored, _annotations(predictions, known, with_scores=True))
        evaluation = COCOeval(truth, found, iouType='bbox')
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def _annotations(per_image: Sequence[Detections], known: set[int], with_scores: bool,
                 ignored: Sequence[npt.NDArray[np.bool_]] | None = None
                 ) -> list[dict[str, Any]]:
    """Return COCO annotations (``x, y, w, h`` boxes) of labels in ``known``."""
    annotations: list[dict[str, Any]] = []
    for image_id, detections in enumerate(per_image):
        xywh = detections.boxes.astype(np.float64)
        xywh[:, 2:] -= xywh[:, :2]
        crowd = ignored[image_id].tolist() if ignored is not None else [False] * len(xywh)
        for box, score, label, is_crowd in zip(xywh.tolist(), detections.scores.tolist(),
                                               detections.labels.tolist(), crowd):
            if label not in known:
                continue
            annotation = {'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': label, 'bbox': box, 'area': box[2] * box[3],
                          'iscrowd': int(is_crowd)}
            if with_scores:
                annotation['score'] = score
            annotations.append(annotation)
    return annotations


def _dataset(images: list[dict[str, Any]], categories: list[dict[str, Any]],
             annotations: list[dict[str, Any]]) -> COCO:
    """Build an indexed COCO object in memory (COCO.loadRes rejects an empty result list)."""
    dataset = COCO()
    dataset.dataset = {'images': images, 'categories': categories, 'annotations': annotations}
    dataset.createIndex()
    return dataset


def _nan_if_absent(value: float) -> float:
    """Map pycocotools' -1 (no ground truth in that range) to nan."""
    return math.nan if value < 0 else value
