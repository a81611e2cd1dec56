"""Client-side pacing, least-outstanding balancing and bounded hedging (cloud/dispatch.py)."""
from __future__ import annotations

from collections import Counter
import threading
from typing import Callable

import pytest
from speculative_av.cloud.codec import EncodedFrame
from speculative_av.cloud.dispatch import CloudDispatcher, HEDGE_BURST, Plan
from speculative_av.cloud.reply import CloudReply

FRAME = EncodedFrame(b'jpeg', 'jpeg', 64, 48, 64, 48, 0.1)


class _Call:
    def __init__(self, endpoint: ScriptedEndpoint, frame_id: str,
                 on_done: Callable[[CloudReply], None]) -> None:
        self.endpoint = endpoint
        self.frame_id = frame_id
        self.timeout_s = 0.0
        self._on_done = on_done
        self._finished = False

    def finish(self, ok: bool = True, error: str = '') -> None:
        assert not self._finished
        self._finished = True
        self._on_done(CloudReply(self.endpoint.name, ok, error=error, frame_id=self.frame_id))

    def cancel(self) -> bool:
        if not self._finished:
            self.finish(False, 'CANCELLED')
        return True


class ScriptedEndpoint:
    """An endpoint whose calls finish when the test says so (the dispatcher is under test)."""

    def __init__(self, name: str, healthy: bool = True) -> None:
        self.name = name
        self.healthy = healthy
        self.calls: list[_Call] = []
        self.started = threading.Event()

    def submit(self, frame: EncodedFrame, frame_id: str, stamp_ns: int, timeout_s: float,
               deadline_unix_ns: int, on_done: Callable[[CloudReply], None]) -> _Call:
        call = _Call(self, frame_id, on_done)
        call.timeout_s = timeout_s
        self.calls.append(call)
        self.started.set()
        return call

    def open_calls(self) -> list[_Call]:
        return [c for c in self.calls if not c._finished]


class Outcomes:
    """Collects every endpoint's outcome per frame, asserting each arrives once."""

    def __init__(self) -> None:
        self.replies: dict[str, dict[str, CloudReply]] = {}
        self.calls: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def done(self, frame_id: str) -> Callable[[CloudReply], None]:
        def record(reply: CloudReply) -> None:
            with self._lock:
                per_frame = self.replies.setdefault(frame_id, {})
                assert reply.endpoint not in per_frame, f'{reply.endpoint} resolved twice'
                per_frame[reply.endpoint] = reply
                self.changed.notify_all()
        return record

    def on_call(self, name: str, call: object) -> None:
        self.calls.append((name, call))

    def wait_for(self, frame_id: str, count: int, timeout_s: float = 5.0) -> dict[str, CloudReply]:
        with self._lock:
            assert self.changed.wait_for(
                lambda: len(self.replies.get(frame_id, {})) >= count, timeout_s)
            return dict(self.replies[frame_id])


def send(dispatcher: CloudDispatcher, outcomes: Outcomes, frame_id: str,
         timeout_s: float = 1.0) -> Plan:
    plan = dispatcher.plan()
    dispatcher.send(plan, FRAME, frame_id, 0, timeout_s, 0, outcomes.done(frame_id),
                    outcomes.on_call)
    return plan


def test_one_replica_per_priority_group_least_outstanding_first() -> None:
    a, b, c = ScriptedEndpoint('a'), ScriptedEndpoint('b'), ScriptedEndpoint('far')
    dispatcher = CloudDispatcher([a, b, c], {'a': 10, 'b': 10, 'far': 5})
    outcomes = Outcomes()
    first = send(dispatcher, outcomes, 'f1')
    assert len(first.primaries) == 2 and 'far' in first.primaries
    second = send(dispatcher, outcomes, 'f2')
    replica = ({'a', 'b'} & set(first.primaries)).pop()
    assert replica not in second.primaries, 'the busier replica was chosen again'
    assert dispatcher.stats().outstanding == {'a': 1, 'b': 1, 'far': 2}
    # With equal load, the choice rotates instead of always picking the first replica.
    chosen: Counter[str] = Counter()
    for i in range(4):
        for call in a.open_calls() + b.open_calls() + c.open_calls():
            call.finish()
        chosen[(set(send(dispatcher, outcomes, f'r{i}').primaries) & {'a', 'b'}).pop()] += 1
    assert chosen == {'a': 2, 'b': 2}


