"""
Per-frame arbitration between detection sources racing a deadline.

The policy of speculative cloud execution (Schafhalter et al., IROS 2023), not "first one wins":

* every source has a priority (by default the more accurate cloud above the local detector);
* a frame's fused result is final as soon as no source that could still arrive outranks the best
  result in hand, or when the deadline passes; at the deadline the best arrived result wins;
* if nothing has arrived by the deadline, the first result to arrive afterwards wins, marked
  late; if every source failed, the frame resolves with no winner (empty, so planning still gets
  exactly one message per frame);
* decisions are released in stamp order per camera, exactly once per opened frame; a stamp that
  steps back by more than a tolerance (a looping replay, a clock resync) starts that camera's
  sequence afresh instead of being dropped as stale;
* sources of equal priority (replicas, hedged calls) are interchangeable: the first of them to
  arrive is the one that counts;
* a pending source that can no longer win is reported for cancellation when it is cancellable.

Pure logic: callers pass the time (nanoseconds on one clock) into every call and serialise calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

from speculative_av.core.detections import Detections

# Older stamps within this of a camera's newest are out-of-order deliveries (dropped as
# stale); further back, the camera's clock stepped back (a looping replay, a resync).
DEFAULT_STAMP_BACKSTEP_TOLERANCE_NS = 1_000_000_000


@dataclass(frozen=True)
class Source:
    """A detection source: higher ``priority`` means more trusted when both arrive in time."""

    name: str
    priority: int
    cancellable: bool = True  # remote calls can be cancelled; local inference runs to the end


class SourceState(str, Enum):
    """What became of one source's attempt at one frame."""

    PENDING = 'pending'
    ARRIVED = 'arrived'
    FAILED = 'failed'
    CANCELLED = 'cancelled'


@dataclass
class SourceAttempt:
    """One source's attempt at one frame."""

    source: Source
    state: SourceState = SourceState.PENDING
    detections: Detections | None = None
    finished_ns: int | None = None
    error: str = ''
    cancel_requested: bool = False


@dataclass(frozen=True)
class FrameKey:
    """Identifies a frame: its camera and its position in that camera's sequence."""

    camera: str
    seq: int


@dataclass(frozen=True)
class Decision:
    """The fused result of one frame, released in stamp order."""

    key: FrameKey
    stamp_ns: int
    deadline_ns: int
    winner: str | None  # source name; None when every source failed
    detections: Detections
    decided_ns: int
    released_ns: int
    late: bool  # decided after the deadline because nothing had arrived by then


@dataclass(frozen=True)
class FrameRecord:
    """Everything known about a frame once every source has finished; for stats and logs."""

    key: FrameKey
    stamp_ns: int
    start_ns: int
    deadline_ns: int
    decision: Decision
    attempts: dict[str, SourceAttempt]

    def latency_ms(self, source: str) -> float | None:
        """Return how long ``source`` took from the frame's start, or None if it never arrived."""
        attempt = self.attempts.get(source)
        if attempt is None or attempt.state is not SourceState.ARRIVED:
            return None
        assert attempt.finished_ns is not None
        return (attempt.finished_ns - self.start_ns) / 1e6

    def cloud_answer(self, cloud_sources: Sequence[str]) -> tuple[str, Detections | None]:
        """
        Return the cloud's answer to the frame: (source, detections), or ('', None) if none came.

        The winner if a cloud source won, else the first to arrive: late answers count, since
        for triggers and shadow mode the cloud is the teacher, in time or not.
        """
        arrived = [(name, self.attempts[name]) for name in cloud_sources
                   if name in self.attempts and self.attempts[name].state is SourceState.ARRIVED]
        if not arrived:
            return '', None
        for name, attempt in arrived:
            if name == self.decision.winner:
                return name, attempt.detections
        name, attempt = min(arrived, key=lambda item: item[1].finished_ns or 0)
        return name, attempt.detections

    def missed_deadline(self, source: str) -> bool:
        """Return whether ``source`` was tried and had nothing by the deadline."""
        attempt = self.attempts[source]
        return (attempt.state is not SourceState.ARRIVED
                or attempt.finished_ns is None or attempt.finished_ns > self.deadline_ns)


@dataclass
class Outcome:
    """What a caller must do after an arbiter call."""

    decisions: list[Decision] = field(default_factory=list)  # publish these, in this order
    cancel: list[tuple[FrameKey, str]] = field(default_factory=list)  # cancel these calls
    settled: list[FrameRecord] = field(default_factory=list)  # frames now fully resolved

    def extend(self, other: Outcome) -> None:
        """Append ``other``'s actions after this one's."""
        self.decisions += other.decisions
        self.cancel += other.cancel
        self.settled += other.settled


