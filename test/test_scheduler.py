"""
The deadline-aware batch scheduler, without gRPC.

The policy is driven with explicit times; the worker threads with an injected clock and a model
function that the tests control.
"""
from __future__ import annotations

import threading
from typing import Sequence

from hypothesis import given, HealthCheck, settings, strategies as st
import pytest
from speculative_av.cloud.scheduler import (
    BatchScheduler, DeadlineQueue, InferenceEstimate, NO_DEADLINE, Outcome, Status, Ticket)

STEP_S = 0.1  # the fake model's time per image


def ticket(name: str, deadline_s: float, arrival_s: float = 0.0,
           sequence: int = 0) -> Ticket[str, str]:
    return Ticket(name, deadline_s, arrival_s, sequence, None)


def exact_estimate(per_image_s: float = STEP_S) -> InferenceEstimate:
    """Return an estimate that predicts ``per_image_s`` per image, no safety margin."""
    return InferenceEstimate(prior_s=per_image_s, deviations=0.0)


def queue(policy: str = 'deadline', **kwargs: float) -> DeadlineQueue[str, str]:
    return DeadlineQueue(policy, estimate=exact_estimate(), **kwargs)  # type: ignore[arg-type]


def submit_all(q: DeadlineQueue[str, str], *items: tuple[str, float],
               now_s: float = 0.0) -> dict[str, Outcome[str]]:
    """Submit ``(name, deadline)`` pairs in order; return the refusals by name."""
    refused = {}
    for sequence, (name, deadline_s) in enumerate(items):
        for refused_ticket, outcome in q.submit(ticket(name, deadline_s, now_s, sequence), now_s):
            refused[refused_ticket.payload] = outcome
    return refused


def names(batch_tickets: Sequence[Ticket[str, str]]) -> list[str]:
    return [t.payload for t in batch_tickets]


# --- the estimate -----------------------------------------------------------------------------

def test_estimate_starts_from_the_prior_and_learns_per_batch_size() -> None:
    estimate = InferenceEstimate(prior_s=0.1, alpha=0.5, deviations=0.0)
    assert estimate.seconds(1) == pytest.approx(0.1) and estimate.seconds(4) == pytest.approx(0.4)
    estimate.observe(2, 0.3)
    assert estimate.seconds(2) == pytest.approx(0.3)
    assert estimate.seconds(4) == pytest.approx(0.6)  # extrapolated per image from size 2
    assert estimate.seconds(1) == pytest.approx(0.15)
    estimate.observe(2, 0.5)
    assert estimate.seconds(2) == pytest.approx(0.4)  # halfway: alpha 0.5
    assert estimate.work_seconds(5, 2) == pytest.approx(0.4 + 0.4 + 0.2)


def test_estimate_adds_a_margin_for_variable_times() -> None:
    estimate = InferenceEstimate(alpha=0.5, deviations=2.0)
    for seconds in (0.1, 0.2, 0.1, 0.2):
        estimate.observe(1, seconds)
    assert estimate.seconds(1) > 0.2  # mean ~0.15 plus twice the deviation
    with pytest.raises(ValueError):
        InferenceEstimate(alpha=0.0)


# --- the policy, driven with explicit times ---------------------------------------------------

def test_earliest_deadline_first() -> None:
    q = queue()
    assert submit_all(q, ('late', 5.0), ('early', 1.0), ('middle', 3.0)) == {}
    order = []
    while len(q):
        decision = q.next_batch(0.0)
        assert decision.batch is not None
        order += names(decision.batch.tickets)
        q.finish(decision.batch, 0.1, ['r'])
    assert order == ['early', 'middle', 'late']


def test_fifo_keeps_arrival_order_and_predicts_nothing() -> None:
    q = queue('fifo')
    assert submit_all(q, ('late', 5.0), ('early', 0.15), ('hopeless', 0.05)) == {}
    decision = q.next_batch(0.0)
    assert decision.batch is not None and names(decision.batch.tickets) == ['late']
    q.finish(decision.batch, 0.1, ['r'])
    # At 0.1 'hopeless' has expired and is dropped; 'early' still runs although it will end late.
    decision = q.next_batch(0.1)
    assert [(t.payload, o.status) for t, o in decision.resolutions] == [
        ('hopeless', Status.EXPIRED)]
    assert decision.batch is not None and names(decision.batch.tickets) == ['early']


def test_admission_refuses_a_request_predicted_to_finish_late() -> None:
    q = queue()
    # Each is admitted: its own inference plus the ones due no later than it end in time.
    assert submit_all(q, ('a', 1.0), ('c', 0.25), ('d', 0.35), ('e', 0.25)) == {}
    # Due at 0.29, it would run after 'c' and 'e' (due 0.25) and end at 0.3.
    late = submit_all(q, ('g', 0.29))
    assert late['g'].status == Status.LATE_REJECTED
    assert late['g'].detail == 'predicted completion 300 ms from now, deadline in 290 ms'
    # A request due later is admitted behind all of them: the queue order is by deadline.
    assert submit_all(q, ('h', 0.6)) == {}