def test_a_frame_is_not_sent_behind_max_outstanding_calls() -> None:
    a = ScriptedEndpoint('a')
    dispatcher = CloudDispatcher([a], {'a': 10}, max_outstanding=2)
    outcomes = Outcomes()
    assert send(dispatcher, outcomes, 'f1').primaries == ('a',)
    assert send(dispatcher, outcomes, 'f2').primaries == ('a',)
    paced = send(dispatcher, outcomes, 'f3')
    assert paced.primaries == () and paced.skipped == ('a',) and paced.sources == []
    assert len(a.calls) == 2 and dispatcher.stats().skipped == 1
    a.calls[0].finish()
    assert send(dispatcher, outcomes, 'f4').primaries == ('a',)
    assert dispatcher.stats().outstanding == {'a': 2}


def test_unhealthy_endpoints_are_neither_planned_nor_counted_as_skipped() -> None:
    a, b = ScriptedEndpoint('a', healthy=False), ScriptedEndpoint('b')
    dispatcher = CloudDispatcher([a, b], {'a': 10, 'b': 10}, hedge_after_s=0.01)
    try:
        plan = dispatcher.plan()
        assert plan == Plan(('b',), (), ())
        a.healthy, b.healthy = False, False
        assert dispatcher.plan() == Plan()
        assert dispatcher.stats().skipped == 0
    finally:
        dispatcher.stop()


def test_a_fast_primary_makes_the_hedge_unneeded_without_a_call() -> None:
    a, b = ScriptedEndpoint('a'), ScriptedEndpoint('b')
    dispatcher = CloudDispatcher([a, b], {'a': 10, 'b': 10}, hedge_after_s=60.0)
    outcomes = Outcomes()
    try:
        plan = send(dispatcher, outcomes, 'f1')
        assert len(plan.hedges) == 1 and set(plan.sources) == {'a', 'b'}
        primary = a if plan.primaries == ('a',) else b
        primary.calls[0].finish()
        replies = outcomes.wait_for('f1', 2)
        hedge = plan.hedges[0][0]
        assert replies[primary.name].ok
        assert replies[hedge].error.startswith('CANCELLED') and not replies[hedge].ok
        assert dispatcher.stats().hedged == 0 and dispatcher.stats().hedges_unneeded == 1
        assert len(a.calls) + len(b.calls) == 1
    finally:
        dispatcher.stop()


def test_a_slow_primary_is_hedged_after_the_delay_with_the_time_left() -> None:
    a, b = ScriptedEndpoint('a'), ScriptedEndpoint('b')
    dispatcher = CloudDispatcher([a, b], {'a': 10, 'b': 10}, hedge_after_s=0.05)
    outcomes = Outcomes()
    try:
        plan = send(dispatcher, outcomes, 'f1', timeout_s=1.0)
        hedge = a if plan.hedges[0][0] == 'a' else b
        assert hedge.started.wait(5.0), 'the hedge was never sent'
        assert 0 < hedge.calls[0].timeout_s <= 0.95
        hedge.calls[0].finish()
        primary = b if hedge is a else a
        primary.calls[0].finish(False, 'DEADLINE_EXCEEDED')
        replies = outcomes.wait_for('f1', 2)
        assert replies[hedge.name].ok and not replies[primary.name].ok
        assert dispatcher.stats().hedged == 1 and dispatcher.stats().sent == 2
    finally:
        dispatcher.stop()


def test_a_failed_primary_is_hedged_at_once() -> None:
    a, b = ScriptedEndpoint('a'), ScriptedEndpoint('b')
    dispatcher = CloudDispatcher([a, b], {'a': 10, 'b': 10}, hedge_after_s=60.0)
    outcomes = Outcomes()
    try:
        plan = send(dispatcher, outcomes, 'f1')
        primary, hedge = (a, b) if plan.primaries == ('a',) else (b, a)
        primary.calls[0].finish(False, 'UNAVAILABLE: connection reset')
        assert hedge.started.wait(5.0), 'the failed primary was not backed up'
        hedge.calls[0].finish()
        assert outcomes.wait_for('f1', 2)[hedge.name].ok
    finally:
        dispatcher.stop()


