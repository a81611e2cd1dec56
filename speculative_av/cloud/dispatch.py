"""
Which cloud endpoints a frame is sent to: pacing, least-outstanding balancing, bounded hedging.

* Pacing (Schafhalter et al.: a frame is not sent while the outgoing queue is backed up): each
  endpoint has at most ``max_outstanding`` calls in flight. A frame that would have to wait
  behind them is not sent to it at all, and is counted as skipped; the local detector and the
  deadline still decide that frame.
* Endpoints of equal priority are replicas of one service: a frame goes to one of them, the one
  with the fewest outstanding calls (ties rotate).
* Hedging (optional): if the chosen replica has not answered ``hedge_after_s`` after the frame
  was sent, or failed before that, the frame also goes to the next replica, the first answer
  winning. Hedges are paid from a budget that grows by ``hedge_ratio`` per frame sent, so they
  add at most that share of load (plus a burst of :data:`HEDGE_BURST`) and never double it.

Every endpoint planned for a frame is resolved exactly once through ``on_done``: with the call's
reply, or with a reply whose error starts with ``CANCELLED`` (a hedge that was not needed) or
``SKIPPED`` (a hedge the budget or the replica's capacity did not allow).

No gRPC or ROS here: endpoints are anything with ``name``, ``healthy`` and ``submit``, and the
clock is injected, so the policy is unit-tested without a network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Protocol, Sequence

from speculative_av.cloud.codec import EncodedFrame
from speculative_av.cloud.reply import CloudReply

_LOG = logging.getLogger(__name__)

HEDGE_BURST = 2.0  # hedges that may be spent at once from an accumulated budget


class Call(Protocol):
    """A started remote call."""

    def cancel(self) -> bool:
        """Ask the call to end early; its reply then reports CANCELLED."""


class Endpoint(Protocol):
    """What the dispatcher needs of a cloud endpoint (native or Open Inference Protocol)."""

    @property
    def name(self) -> str:
        """Return the endpoint's name, unique per vehicle."""

    @property
    def healthy(self) -> bool:
        """Return whether the endpoint serves a model whose labels were verified."""

    def submit(self, frame: EncodedFrame, frame_id: str, stamp_ns: int, timeout_s: float,
               deadline_unix_ns: int, on_done: Callable[[CloudReply], None]) -> Call:
        """Start a call; ``on_done`` gets its reply exactly once."""


@dataclass(frozen=True)
class Plan:
    """The endpoints one frame goes to: sent at once, hedged later, or skipped (paced)."""

    primaries: tuple[str, ...] = ()
    hedges: tuple[tuple[str, str], ...] = ()  # (hedge endpoint, the primary it backs up)
    skipped: tuple[str, ...] = ()  # priority groups with every healthy replica at capacity

    @property
    def sources(self) -> list[str]:
        """Return every endpoint that will resolve for this frame (primaries, then hedges)."""
        return [*self.primaries, *(hedge for hedge, _ in self.hedges)]


@dataclass
class DispatchStats:
    """Counters since the dispatcher started."""

    sent: int = 0  # calls started, hedges included
    skipped: int = 0  # frames not sent to a priority group because it was at capacity
    hedged: int = 0  # hedge calls started
    hedges_unneeded: int = 0  # hedges resolved without a call: the primary answered first
    hedges_denied: int = 0  # hedges due but refused by the budget or the replica's capacity
    outstanding: dict[str, int] = field(default_factory=dict)


@dataclass
class _Hedge:
    """A hedge waiting for its time, for its primary's failure, or to be found unneeded."""

    endpoint: str
    primary: str
    due_s: float
    frame: EncodedFrame
    frame_id: str
    stamp_ns: int
    sent_s: float
    timeout_s: float
    deadline_unix_ns: int
    on_done: Callable[[CloudReply], None]
    on_call: Callable[[str, Call], None]
    resolved: bool = False