@dataclass
class _Race:
    key: FrameKey
    stamp_ns: int
    start_ns: int
    deadline_ns: int
    attempts: dict[str, SourceAttempt]
    decided: tuple[str | None, Detections, int, bool] | None = None  # winner, dets, when, late
    released: Decision | None = None
    deadline_applied: bool = False  # tick() has evaluated this race at its deadline

    def best_arrived(self) -> SourceAttempt | None:
        """Return the highest-priority arrived attempt; among equals, the first to arrive."""
        arrived = [a for a in self.attempts.values() if a.state is SourceState.ARRIVED]
        return max(arrived, key=lambda a: (a.source.priority, -(a.finished_ns or 0)),
                   default=None)

    def pending(self) -> list[SourceAttempt]:
        return [a for a in self.attempts.values() if a.state is SourceState.PENDING]


class Arbiter:
    """Runs the race of every open frame and releases fused decisions in stamp order."""

    def __init__(self,
                 stamp_backstep_tolerance_ns: int = DEFAULT_STAMP_BACKSTEP_TOLERANCE_NS) -> None:
        """
        Start with no open frames.

        A frame whose stamp is at most ``stamp_backstep_tolerance_ns`` older than its camera's
        newest is stale (out-of-order delivery) and refused; one older than that means the
        camera's clock stepped back, and restarts the camera's ordering (counted per camera in
        :attr:`clock_resets`).
        """
        if stamp_backstep_tolerance_ns < 0:
            raise ValueError('stamp_backstep_tolerance_ns must not be negative, got '
                             f'{stamp_backstep_tolerance_ns}')
        self._tolerance_ns = stamp_backstep_tolerance_ns
        self._races: dict[FrameKey, _Race] = {}
        self._unreleased: dict[str, list[FrameKey]] = {}  # per camera, in opening order
        self._next_seq: dict[str, int] = {}
        self._last_stamp: dict[str, int] = {}
        self.clock_resets: dict[str, int] = {}

    def open(self, camera: str, stamp_ns: int, start_ns: int,  # noqa: A003 (a method)
             deadline_ns: int, sources: list[Source]) -> FrameKey | None:
        """Start a frame's race; None if its stamp is stale (see the constructor)."""
        if not sources:
            raise ValueError('a frame needs at least one source')
        last = self._last_stamp.get(camera)
        if last is not None and stamp_ns <= last:
            if last - stamp_ns <= self._tolerance_ns:
                return None
            self.clock_resets[camera] = self.clock_resets.get(camera, 0) + 1
        self._last_stamp[camera] = stamp_ns
        seq = self._next_seq.get(camera, 0)
        self._next_seq[camera] = seq + 1
        key = FrameKey(camera, seq)
        self._races[key] = _Race(key, stamp_ns, start_ns, deadline_ns,
                                 {s.name: SourceAttempt(s) for s in sources})
        self._unreleased.setdefault(camera, []).append(key)
        return key

    def arrive(self, key: FrameKey, source: str, detections: Detections,
               now_ns: int) -> Outcome:
        """Record ``source``'s result for ``key`` (a result for a settled frame is ignored)."""
        return self._finish(key, source, SourceState.ARRIVED, now_ns, detections=detections)

    def fail(self, key: FrameKey, source: str, now_ns: int, error: str) -> Outcome:
        """Record that ``source`` will not deliver a result for ``key``."""
        return self._finish(key, source, SourceState.FAILED, now_ns, error=error)

    def cancelled(self, key: FrameKey, source: str, now_ns: int) -> Outcome:
        """Record that a call the arbiter asked to cancel has ended."""
        return self._finish(key, source, SourceState.CANCELLED, now_ns, error='cancelled')

    def abandon(self, key: FrameKey, now_ns: int, error: str) -> Outcome:
        """Fail every source of ``key`` still pending, e.g. after its processing broke."""
        outcome = Outcome()
        race = self._races.get(key)
        for attempt in race.pending() if race is not None else []:
            outcome.extend(self.fail(key, attempt.source.name, now_ns, error))
        return outcome

    def tick(self, now_ns: int) -> Outcome:
        """Apply deadlines that have passed by ``now_ns``, each once."""
        outcome = Outcome()
        for race in [r for r in self._races.values()
                     if not r.deadline_applied and r.deadline_ns <= now_ns]:
            race.deadline_applied = True
            outcome.extend(self._evaluate(race, now_ns))
        return outcome

    def next_deadline_ns(self) -> int | None:
        """
        Return the earliest deadline :meth:`tick` has not applied yet, for the caller's timer.

        A frame whose deadline passed with nothing arrived is decided by the next arrival or
        failure, not by time, so it no longer counts here: a timer never spins on it.
        """
        return min((r.deadline_ns for r in self._races.values()
                    if r.decided is None and not r.deadline_applied), default=None)

    def shift_clock(self, delta_ns: int) -> None:
        """
        Move every open frame's start and deadline by ``delta_ns`` after the clock jumped.

        The callers' clock (e.g. ROS time under a looping replay) jumped by ``delta_ns``; the
        frames in flight keep their remaining budget on the new timeline, and every camera's
        ordering restarts, since the stamps that follow belong to the new timeline too.
        """
        for race in self._races.values():
            race.start_ns += delta_ns
            race.deadline_ns += delta_ns
            for attempt in race.attempts.values():
                if attempt.finished_ns is not None:
                    attempt.finished_ns += delta_ns
        self._last_stamp.clear()

    def is_pending(self, key: FrameKey, source: str) -> bool:
        """Return whether ``source`` may still deliver a result that counts for ``key``."""
        race = self._races.get(key)
        return race is not None and race.attempts[source].state is SourceState.PENDING

    def wants(self, key: FrameKey, source: str) -> bool:
        """Return whether a call for ``source`` should still run: pending, no cancel asked."""
        race = self._races.get(key)
        if race is None:
            return False
        attempt = race.attempts[source]
        return attempt.state is SourceState.PENDING and not attempt.cancel_requested

    def open_frames(self) -> int:
        """Return the number of frames not yet fully resolved."""
        return len(self._races)

    def describe_open(self, now_ns: int) -> list[str]:
        """Return one line per unresolved frame: age, deadline, decision and each source."""
        return [f'{key.camera or "image"}#{key.seq} stamp {race.stamp_ns / 1e9:.3f} s, opened '
                f'{(now_ns - race.start_ns) / 1e6:.0f} ms ago, deadline in '
                f'{(race.deadline_ns - now_ns) / 1e6:.0f} ms'
                f'{" (applied)" if race.deadline_applied else ""}, '
                f'{"decided" if race.decided else "undecided"}: '
                + ', '.join(f'{name} {a.state.value}' for name, a in race.attempts.items())
                for key, race in self._races.items()]

    def _finish(self, key: FrameKey, source: str, state: SourceState, now_ns: int,
                detections: Detections | None = None, error: str = '') -> Outcome:
        race = self._races.get(key)
        if race is None or race.attempts[source].state is not SourceState.PENDING:
            return Outcome()
        attempt = race.attempts[source]
        attempt.state, attempt.finished_ns = state, now_ns
        attempt.detections, attempt.error = detections, error
        return self._evaluate(race, now_ns)

    def _evaluate(self, race: _Race, now_ns: int) -> Outcome:
        outcome = Outcome()
        best = race.best_arrived()
        pending = race.pending()
        if race.decided is None:
            past_deadline = now_ns >= race.deadline_ns
            if best is not None:
                outranked = any(p.source.priority > best.source.priority for p in pending)
                if past_deadline or not outranked:
                    assert best.detections is not None
                    late = best.finished_ns is not None and best.finished_ns > race.deadline_ns
                    race.decided = (best.source.name, best.detections, now_ns, late)
            elif not pending:
                race.decided = (None, Detections.empty(), now_ns, past_deadline)
        for attempt in pending:
            if attempt.source.cancellable and not attempt.cancel_requested and (
                    race.decided is not None
                    or (best is not None and attempt.source.priority <= best.source.priority)):
                attempt.cancel_requested = True
                outcome.cancel.append((race.key, attempt.source.name))
        if race.decided is not None:
            outcome.extend(self._release(race.key.camera, now_ns))
        return outcome

    def _release(self, camera: str, now_ns: int) -> Outcome:
        """Release decided frames of ``camera`` in order, stopping at the first undecided one."""
        outcome = Outcome()
        queue = self._unreleased[camera]
        while queue and (race := self._races[queue[0]]).decided is not None:
            queue.pop(0)
            winner, detections, decided_ns, late = race.decided
            race.released = Decision(race.key, race.stamp_ns, race.deadline_ns, winner,
                                     detections, decided_ns, now_ns, late)
            outcome.decisions.append(race.released)
        for key in [k for k, r in self._races.items() if r.released and not r.pending()]:
            race = self._races.pop(key)
            assert race.released is not None
            outcome.settled.append(FrameRecord(key, race.stamp_ns, race.start_ns,
                                               race.deadline_ns, race.released, race.attempts))
        return outcome