def test_hedges_stay_within_the_budget_and_never_double_the_load() -> None:
    a, b = ScriptedEndpoint('a'), ScriptedEndpoint('b')
    ratio = 0.25
    dispatcher = CloudDispatcher([a, b], {'a': 10, 'b': 10}, hedge_after_s=0.0,
                                 hedge_ratio=ratio, max_outstanding=1000)
    outcomes = Outcomes()
    frames = 40
    try:
        def hedge_done(sent_frames: int) -> bool:
            """Return whether the frame's hedge was denied, or granted and submitted."""
            stats = dispatcher.stats()  # a hedge is counted just before it is submitted
            return (stats.hedged + stats.hedges_denied >= sent_frames
                    and len(a.calls) + len(b.calls) >= sent_frames + stats.hedged)

        for i in range(frames):
            send(dispatcher, outcomes, f'f{i}')
            while not hedge_done(i + 1):
                b.started.wait(0.01)  # the hedge thread decides within milliseconds
            for call in a.open_calls() + b.open_calls():
                call.finish()
            outcomes.wait_for(f'f{i}', 2)
        stats = dispatcher.stats()
        assert stats.hedged + stats.hedges_denied == frames
        assert stats.hedged <= ratio * frames + HEDGE_BURST
        assert stats.hedged >= ratio * frames - 1, 'the budget was not spent'
        assert stats.sent == frames + stats.hedged
    finally:
        dispatcher.stop()


def test_a_hedge_is_denied_when_the_replica_is_at_capacity() -> None:
    a, b = ScriptedEndpoint('a'), ScriptedEndpoint('b')
    dispatcher = CloudDispatcher([a, b], {'a': 10, 'b': 10}, hedge_after_s=0.05,
                                 max_outstanding=1)
    outcomes = Outcomes()
    try:
        plan = send(dispatcher, outcomes, 'f1')
        hedge_name = plan.hedges[0][0]
        other = send(dispatcher, outcomes, 'f2')  # takes the hedge replica's only slot
        assert other.primaries == (hedge_name,) and other.hedges == ()
        replies = outcomes.wait_for('f1', 1)
        assert replies[hedge_name].error.startswith('SKIPPED')
        assert dispatcher.stats().hedges_denied == 1
    finally:
        dispatcher.stop()


def test_a_raising_submit_resolves_the_endpoint_and_frees_its_slot() -> None:
    class Broken(ScriptedEndpoint):
        def submit(self, *args: object, **kwargs: object) -> _Call:
            raise RuntimeError('channel closed')

    dispatcher = CloudDispatcher([Broken('a')], {'a': 10}, max_outstanding=1)
    outcomes = Outcomes()
    send(dispatcher, outcomes, 'f1')
    reply = outcomes.wait_for('f1', 1)['a']
    assert not reply.ok and 'channel closed' in reply.error
    assert dispatcher.stats().outstanding == {'a': 0}


def test_stop_resolves_hedges_not_yet_sent() -> None:
    a, b = ScriptedEndpoint('a'), ScriptedEndpoint('b')
    dispatcher = CloudDispatcher([a, b], {'a': 10, 'b': 10}, hedge_after_s=60.0)
    outcomes = Outcomes()
    plan = send(dispatcher, outcomes, 'f1')
    dispatcher.stop()
    assert outcomes.wait_for('f1', 1)[plan.hedges[0][0]].error.startswith('CANCELLED')


@pytest.mark.parametrize('kwargs', [{'max_outstanding': 0}, {'hedge_ratio': 1.0},
                                    {'hedge_ratio': -0.1}, {'hedge_after_s': -1.0}])
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CloudDispatcher([ScriptedEndpoint('a')], {'a': 10}, **kwargs)  # type: ignore[arg-type]


def test_in_flight_counts_every_call_and_idle_listeners_hear_the_last_one_end() -> None:
    a, b = ScriptedEndpoint('a'), ScriptedEndpoint('b')
    dispatcher = CloudDispatcher([a, b], {'a': 10, 'b': 5})
    idle: list[int] = []
    dispatcher.add_idle_listener(lambda: idle.append(dispatcher.in_flight()))
    dispatcher.add_idle_listener(lambda: 1 / 0)  # a failing listener costs no frame
    outcomes = Outcomes()
    assert dispatcher.in_flight() == 0
    send(dispatcher, outcomes, 'f1')
    assert dispatcher.in_flight() == 2
    a.calls[0].finish()
    assert dispatcher.in_flight() == 1 and idle == []
    b.calls[0].finish()
    assert dispatcher.in_flight() == 0 and idle == [0]
    assert set(outcomes.wait_for('f1', 2)) == {'a', 'b'}