class CloudDispatcher:
    """Plans and sends each frame's cloud calls; thread-safe."""

    def __init__(self, endpoints: Sequence[Endpoint], priorities: dict[str, int], *,
                 max_outstanding: int = 4, hedge_after_s: float | None = None,
                 hedge_ratio: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """
        Dispatch to ``endpoints``; ``priorities`` maps each endpoint's name to its priority.

        ``hedge_after_s`` None disables hedging. A hedging dispatcher runs one thread that
        sends hedges when they fall due; :meth:`stop` ends it.
        """
        if max_outstanding < 1:
            raise ValueError(f'max_outstanding must be at least 1, got {max_outstanding}')
        if not 0.0 <= hedge_ratio < 1.0:
            raise ValueError(f'hedge_ratio must be in [0, 1), got {hedge_ratio}')
        if hedge_after_s is not None and hedge_after_s < 0:
            raise ValueError(f'hedge_after_s must not be negative, got {hedge_after_s}')
        self._endpoints = {e.name: e for e in endpoints}
        self._priorities = {e.name: priorities[e.name] for e in endpoints}
        groups: dict[int, list[str]] = {}
        for endpoint in endpoints:
            groups.setdefault(priorities[endpoint.name], []).append(endpoint.name)
        self._groups = [groups[p] for p in sorted(groups, reverse=True)]
        self._max_outstanding = max_outstanding
        self._hedge_after_s = hedge_after_s
        self._hedge_ratio = hedge_ratio
        self._clock = clock
        self._lock = threading.Lock()
        self._outstanding = dict.fromkeys(self._endpoints, 0)
        self._rotation = itertools.count()
        self._budget = HEDGE_BURST if hedge_ratio > 0 else 0.0
        self._stats = DispatchStats()
        self._hedges: list[tuple[float, int, _Hedge]] = []  # a heap by due time
        self._hedge_seq = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._running = True
        self._idle_listeners: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        if hedge_after_s is not None:
            self._thread = threading.Thread(target=self._send_due_hedges, name='cloud-hedges',
                                            daemon=True)
            self._thread.start()

    @property
    def priorities(self) -> dict[str, int]:
        """Return each endpoint's priority, by name."""
        return dict(self._priorities)

    def plan(self) -> Plan:
        """
        Choose this frame's endpoints: one healthy replica per priority group with capacity.

        A group whose healthy replicas are all at ``max_outstanding`` is skipped (counted).
        With hedging on, the group's next replica with capacity is planned as a hedge.
        """
        primaries: list[str] = []
        hedges: list[tuple[str, str]] = []
        skipped: list[str] = []
        with self._lock:
            turn = next(self._rotation)
            for group in self._groups:
                healthy = [n for n in group if self._endpoints[n].healthy]
                if not healthy:
                    continue
                free = [n for n in healthy if self._outstanding[n] < self._max_outstanding]
                if not free:
                    skipped.append(healthy[0])
                    continue
                # Least outstanding first; among equals, rotate so replicas share the load.
                free.sort(key=lambda n: (self._outstanding[n],
                                         (group.index(n) - turn) % len(group)))
                primaries.append(free[0])
                if self._hedge_after_s is not None and len(free) > 1:
                    hedges.append((free[1], free[0]))
            self._stats.skipped += len(skipped)
        return Plan(tuple(primaries), tuple(hedges), tuple(skipped))

    def send(self, plan: Plan, frame: EncodedFrame, frame_id: str, stamp_ns: int,
             timeout_s: float, deadline_unix_ns: int, on_done: Callable[[CloudReply], None],
             on_call: Callable[[str, Call], None]) -> None:
        """
        Start the plan's primary calls and schedule its hedges.

        ``on_call`` receives every call started (to cancel it once the frame is decided);
        ``on_done`` every endpoint's outcome, exactly once per endpoint in ``plan.sources``.
        """
        now = self._clock()
        hedges = {primary: hedge for hedge, primary in plan.hedges}
        for name in plan.primaries:
            hedge = None
            if name in hedges and self._hedge_after_s is not None:
                hedge = _Hedge(hedges[name], name, now + self._hedge_after_s, frame, frame_id,
                               stamp_ns, now, timeout_s, deadline_unix_ns, on_done, on_call)
                with self._lock:
                    heapq.heappush(self._hedges, (hedge.due_s, next(self._hedge_seq), hedge))
                    self._wake.notify()
            with self._lock:
                self._budget = min(HEDGE_BURST, self._budget + self._hedge_ratio)
            self._start(name, frame, frame_id, stamp_ns, timeout_s, deadline_unix_ns,
                        self._primary_done(hedge, on_done), on_call)

    def stats(self) -> DispatchStats:
        """Return a copy of the counters, with the calls outstanding per endpoint now."""
        with self._lock:
            return DispatchStats(self._stats.sent, self._stats.skipped, self._stats.hedged,
                                 self._stats.hedges_unneeded, self._stats.hedges_denied,
                                 dict(self._outstanding))

    def in_flight(self) -> int:
        """Return the cloud calls in flight now, over every endpoint (cheap: one lock)."""
        with self._lock:
            return sum(self._outstanding.values())

    def add_idle_listener(self, listener: Callable[[], None]) -> None:
        """
        Call ``listener`` whenever the last call in flight ends (so the link fell idle).

        It runs on the thread that delivered that reply, outside the dispatcher's lock: it
        must be quick (e.g. notify a condition). Lower-priority traffic waits on this.
        """
        with self._lock:
            self._idle_listeners.append(listener)

    def stop(self) -> None:
        """Stop the hedge thread; hedges not yet sent resolve CANCELLED."""
        with self._lock:
            self._running = False
            pending = list({id(h): h for _, _, h in self._hedges if not h.resolved}.values())
            for hedge in pending:
                hedge.resolved = True
            self._hedges.clear()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for hedge in pending:
            self._resolve_unsent(hedge, 'CANCELLED: dispatcher stopped')

    # Internals --------------------------------------------------------------------------

    def _start(self, name: str, frame: EncodedFrame, frame_id: str, stamp_ns: int,
               timeout_s: float, deadline_unix_ns: int, on_done: Callable[[CloudReply], None],
               on_call: Callable[[str, Call], None]) -> None:
        """Submit one call, counting it outstanding until its reply."""
        with self._lock:
            self._outstanding[name] += 1
            self._stats.sent += 1

        def finish(reply: CloudReply) -> None:
            with self._lock:
                self._outstanding[name] -= 1
                idle = list(self._idle_listeners) if not any(self._outstanding.values()) else []
            for listener in idle:
                try:
                    listener()
                except Exception:  # noqa: B902 (the frame must still resolve this endpoint)
                    _LOG.exception('idle listener failed')
            on_done(reply)

        try:
            call = self._endpoints[name].submit(frame, frame_id, stamp_ns, timeout_s,
                                                deadline_unix_ns, finish)
        except Exception as error:  # noqa: B902 (the frame must still resolve this endpoint)
            _LOG.exception('%s: submit failed for frame %s', name, frame_id)
            finish(CloudReply(name, False, error=f'submit failed: {error!r}', frame_id=frame_id))
            return
        on_call(name, call)

    def _primary_done(self, hedge: _Hedge | None,
                      on_done: Callable[[CloudReply], None]) -> Callable[[CloudReply], None]:
        """Wrap a primary's ``on_done``: its outcome settles or hurries its hedge."""
        if hedge is None:
            return on_done

        def done(reply: CloudReply) -> None:
            on_done(reply)
            with self._lock:
                if hedge.resolved:
                    return
                if reply.ok or reply.error.startswith('CANCELLED'):
                    hedge.resolved = True
                    self._stats.hedges_unneeded += 1
                else:
                    hedge.due_s = self._clock()  # the primary failed: back it up now
                    heapq.heappush(self._hedges, (hedge.due_s, next(self._hedge_seq), hedge))
                    self._wake.notify()
                    return
            hedge.on_done(CloudReply(hedge.endpoint, False, frame_id=hedge.frame_id,
                                     error=f'CANCELLED: {hedge.primary} answered first'))
        return done

    def _send_due_hedges(self) -> None:
        """Thread: send each hedge when it falls due, unless it was resolved meanwhile."""
        while True:
            with self._lock:
                while self._running and (
                        not self._hedges or self._hedges[0][0] > self._clock()):
                    self._wake.wait(None if not self._hedges
                                    else max(0.0, self._hedges[0][0] - self._clock()))
                if not self._running:
                    return
                _, _, hedge = heapq.heappop(self._hedges)
                if hedge.resolved:
                    continue
                hedge.resolved = True
            try:
                self._send_hedge(hedge)
            except Exception as error:  # noqa: B902 (the hedge thread serves every frame)
                _LOG.exception('hedge to %s failed', hedge.endpoint)
                hedge.on_done(CloudReply(hedge.endpoint, False, frame_id=hedge.frame_id,
                                         error=f'hedge failed: {error!r}'))

    def _send_hedge(self, hedge: _Hedge) -> None:
        """Send a due hedge if the budget, the replica and the time left allow it."""
        timeout_s = hedge.timeout_s - (self._clock() - hedge.sent_s)
        with self._lock:
            reason = ('no time left' if timeout_s <= 0 else
                      f'{hedge.endpoint} is not healthy'
                      if not self._endpoints[hedge.endpoint].healthy else
                      f'{hedge.endpoint} has {self._max_outstanding} calls outstanding'
                      if self._outstanding[hedge.endpoint] >= self._max_outstanding else
                      'hedge budget spent' if self._budget < 1.0 else '')
            if reason:
                self._stats.hedges_denied += 1
            else:
                self._budget -= 1.0
                self._stats.hedged += 1
        if reason:
            self._resolve_unsent(hedge, f'SKIPPED: {reason}')
            return
        self._start(hedge.endpoint, hedge.frame, hedge.frame_id, hedge.stamp_ns, timeout_s,
                    hedge.deadline_unix_ns, hedge.on_done, hedge.on_call)

    @staticmethod
    def _resolve_unsent(hedge: _Hedge, error: str) -> None:
        hedge.on_done(CloudReply(hedge.endpoint, False, error=error, frame_id=hedge.frame_id))
