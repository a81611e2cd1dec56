"""
Deadline-aware batch scheduling of inference requests, free of gRPC and ROS.

A request carries an absolute deadline on the scheduler's clock (monotonic seconds). The
``deadline`` policy keeps the queue earliest-deadline-first, answers at once when a request's
predicted completion is after its deadline, drops queued requests that can no longer finish in
time before spending inference on them, and forms batches that every member can still meet.
The ``fifo`` policy is the server's behaviour before deadline scheduling (first in, first out,
no prediction, dropped only once already expired), kept for comparison.

:class:`DeadlineQueue` is the policy, driven by explicit times; :class:`BatchScheduler` runs it
with worker threads and a model function. Every submitted request is resolved exactly once.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
import enum
import itertools
import logging
import math
import threading
import time
from typing import Callable, Generic, Sequence, TypeVar

_LOG = logging.getLogger(__name__)

Payload = TypeVar('Payload')
Result = TypeVar('Result')
Clock = Callable[[], float]

POLICIES = ('deadline', 'fifo')
NO_DEADLINE = math.inf


class Status(enum.Enum):
    """How a request ended; the value is its metrics label."""

    OK = 'ok'
    LATE_REJECTED = 'late_rejected'  # predicted completion after the deadline, on arrival
    REFUSED = 'refused'  # the queue was full
    DROPPED_UNREACHABLE = 'dropped_unreachable'  # queued, then no longer able to finish in time
    EXPIRED = 'expired'  # the deadline passed before inference
    CANCELLED = 'cancelled'  # the client went away
    FAILED = 'failed'  # the model raised
    UNAVAILABLE = 'unavailable'  # the scheduler closed first


@dataclass(frozen=True)
class Outcome(Generic[Result]):
    """The one resolution of a request; ``result`` is set only for OK."""

    status: Status
    detail: str
    result: Result | None = None
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0


class InferenceEstimate:
    """
    A running estimate of a batch's inference time as a function of its size.

    Per batch size it keeps an exponentially weighted mean and mean absolute deviation, and
    estimates mean + ``deviations`` x deviation (like TCP's retransmission timeout), so that a
    request admitted on the estimate is rarely late. A size never measured is extrapolated from
    the nearest measured one at the same time per image (no batching gain assumed); before any
    measurement every image is assumed to take ``prior_s``.
    """

    def __init__(self, prior_s: float = 0.1, alpha: float = 0.2,
                 deviations: float = 2.0) -> None:
        """Start from ``prior_s`` per image; ``alpha`` weighs each new measurement."""
        if prior_s < 0 or not 0 < alpha <= 1 or deviations < 0:
            raise ValueError(f'invalid estimate parameters: prior_s={prior_s}, alpha={alpha}, '
                             f'deviations={deviations}')
        self._prior_s = prior_s
        self._alpha = alpha
        self._deviations = deviations
        self._mean_s: dict[int, float] = {}
        self._deviation_s: dict[int, float] = {}

    def observe(self, batch_size: int, seconds: float) -> None:
        """Fold in one measured batch."""
        mean = self._mean_s.get(batch_size)
        if mean is None:
            self._mean_s[batch_size] = seconds
            self._deviation_s[batch_size] = seconds / 4
            return
        error = seconds - mean
        self._mean_s[batch_size] = mean + self._alpha * error
        self._deviation_s[batch_size] += self._alpha * (abs(error) - self._deviation_s[batch_size])

    def seconds(self, batch_size: int) -> float:
        """Return the estimated inference time of a batch of ``batch_size`` requests."""
        if batch_size <= 0:
            return 0.0
        if not self._mean_s:
            return self._prior_s * batch_size
        nearest = min(self._mean_s, key=lambda size: (abs(size - batch_size), size))
        measured = self._mean_s[nearest] + self._deviations * self._deviation_s[nearest]
        return measured if nearest == batch_size else measured * batch_size / nearest

    def work_seconds(self, requests: int, max_batch_size: int) -> float:
        """Return the estimated time to infer ``requests`` in batches of ``max_batch_size``."""
        full, rest = divmod(requests, max_batch_size)
        return full * self.seconds(max_batch_size) + self.seconds(rest)


class Ticket(Generic[Payload, Result]):
    """A submitted request: its payload, deadline, and (once resolved) its :class:`Outcome`."""

    def __init__(self, payload: Payload, deadline_s: float, arrival_s: float, sequence: int,
                 on_outcome: Callable[[Ticket[Payload, Result]], None] | None) -> None:
        """Create an unresolved ticket; the scheduler calls this, not its users."""
        self.payload = payload
        self.deadline_s = deadline_s
        self.arrival_s = arrival_s
        self.sequence = sequence
        self._on_outcome = on_outcome
        self._lock = threading.Lock()
        self._resolved = threading.Event()
        self._outcome: Outcome[Result] | None = None
        self._cancel: Callable[[Ticket[Payload, Result]], None] | None = None

    @property
    def outcome(self) -> Outcome[Result] | None:
        """Return the outcome, or None while unresolved."""
        return self._outcome

    def wait(self, timeout_s: float | None = None) -> Outcome[Result] | None:
        """Block until resolved (or ``timeout_s`` passed: None); return the outcome."""
        self._resolved.wait(timeout_s)
        return self._outcome

    def cancel(self) -> None:
        """Withdraw the request (the client went away); no-op once resolved."""
        if self._cancel is not None and not self._resolved.is_set():
            self._cancel(self)

    def resolve(self, outcome: Outcome[Result]) -> bool:
        """Set the outcome unless already set; return whether this call set it."""
        with self._lock:
            if self._outcome is not None:
                return False
            self._outcome = outcome
        self._resolved.set()
        if self._on_outcome is not None:
            try:
                self._on_outcome(self)
            except Exception:  # noqa: B902 (an observer's bug must not lose the outcome)
                _LOG.exception('outcome observer failed')
        return True


Resolution = tuple[Ticket[Payload, Result], Outcome[Result]]


@dataclass
class Batch(Generic[Payload, Result]):
    """Requests taken together for one inference."""

    tickets: list[Ticket[Payload, Result]]
    start_s: float
    estimate_s: float
    cancelled: set[int] = field(default_factory=set)  # sequences cancelled while in flight


@dataclass(frozen=True)
class Decision(Generic[Payload, Result]):
    """What a worker does next: run ``batch``, else wait ``wait_s`` (None: until notified)."""

    batch: Batch[Payload, Result] | None
    wait_s: float | None
    resolutions: list[Resolution[Payload, Result]]


class DeadlineQueue(Generic[Payload, Result]):
    """
    The scheduling policy: a bounded queue, admission, dropping and batch formation.

    Not thread-safe: :class:`BatchScheduler` calls it under its lock. Every method takes the
    current time, so tests drive it without threads or sleeping. Methods return the
    (ticket, outcome) pairs to resolve, which the caller resolves outside its lock.
    """

    def __init__(self, policy: str = 'deadline', *, max_queue: int = 16, max_batch_size: int = 1,
                 max_queue_delay_s: float = 0.0, workers: int = 1,
                 estimate: InferenceEstimate | None = None, probe_interval_s: float = 1.0) -> None:
        """
        Check and keep the parameters.

        An idle server admits a request predicted to be late when it has not finished an
        inference for ``probe_interval_s``: the estimate learns only from inferences, and
        without this probe an estimate that is too high (a slow start-up) would refuse every
        request for ever.
        """
        if policy not in POLICIES:
            raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}')
        if max_queue < 1 or max_batch_size < 1 or workers < 1 or max_queue_delay_s < 0:
            raise ValueError(f'invalid queue parameters: max_queue={max_queue}, max_batch_size='
                             f'{max_batch_size}, workers={workers}, max_queue_delay_s='
                             f'{max_queue_delay_s}')
        self.policy = policy
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.workers = workers
        self.estimate = estimate or InferenceEstimate()
        self.probe_interval_s = probe_interval_s
        self._last_finish_s = -math.inf
        self._probes: set[int] = set()  # queued probes: not dropped as unreachable
        self._queue: list[Ticket[Payload, Result]] = []  # sorted by _key
        self._in_flight: list[Batch[Payload, Result]] = []

    def __len__(self) -> int:
        """Return the number of queued requests."""
        return len(self._queue)

    def _key(self, ticket: Ticket[Payload, Result]) -> tuple[float, int]:
        if self.policy == 'fifo':
            return (0.0, ticket.sequence)
        return (ticket.deadline_s, ticket.sequence)

    def predicted_completion_s(self, deadline_s: float, now_s: float) -> float:
        """Return when a request with ``deadline_s`` arriving now is predicted to finish."""
        ahead = bisect.bisect_right(self._queue, (deadline_s, math.inf), key=self._key)
        in_flight_s = sum(max(0.0, b.start_s + b.estimate_s - now_s) for b in self._in_flight)
        work_s = self.estimate.work_seconds(ahead + 1, self.max_batch_size)
        return now_s + (in_flight_s + work_s) / self.workers

    def refusal(self, deadline_s: float, now_s: float) -> Outcome[Result] | None:
        """Return how a request due at ``deadline_s`` arriving now is refused, or None."""
        if len(self._queue) >= self.max_queue:
            return Outcome(Status.REFUSED, f'queue full: {len(self._queue)} requests waiting')
        if now_s >= deadline_s:
            return Outcome(Status.EXPIRED, 'deadline passed before inference')
        if self.policy == 'deadline':
            predicted_s = self.predicted_completion_s(deadline_s, now_s)
            probe = (not self._queue and not self._in_flight
                     and now_s - self._last_finish_s >= self.probe_interval_s)
            if predicted_s > deadline_s and not probe:
                return Outcome(Status.LATE_REJECTED,
                               f'predicted completion {(predicted_s - now_s) * 1e3:.0f} ms from '
                               f'now, deadline in {(deadline_s - now_s) * 1e3:.0f} ms')
        return None

    def submit(self, ticket: Ticket[Payload, Result],
               now_s: float) -> list[Resolution[Payload, Result]]:
        """Queue ``ticket``, or return its refusal."""
        refusal = self.refusal(ticket.deadline_s, now_s)
        if refusal is not None:
            return [(ticket, refusal)]
        if (self.policy == 'deadline'
                and self.predicted_completion_s(ticket.deadline_s, now_s) > ticket.deadline_s):
            self._probes.add(ticket.sequence)
        bisect.insort(self._queue, ticket, key=self._key)
        return []

    def cancel(self, ticket: Ticket[Payload, Result]) -> list[Resolution[Payload, Result]]:
        """Withdraw a queued ticket; one in flight is answered CANCELLED after its batch."""
        for index, queued in enumerate(self._queue):
            if queued is ticket:
                del self._queue[index]
                self._probes.discard(ticket.sequence)
                return [(ticket, Outcome(Status.CANCELLED, 'client cancelled before inference'))]
        for batch in self._in_flight:
            if any(member is ticket for member in batch.tickets):
                batch.cancelled.add(ticket.sequence)
        return []

    def _drop_hopeless(self, now_s: float) -> list[Resolution[Payload, Result]]:
        """Remove queued requests that have expired or (deadline policy) cannot finish now."""
        finish_s = now_s + (self.estimate.seconds(1) if self.policy == 'deadline' else 0.0)
        kept: list[Ticket[Payload, Result]] = []
        dropped: list[Resolution[Payload, Result]] = []
        for ticket in self._queue:
            if now_s >= ticket.deadline_s:
                dropped.append((ticket, Outcome(
                    Status.EXPIRED, 'deadline passed before inference',
                    queue_s=now_s - ticket.arrival_s)))
            elif finish_s > ticket.deadline_s and ticket.sequence not in self._probes:
                dropped.append((ticket, Outcome(
                    Status.DROPPED_UNREACHABLE,
                    f'deadline in {(ticket.deadline_s - now_s) * 1e3:.0f} ms is unreachable',
                    queue_s=now_s - ticket.arrival_s)))
            else:
                kept.append(ticket)
        self._queue = kept
        self._probes.intersection_update(t.sequence for t in kept)
        return dropped

    def next_batch(self, now_s: float) -> Decision[Payload, Result]:
        """Drop hopeless requests, then form the next batch or say how long to wait for one."""
        resolutions = self._drop_hopeless(now_s)
        if not self._queue:
            return Decision(None, None, resolutions)
        queued = len(self._queue)
        first_deadline_s = self._queue[0].deadline_s
        size = min(queued, self.max_batch_size)
        if self.policy == 'deadline':
            while size > 1 and now_s + self.estimate.seconds(size) > first_deadline_s:
                size -= 1
        if queued < self.max_batch_size and self.max_queue_delay_s > 0:
            fill_until_s = min(t.arrival_s for t in self._queue) + self.max_queue_delay_s
            if self.policy == 'deadline':
                fill_until_s = min(fill_until_s,
                                   first_deadline_s - self.estimate.seconds(queued + 1))
            if now_s < fill_until_s:
                return Decision(None, fill_until_s - now_s, resolutions)
        tickets = self._queue[:size]
        self._probes.difference_update(t.sequence for t in tickets)
        del self._queue[:size]
        batch = Batch(tickets, now_s, self.estimate.seconds(size))
        self._in_flight.append(batch)
        return Decision(batch, None, resolutions)

    def finish(self, batch: Batch[Payload, Result], now_s: float,
               results: Sequence[Result] | BaseException) -> list[Resolution[Payload, Result]]:
        """Resolve ``batch`` with the model's results (or its exception); learn its time."""
        self._in_flight.remove(batch)
        self._last_finish_s = now_s
        inference_s = now_s - batch.start_s
        size = len(batch.tickets)
        if isinstance(results, BaseException):
            detail = f'inference failed: {type(results).__name__}: {results}'
            return [(t, Outcome(Status.FAILED, detail, queue_s=batch.start_s - t.arrival_s,
                                inference_s=inference_s, batch_size=size))
                    for t in batch.tickets]
        self.estimate.observe(size, inference_s)
        if len(results) != size:
            detail = f'the model returned {len(results)} results for {size} inputs'
            return [(t, Outcome(Status.FAILED, detail, batch_size=size)) for t in batch.tickets]
        return [(t, Outcome(Status.CANCELLED, 'client cancelled during inference',
                            queue_s=batch.start_s - t.arrival_s, inference_s=inference_s,
                            batch_size=size)
                 if t.sequence in batch.cancelled else
                 Outcome(Status.OK, 'ok', result, queue_s=batch.start_s - t.arrival_s,
                         inference_s=inference_s, batch_size=size))
                for t, result in zip(batch.tickets, results)]

    def drain(self, detail: str) -> list[Resolution[Payload, Result]]:
        """Remove every queued request, answered UNAVAILABLE with ``detail``."""
        drained: list[Resolution[Payload, Result]] = [
            (ticket, Outcome(Status.UNAVAILABLE, detail)) for ticket in self._queue]
        self._queue = []
        self._probes.clear()
        return drained


class BatchScheduler(Generic[Payload, Result]):
    """
    Run a :class:`DeadlineQueue` with ``workers`` threads calling ``model`` on batches.

    ``model`` maps a list of payloads to a list of results of the same length; an exception
    fails that batch's requests and the worker goes on. ``on_outcome`` sees every resolved
    ticket once; ``on_batch(size, inference_s)`` every finished batch.
    """

    def __init__(self, model: Callable[[list[Payload]], Sequence[Result]],
                 queue: DeadlineQueue[Payload, Result], *, clock: Clock = time.monotonic,
                 on_outcome: Callable[[Ticket[Payload, Result]], None] | None = None,
                 on_batch: Callable[[int, float], None] | None = None,
                 name: str = 'scheduler') -> None:
        """Start the worker threads."""
        self._model = model
        self._queue = queue
        self._clock = clock
        self._on_outcome = on_outcome
        self._on_batch = on_batch
        self._condition = threading.Condition()
        self._sequence = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f'{name}-{index}', daemon=True)
                         for index in range(queue.workers)]
        for thread in self._threads:
            thread.start()

    @property
    def queue_depth(self) -> int:
        """Return the number of requests waiting for inference."""
        with self._condition:
            return len(self._queue)

    def refusal(self, deadline_s: float = NO_DEADLINE) -> Outcome[Result] | None:
        """
        Return how a request due at ``deadline_s`` would be refused now, or None.

        A cheap check before preparing a payload (decoding an image) that would be refused;
        :meth:`submit` checks again.
        """
        with self._condition:
            if self._closed:
                return Outcome(Status.UNAVAILABLE, 'the scheduler is closed')
            return self._queue.refusal(deadline_s, self._clock())

    def submit(self, payload: Payload, deadline_s: float = NO_DEADLINE) -> Ticket[Payload, Result]:
        """Submit one request; the returned ticket may already be resolved (refused)."""
        with self._condition:
            ticket: Ticket[Payload, Result] = Ticket(
                payload, deadline_s, self._clock(), next(self._sequence), self._on_outcome)
            ticket._cancel = self._cancel  # noqa: SLF001 (the ticket's owner)
            if self._closed:
                resolutions: list[Resolution[Payload, Result]] = [
                    (ticket, Outcome(Status.UNAVAILABLE, 'the scheduler is closed'))]
            else:
                resolutions = self._queue.submit(ticket, ticket.arrival_s)
                if not resolutions:
                    self._condition.notify()
        _resolve(resolutions)
        return ticket

    def _cancel(self, ticket: Ticket[Payload, Result]) -> None:
        with self._condition:
            resolutions = self._queue.cancel(ticket)
        _resolve(resolutions)

    def close(self, timeout_s: float | None = None) -> None:
        """Answer queued requests UNAVAILABLE, let running batches finish, stop the workers."""
        with self._condition:
            self._closed = True
            resolutions = self._queue.drain('the server is shutting down')
            self._condition.notify_all()
        _resolve(resolutions)
        for thread in self._threads:
            thread.join(timeout_s)

    def _work(self) -> None:
        """Take batches and run them until closed."""
        while True:
            with self._condition:
                if self._closed:
                    return
                decision = self._queue.next_batch(self._clock())
                if decision.batch is None and not decision.resolutions:
                    self._condition.wait(decision.wait_s)
                    continue
            _resolve(decision.resolutions)  # outside the lock: observers may take their own
            if decision.batch is not None:
                self._run(decision.batch)

    def _run(self, batch: Batch[Payload, Result]) -> None:
        """Infer one batch and resolve its requests, whatever the model does."""
        results: Sequence[Result] | BaseException
        try:
            results = self._model([ticket.payload for ticket in batch.tickets])
        except Exception as exc:  # noqa: B902 (one failing batch must not end the worker)
            _LOG.exception('inference of a batch of %d failed', len(batch.tickets))
            results = exc
        with self._condition:
            now_s = self._clock()
            resolutions = self._queue.finish(batch, now_s, results)
        _resolve(resolutions)
        if self._on_batch is not None and not isinstance(results, BaseException):
            try:
                self._on_batch(len(batch.tickets), now_s - batch.start_s)
            except Exception:  # noqa: B902 (an observer's bug must not end the worker)
                _LOG.exception('batch observer failed')


def _resolve(resolutions: list[Resolution[Payload, Result]]) -> None:
    for ticket, outcome in resolutions:
        ticket.resolve(outcome)
