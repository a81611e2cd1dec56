"""
Build the node's output messages from core types.

Class ids: ``ObjectHypothesis.class_id`` is the decimal label id of the local detector's label
map (e.g. ``'3'``); ``vision_msgs/LabelInfo`` on ``label_info`` maps ids to names.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import cv2
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
import numpy as np
import numpy.typing as npt
from speculative_av.core.arbiter import FrameRecord
from speculative_av.core.detections import Detections
from speculative_av.core.stats import SourceStats
from speculative_av.fleet.model_updater import UpdateTimes
from std_msgs.msg import Header
from vision_msgs.msg import (Detection2D, Detection2DArray, LabelInfo, ObjectHypothesisWithPose,
                             VisionClass)

LOCAL_SOURCE = 'local'


def detections_msg(detections: Detections, header: Header) -> Detection2DArray:
    """Return ``detections`` as a Detection2DArray with the image's header on every level."""
    out = Detection2DArray(header=header)
    for (x1, y1, x2, y2), score, label in zip(
            detections.boxes.tolist(), detections.scores.tolist(), detections.labels.tolist()):
        detection = Detection2D(header=header)
        detection.bbox.center.position.x = (x1 + x2) / 2
        detection.bbox.center.position.y = (y1 + y2) / 2
        detection.bbox.size_x = x2 - x1
        detection.bbox.size_y = y2 - y1
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = str(label)
        hypothesis.hypothesis.score = score
        detection.results.append(hypothesis)
        out.detections.append(detection)
    return out


def detections_from_msg(msg: Detection2DArray) -> Detections:
    """
    Return the boxes of a Detection2DArray (rclpy's or a rosbags-deserialized one).

    Each detection's best hypothesis gives its label (class ids are decimal label ids) and score.
    """
    boxes, scores, labels = [], [], []
    for detection in msg.detections:
        cx, cy = detection.bbox.center.position.x, detection.bbox.center.position.y
        half_w, half_h = detection.bbox.size_x / 2, detection.bbox.size_y / 2
        best = max(detection.results, key=lambda r: r.hypothesis.score, default=None)
        boxes.append([cx - half_w, cy - half_h, cx + half_w, cy + half_h])
        scores.append(best.hypothesis.score if best else 1.0)
        labels.append(int(best.hypothesis.class_id) if best else 0)
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores),
                      np.array(labels))


def label_info_msg(categories: Sequence[str], threshold: float, header: Header) -> LabelInfo:
    """Return the label map of the detectors (background and unnamed ids left out)."""
    msg = LabelInfo(header=header, threshold=float(threshold))
    msg.class_map = [VisionClass(class_id=i, class_name=name) for i, name in enumerate(categories)
                     if name and name not in ('N/A', '__background__')]
    return msg


def _ms(value: float | None) -> str:
    return '' if value is None else f'{value:.3f}'


def _seconds(ns: int) -> str:
    """Return ``ns`` as exact decimal seconds (a float would be some 100 ns off)."""
    sec, nanosec = divmod(ns, 1_000_000_000)
    return f'{sec}.{nanosec:09d}' if sec >= 0 else f'-{_seconds(-ns)}'


def decision_status(record: FrameRecord, frame_id: str, deadline_budget_ms: float,
                    cloud_sources: Sequence[str], local_model: str = '') -> DiagnosticStatus:
    """
    Return one frame's arbitration outcome: who won, who arrived when, whether it was late.

    ``local_model`` names the local model that answered the frame (``name:version``).
    """
    decision = record.decision
    winner = decision.winner
    kind = 'none' if winner is None else ('local' if winner == LOCAL_SOURCE else 'cloud')
    cloud_latencies = [lat for s in cloud_sources if (lat := record.latency_ms(s)) is not None]
    values = {
        'stamp': _seconds(decision.stamp_ns),
        'winner': kind,
        'winner_source': winner or '',
        'local_latency_ms': _ms(record.latency_ms(LOCAL_SOURCE)),
        'cloud_latency_ms': _ms(min(cloud_latencies) if cloud_latencies else None),
        'deadline_ms': f'{deadline_budget_ms:g}',
        'late': str(decision.late).lower(),
        'published_after_deadline_ms': _ms((decision.released_ns - decision.deadline_ns) / 1e6),
        'winner_ready_after_deadline_ms': _ms(
            None if winner is None or (ready := record.attempts[winner].finished_ns) is None
            else (ready - decision.deadline_ns) / 1e6),
        'detections': str(len(decision.detections)),
        'local_model': local_model,
    }
    for name, attempt in record.attempts.items():
        values[f'source.{name}'] = attempt.state.value + (f': {attempt.error}'
                                                          if attempt.error else '')
    level = DiagnosticStatus.WARN if decision.late or winner is None else DiagnosticStatus.OK
    return DiagnosticStatus(
        level=level, name='speculative_detector: frame', hardware_id=frame_id,
        message=f'winner {winner or "none"}' + (' (late)' if decision.late else ''),
        values=[KeyValue(key=k, value=v) for k, v in values.items()])


