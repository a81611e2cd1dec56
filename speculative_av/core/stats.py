"""Running statistics of the speculation, per source, for diagnostics and summaries."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from speculative_av.core.arbiter import FrameRecord, SourceState


def percentile(window: deque[float], q: float) -> float | None:
    """Return the ``q``-th percentile of ``window``, None while it is empty."""
    return float(np.percentile(window, q)) if window else None


@dataclass
class SourceStats:
    """One source's record over the recent window (latencies) and since start (counts)."""

    latencies_ms: deque[float]
    tried: int = 0
    arrived: int = 0
    wins: int = 0
    deadline_misses: int = 0
    failed: int = 0
    cancelled: int = 0

    def percentile_ms(self, q: float) -> float | None:
        """Return the ``q``-th latency percentile of the window, None before any arrival."""
        return percentile(self.latencies_ms, q)


@dataclass
class SpeculationStats:
    """Aggregates settled frames; the node adds what happens before a race starts."""

    window: int = 300
    sources: dict[str, SourceStats] = field(default_factory=dict)
    frames: int = 0
    late: int = 0
    no_winner: int = 0
    lateness_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    # Per-frame time the node spends besides inference (conversion, encoding, arbitration,
    # message building, publishing): what speculation costs on the vehicle.
    overhead_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def source(self, name: str) -> SourceStats:
        """Return ``name``'s stats, creating them on first use."""
        if name not in self.sources:
            self.sources[name] = SourceStats(deque(maxlen=self.window))
        return self.sources[name]

    def add(self, record: FrameRecord) -> None:
        """Fold one fully resolved frame into the statistics."""
        self.frames += 1
        decision = record.decision
        self.late += decision.late
        self.no_winner += decision.winner is None
        self.lateness_ms.append(max(0, decision.released_ns - record.deadline_ns) / 1e6)
        for name, attempt in record.attempts.items():
            stats = self.source(name)
            stats.tried += 1
            stats.wins += decision.winner == name
            stats.deadline_misses += record.missed_deadline(name)
            latency = record.latency_ms(name)
            if latency is not None:
                stats.arrived += 1
                stats.latencies_ms.append(latency)
            stats.failed += attempt.state is SourceState.FAILED
            stats.cancelled += attempt.state is SourceState.CANCELLED
