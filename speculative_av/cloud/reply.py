"""The outcome of one cloud call, whatever protocol carried it (no gRPC here)."""
from __future__ import annotations

from dataclasses import dataclass, field

from speculative_av.core.detections import Detections


@dataclass(frozen=True)
class CloudReply:
    """The outcome of one call; ``detections`` in original image coordinates and local ids."""

    endpoint: str
    ok: bool
    detections: Detections = field(default_factory=Detections.empty)
    error: str = ''
    server_inference_ms: float = 0.0
    server_queue_ms: float = 0.0
    model_name: str = ''
    model_version: str = ''
    frame_id: str = ''
    round_trip_ms: float = 0.0
