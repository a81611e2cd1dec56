"""When a frame's result is due."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
import math


class DeadlineReference(str, Enum):
    """What a frame's deadline counts from."""

    STAMP = 'stamp'  # the image header stamp: when the camera captured it
    ARRIVAL = 'arrival'  # when the frame reached this node


@dataclass(frozen=True)
class DeadlinePolicy:
    """Deadline = reference time + ``budget_ns``, all on the node's clock (nanoseconds)."""

    budget_ns: int
    reference: DeadlineReference = DeadlineReference.STAMP

    def __post_init__(self) -> None:
        """Reject budgets that would make every frame late before it starts."""
        if self.budget_ns <= 0:
            raise ValueError(f'deadline budget must be positive, got {self.budget_ns} ns')

    @classmethod
    def from_ms(cls, deadline_ms: float, reference: str = 'stamp') -> DeadlinePolicy:
        """Build a policy from the node's parameters (``deadline_ms``, ``deadline_reference``)."""
        if not math.isfinite(deadline_ms):
            raise ValueError(f'deadline must be a finite number of ms, got {deadline_ms}')
        try:
            ref = DeadlineReference(reference)
        except ValueError:
            raise ValueError(
                f"deadline_reference must be 'stamp' or 'arrival', got {reference!r}") from None
        return cls(round(deadline_ms * 1e6), ref)

    def deadline_ns(self, stamp_ns: int, arrival_ns: int) -> int:
        """Return the frame's deadline."""
        base = stamp_ns if self.reference is DeadlineReference.STAMP else arrival_ns
        return base + self.budget_ns