def source_status(node_name: str, source: str, stats: SourceStats, health: str,
                  health_changes: int = 0) -> DiagnosticStatus:
    """Return the 1 Hz health and latency summary of one source."""
    p50, p95 = stats.percentile_ms(50), stats.percentile_ms(95)
    values = {
        'latency_p50_ms': _ms(p50), 'latency_p95_ms': _ms(p95), 'tried': str(stats.tried),
        'arrived': str(stats.arrived), 'wins': str(stats.wins),
        'deadline_misses': str(stats.deadline_misses), 'failed': str(stats.failed),
        'cancelled': str(stats.cancelled), 'health': health,
        'health_changes': str(health_changes),
    }
    level = {'SERVING': DiagnosticStatus.OK, 'UNKNOWN': DiagnosticStatus.WARN}.get(
        health, DiagnosticStatus.ERROR)
    message = health if p50 is None or math.isnan(p50) else f'{health}, p50 {p50:.1f} ms'
    return DiagnosticStatus(level=level, name=f'{node_name}: {source}', hardware_id=source,
                            message=message,
                            values=[KeyValue(key=k, value=v) for k, v in values.items()])


def summary_status(node_name: str, counters: Mapping[str, int | float],
                   fatal: str = '') -> DiagnosticStatus:
    """Return the node-level counters; ERROR with ``fatal`` once a thread of the node died."""
    bad = any(counters.get(k, 0) for k in ('invalid_images', 'late', 'frame_errors'))
    level = DiagnosticStatus.ERROR if fatal else (
        DiagnosticStatus.WARN if bad else DiagnosticStatus.OK)
    return DiagnosticStatus(
        level=level, name=f'{node_name}: speculation', hardware_id=node_name,
        message=(f'{fatal}; ' if fatal else '')
        + ', '.join(f'{k} {v}' for k, v in counters.items()),
        values=[KeyValue(key=k, value=str(v)) for k, v in counters.items()])


def model_update_status(node_name: str, model: str, updates: Mapping[str, int],
                        times: UpdateTimes, last_error: str,
                        engine_counters: Mapping[str, int]) -> DiagnosticStatus:
    """Return the local model in use and how over-the-air updates went (WARN after a failure)."""
    values = {'model': model, **{f'updates_{k}': str(v) for k, v in updates.items()},
              'swaps': str(engine_counters['swaps']),
              'rollbacks': str(engine_counters['rollbacks']),
              'last_verify_ms': f'{times.verify_ms:.1f}', 'last_load_ms': f'{times.load_ms:.1f}',
              'last_warm_up_ms': f'{times.warm_up_ms:.1f}', 'last_error': last_error}
    level = DiagnosticStatus.WARN if last_error else DiagnosticStatus.OK
    return DiagnosticStatus(level=level, name=f'{node_name}: local model', hardware_id=node_name,
                            message=model + (f'; last update refused: {last_error}'
                                             if last_error else ''),
                            values=[KeyValue(key=k, value=v) for k, v in values.items()])


_SOURCE_COLORS = {'local': (255, 170, 0), 'cloud': (0, 200, 255)}


def draw_debug_image(rgb: npt.NDArray[np.uint8], detections: Detections,
                     categories: Sequence[str], winner: str | None,
                     late: bool) -> npt.NDArray[np.uint8]:
    """Return a copy of ``rgb`` with the fused boxes, labels and the winning source drawn."""
    canvas = np.ascontiguousarray(rgb).copy()
    kind = 'local' if winner == LOCAL_SOURCE else 'cloud'
    color = _SOURCE_COLORS[kind] if winner else (255, 0, 0)
    for (x1, y1, x2, y2), score, label in zip(
            detections.boxes.astype(int).tolist(), detections.scores.tolist(),
            detections.labels.tolist()):
        name = categories[label] if 0 <= label < len(categories) else str(label)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 2)
        cv2.putText(canvas, f'{name} {score:.2f}', (x1, max(12, y1 - 4)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    banner = f'{winner or "none"}{" LATE" if late else ""}: {len(detections)} objects'
    cv2.putText(canvas, banner, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.65, color, 2, cv2.LINE_AA)
    return canvas


def shadow_status(node_name: str, candidate: str, values: Mapping[str, int | float],
                  fatal: str = '') -> DiagnosticStatus:
    """Return shadow mode's counters and per-period agreement; ERROR once its thread died."""
    failures = values.get('candidate_errors', 0) or values.get('errors', 0)
    level = DiagnosticStatus.ERROR if fatal else (
        DiagnosticStatus.WARN if failures else DiagnosticStatus.OK)
    summary = ', '.join(
        f"{period} {values.get(f'{period}_frames', 0)} frames agree "
        f"{values.get(f'{period}_agreement_deployed', 0.0)}/"
        f"{values.get(f'{period}_agreement_cloud', 0.0)}" for period in ('day', 'dusk', 'night'))
    return DiagnosticStatus(
        level=level, name=f'{node_name}: shadow', hardware_id=candidate,
        message=(f'{fatal}; ' if fatal else '') + f'{candidate}: {summary} (deployed/cloud)',
        values=[KeyValue(key='candidate', value=candidate)]
        + [KeyValue(key=k, value=str(v)) for k, v in values.items()])