def test_an_idle_server_probes_a_too_pessimistic_estimate() -> None:
    q = DeadlineQueue[str, str]('deadline', estimate=exact_estimate(0.5), probe_interval_s=1.0)
    # Predicted 0.5 s for a 0.3 s deadline, but nothing has been inferred yet: one is admitted.
    assert submit_all(q, ('probe', 10.3), now_s=10.0) == {}
    assert submit_all(q, ('second', 10.3), now_s=10.0)['second'].status == Status.LATE_REJECTED
    decision = q.next_batch(10.0)
    assert decision.batch is not None
    q.finish(decision.batch, 10.1, ['r'])  # it took 0.1 s: the estimate comes down
    assert q.estimate.seconds(1) < 0.5
    q.estimate.observe(1, 5.0)  # and suppose it went up again
    assert submit_all(q, ('soon', 10.9), now_s=10.5)['soon'].status == Status.LATE_REJECTED
    assert submit_all(q, ('later', 11.4), now_s=11.1) == {}  # 1 s after the last inference


def test_admission_counts_the_batch_in_flight() -> None:
    q = queue()
    submit_all(q, ('running', 1.0))
    decision = q.next_batch(0.0)
    assert decision.batch is not None
    # The running inference ends at 0.1; a new request needs until 0.2.
    assert q.predicted_completion_s(0.5, 0.05) == pytest.approx(0.2)
    refused = submit_all(q, ('tight', 0.15), now_s=0.05)
    assert refused['tight'].status == Status.LATE_REJECTED


def test_bounded_queue_refuses_beyond_its_length() -> None:
    q = queue(max_queue=2)
    refused = submit_all(q, ('a', 9.0), ('b', 9.0), ('c', 9.0))
    assert list(refused) == ['c'] and refused['c'].status == Status.REFUSED
    assert refused['c'].detail == 'queue full: 2 requests waiting'


def test_expired_on_arrival() -> None:
    refused = submit_all(queue(), ('past', 1.0), now_s=2.0)
    assert refused['past'].status == Status.EXPIRED


def test_queued_requests_that_became_unreachable_are_dropped_before_inference() -> None:
    q = queue()
    submit_all(q, ('x', 0.5), ('y', 0.25), ('z', 2.0))
    # Time passes (a long inference elsewhere): at 0.2, 'y' (due 0.25) cannot finish by 0.3.
    decision = q.next_batch(0.2)
    assert [(t.payload, o.status) for t, o in decision.resolutions] == [
        ('y', Status.DROPPED_UNREACHABLE)]
    assert decision.resolutions[0][1].queue_s == pytest.approx(0.2)
    assert decision.batch is not None and names(decision.batch.tickets) == ['x']
    decision = q.next_batch(3.0)
    assert [(t.payload, o.status) for t, o in decision.resolutions] == [('z', Status.EXPIRED)]
    assert decision.batch is None and decision.wait_s is None


def test_batches_respect_max_size_and_the_earliest_deadline() -> None:
    q = queue(max_batch_size=3)
    submit_all(q, *[(f'r{i}', 10.0) for i in range(5)])
    decision = q.next_batch(0.0)
    assert decision.batch is not None and names(decision.batch.tickets) == ['r0', 'r1', 'r2']
    assert decision.batch.estimate_s == pytest.approx(0.3)
    q.finish(decision.batch, 0.3, ['a', 'b', 'c'])

    # A batch of two would end at 0.5, after 'urgent' (due 0.45): it runs with one only.
    submit_all(q, ('urgent', 0.45), now_s=0.3)
    decision = q.next_batch(0.3)
    assert decision.batch is not None and names(decision.batch.tickets) == ['urgent']


def test_batch_waits_to_fill_at_most_the_max_delay_and_never_past_a_deadline() -> None:
    q = queue(max_batch_size=4, max_queue_delay_s=0.05)
    submit_all(q, ('a', 10.0), now_s=1.0)
    decision = q.next_batch(1.0)
    assert decision.batch is None and decision.wait_s == pytest.approx(0.05)
    submit_all(q, ('b', 10.0), now_s=1.02)
    decision = q.next_batch(1.02)
    assert decision.batch is None and decision.wait_s == pytest.approx(0.03)
    decision = q.next_batch(1.05)  # the delay is over: go with what is there
    assert decision.batch is not None and names(decision.batch.tickets) == ['a', 'b']
    q.finish(decision.batch, 1.25, ['x', 'y'])  # learnt: 0.2 s for two

    # Due at 2.22: a batch of two (0.2) must start by 2.02, so the wait ends there, not at 2.05.
    submit_all(q, ('tight', 2.22), now_s=2.0)
    decision = q.next_batch(2.0)
    assert decision.batch is None and decision.wait_s == pytest.approx(0.02)
    decision = q.next_batch(2.03)
    assert decision.batch is not None and names(decision.batch.tickets) == ['tight']


def test_full_batch_goes_without_waiting() -> None:
    q = queue(max_batch_size=2, max_queue_delay_s=1.0)
    submit_all(q, ('a', 10.0), ('b', 10.0))
    decision = q.next_batch(0.0)
    assert decision.batch is not None and len(decision.batch.tickets) == 2


def test_cancel_queued_and_in_flight() -> None:
    q = queue(max_batch_size=1)
    a, b = ticket('a', 9.0, sequence=0), ticket('b', 9.0, sequence=1)
    q.submit(a, 0.0)
    q.submit(b, 0.0)
    decision = q.next_batch(0.0)
    assert decision.batch is not None and decision.batch.tickets == [a]
    assert [(t.payload, o.status) for t, o in q.cancel(b)] == [('b', Status.CANCELLED)]
    assert len(q) == 0
    assert q.cancel(a) == []  # in flight: answered when the batch ends
    [(done, outcome)] = q.finish(decision.batch, 0.1, ['result'])
    assert done is a and outcome.status == Status.CANCELLED and outcome.result is None


def test_a_failing_batch_fails_its_requests_and_learns_nothing() -> None:
    q = queue(max_batch_size=2)
    submit_all(q, ('a', 9.0), ('b', 9.0))
    decision = q.next_batch(0.0)
    assert decision.batch is not None
    resolutions = q.finish(decision.batch, 5.0, RuntimeError('out of memory'))
    assert [(o.status, o.detail) for _, o in resolutions] == [
        (Status.FAILED, 'inference failed: RuntimeError: out of memory')] * 2
    assert q.estimate.seconds(2) == pytest.approx(0.2)  # still the prior


def test_finished_batches_teach_the_estimate() -> None:
    q = DeadlineQueue[str, str]('deadline', max_batch_size=2,
                                estimate=InferenceEstimate(prior_s=0.01, deviations=0.0))
    submit_all(q, ('a', 9.0), ('b', 9.0))
    decision = q.next_batch(0.0)
    assert decision.batch is not None
    [(_, first), (_, second)] = q.finish(decision.batch, 0.5, ['x', 'y'])
    assert (first.status, first.result, first.batch_size, first.inference_s) == (
        Status.OK, 'x', 2, pytest.approx(0.5))
    assert second.result == 'y'
    assert q.estimate.seconds(2) == pytest.approx(0.5)
    # Now a request due in 0.4 s behind nothing is still admitted (one image: 0.25 s) ...
    assert submit_all(q, ('c', 1.4), now_s=1.0) == {}
    # ... but one due in 0.3 s behind it is not (0.25 + 0.25).
    assert submit_all(q, ('d', 1.45), now_s=1.0)['d'].status == Status.LATE_REJECTED


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match='policy'):
        DeadlineQueue('lifo')
    with pytest.raises(ValueError, match='max_batch_size=0'):
        DeadlineQueue('deadline', max_batch_size=0)


# --- the worker threads -----------------------------------------------------------------------

class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now_s

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now_s += seconds


class GatedModel:
    """A model function that records its batches and runs only when released."""

    def __init__(self, clock: FakeClock, fail_on: str = '') -> None:
        self.clock = clock
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.release = threading.Semaphore(0)
        self.started = threading.Semaphore(0)

    def __call__(self, payloads: list[str]) -> list[str]:
        self.batches.append(list(payloads))
        self.started.release()
        assert self.release.acquire(timeout=10.0), 'the test never released the model'
        self.clock.advance(STEP_S * len(payloads))
        if self.fail_on in payloads:
            raise RuntimeError(f'cannot infer {self.fail_on}')
        return [f'{p}!' for p in payloads]


def scheduler(model: GatedModel, clock: FakeClock, policy: str = 'deadline',
              **kwargs: float) -> BatchScheduler[str, str]:
    return BatchScheduler(model, DeadlineQueue(policy, estimate=exact_estimate(),
                                               **kwargs),  # type: ignore[arg-type]
                          clock=clock)


def test_workers_serve_by_deadline_while_a_batch_runs() -> None:
    clock = FakeClock()
    model = GatedModel(clock)
    runner = scheduler(model, clock)
    try:
        first = runner.submit('first', 10.0)
        assert model.started.acquire(timeout=10.0)  # 'first' is being inferred
        later = runner.submit('later', 10.0)
        sooner = runner.submit('sooner', 5.0)
        assert runner.queue_depth == 2
        for _ in range(3):
            model.release.release()
        outcomes = [t.wait(10.0) for t in (first, later, sooner)]
        assert [o.status if o else None for o in outcomes] == [Status.OK] * 3
        assert model.batches == [['first'], ['sooner'], ['later']]
        assert [o.result for o in outcomes if o] == ['first!', 'later!', 'sooner!']
        assert outcomes[1] and outcomes[1].queue_s == pytest.approx(0.2)
    finally:
        runner.close(10.0)


def test_a_failing_batch_does_not_stop_the_worker() -> None:
    clock = FakeClock()
    model = GatedModel(clock, fail_on='bad')
    runner = scheduler(model, clock)
    try:
        bad = runner.submit('bad', 10.0)
        model.release.release()
        outcome = bad.wait(10.0)
        assert outcome and outcome.status == Status.FAILED and 'cannot infer bad' in outcome.detail
        good = runner.submit('good', 10.0)
        model.release.release()
        outcome = good.wait(10.0)
        assert outcome and outcome.status == Status.OK and outcome.result == 'good!'
    finally:
        runner.close(10.0)


def test_cancel_frees_the_queue_and_close_answers_the_rest() -> None:
    clock = FakeClock()
    model = GatedModel(clock)
    seen: list[str] = []
    runner: BatchScheduler[str, str] = BatchScheduler(
        model, DeadlineQueue('deadline', max_queue=1, estimate=exact_estimate()), clock=clock,
        on_outcome=lambda t: seen.append(f'{t.payload}:{t.outcome.status.value}'
                                         if t.outcome else 'unresolved'))
    running = runner.submit('running', 10.0)
    assert model.started.acquire(timeout=10.0)
    waiting = runner.submit('waiting', 10.0)
    full = runner.submit('full', 10.0)
    assert full.outcome and full.outcome.status == Status.REFUSED
    waiting.cancel()
    assert waiting.outcome and waiting.outcome.status == Status.CANCELLED
    queued = runner.submit('queued', 10.0)  # the cancelled one's place is free again
    assert queued.outcome is None and runner.queue_depth == 1
    runner.close(0.0)  # 'running' is still in the model
    assert queued.outcome and queued.outcome.status == Status.UNAVAILABLE
    model.release.release()
    runner.close(10.0)
    assert running.outcome and running.outcome.status == Status.OK
    after = runner.submit('after', 10.0)
    assert after.outcome and after.outcome.status == Status.UNAVAILABLE
    assert seen == ['full:refused', 'waiting:cancelled', 'queued:unavailable', 'running:ok',
                    'after:unavailable']


# --- every request is resolved exactly once ---------------------------------------------------

class CountingModel:
    """A model that advances the clock per image and fails batches containing 'fail'."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def __call__(self, payloads: list[str]) -> list[str]:
        self.clock.advance(STEP_S * len(payloads))
        if any(p.startswith('fail') for p in payloads):
            raise RuntimeError('boom')
        return payloads


OPERATIONS = st.lists(st.tuples(
    st.sampled_from(['submit', 'fail', 'cancel', 'tick']),
    st.floats(0.0, 2.0)), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, policy=st.sampled_from(['deadline', 'fifo']),
       max_batch_size=st.integers(1, 4))
def test_every_request_resolves_exactly_once(operations: list[tuple[str, float]], policy: str,
                                             max_batch_size: int) -> None:
    clock = FakeClock()
    resolved: dict[int, int] = {}
    lock = threading.Lock()

    def count(t: Ticket[str, str]) -> None:
        with lock:
            resolved[t.sequence] = resolved.get(t.sequence, 0) + 1

    runner: BatchScheduler[str, str] = BatchScheduler(
        CountingModel(clock), DeadlineQueue(policy, max_queue=5, max_batch_size=max_batch_size,
                                            estimate=exact_estimate()),
        clock=clock, on_outcome=count)
    tickets: list[Ticket[str, str]] = []
    for index, (operation, value) in enumerate(operations):
        if operation in ('submit', 'fail'):
            deadline = NO_DEADLINE if value > 1.9 else clock() + value
            tickets.append(runner.submit(f'{operation}{index}', deadline))
        elif operation == 'cancel' and tickets:
            tickets[int(value * 10) % len(tickets)].cancel()
        else:
            clock.advance(value)
    runner.close(10.0)
    assert all(t.outcome is not None for t in tickets)
    assert resolved == {t.sequence: 1 for t in tickets}
    for t in tickets:
        assert t.outcome is not None
        assert (t.outcome.result is not None) == (t.outcome.status == Status.OK)
        if t.outcome.status == Status.OK:
            assert t.payload.startswith('submit')
