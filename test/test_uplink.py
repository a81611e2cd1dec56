"""
The adaptive uplink: its fit, its choices, its probes, hostile input, and a simulated drive.

Every test drives the uplink with an injected clock; the simulation replays ``poor-lte`` and
``lte-drive`` delays from :class:`NetworkModel` with real JPEG sizes of a generated drive.
"""
from __future__ import annotations

from dataclasses import dataclass
import heapq
import math
import random

from hypothesis import given, HealthCheck, settings, strategies as st
import numpy as np
import pytest
from speculative_av.cloud.codec import encode_frame
from speculative_av.core.uplink import (
    AdaptiveUplink, DEFAULT_LADDER, DEFAULT_THROUGHPUT_BYTES_PER_S, Encoding, LinkEstimate,
    MAX_THROUGHPUT_BYTES_PER_S, prior_bytes_per_pixel, PRIOR_ENCODE_S_PER_PIXEL, RUNG_RATE,
    SCENE_RATE, SLOPE_PRIOR_WEIGHT)
from speculative_av.netem.profiles import load_profiles, NetworkModel
from speculative_av.scenes import render_drive

BEST, SMALLEST = DEFAULT_LADDER[0], DEFAULT_LADDER[-1]
PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def uplink(**options) -> tuple[AdaptiveUplink, Clock]:
    clock = Clock()
    return AdaptiveUplink(clock=clock, **options), clock


def ridge_fit(calls: list[tuple[float, int, float]], half_life_s: float = 2.0,
              prior_s_per_byte: float = 1 / DEFAULT_THROUGHPUT_BYTES_PER_S
              ) -> tuple[float, float]:
    """Fit ``network_s = a + b * nbytes`` with numpy to (at_s, nbytes, network_s) calls."""
    newest = max(at for at, _, _ in calls)
    rows, targets = [], []
    for at, nbytes, network_s in calls:
        root_w = math.sqrt(0.5 ** ((newest - at) / half_life_s))
        rows.append([root_w, root_w * nbytes])
        targets.append(root_w * network_s)
    rows.append([0.0, math.sqrt(SLOPE_PRIOR_WEIGHT)])
    targets.append(math.sqrt(SLOPE_PRIOR_WEIGHT) * prior_s_per_byte)
    (a, b), *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    return float(a), float(b)


def test_encoded_pixels_match_what_the_codec_sends():
    for width, height in ((640, 480), (480, 640), (1920, 1080), (33, 7), (3, 2000)):
        image = np.zeros((height, width, 3), np.uint8)
        for encoding in DEFAULT_LADDER + (Encoding(50, 1), Encoding(50, 640)):
            frame = encode_frame(image, jpeg_quality=encoding.jpeg_quality,
                                 max_image_side=encoding.max_image_side)
            assert encoding.encoded_pixels(width, height) == frame.width * frame.height


@pytest.mark.parametrize('quality, side, message', [
    (0, 0, 'jpeg_quality must be in 1..100, got 0'), (101, 0, 'got 101'),
    (80, -1, 'max_image_side must be >= 0, got -1')])
def test_encodings_codec_would_refuse_are_refused(quality, side, message):
    with pytest.raises(ValueError, match=message):
        Encoding(quality, side)
    assert Encoding(1, 0).jpeg_quality == 1 and Encoding(100, 0).jpeg_quality == 100


def test_prior_bytes_per_pixel_interpolates_the_measured_table():
    assert prior_bytes_per_pixel(80) == 0.089
    assert prior_bytes_per_pixel(1) == 0.019 and prior_bytes_per_pixel(100) == 0.570
    assert prior_bytes_per_pixel(85) == pytest.approx((0.089 + 0.143) / 2)
    assert prior_bytes_per_pixel(5) == pytest.approx(0.019 + 0.007 * 4 / 9)
    assert prior_bytes_per_pixel(99) == pytest.approx(0.219 + (0.570 - 0.219) * 4 / 5)


def test_before_any_call_the_best_rung_goes_to_every_endpoint():
    up, _ = uplink()
    assert up.choose(['a', 'b'], 640, 480, 0.001) == BEST
    assert up.predicted_s('a', BEST, 640, 480) == 0.0
    assert up.snapshot() == {} and up.probes == 0


def test_a_prior_decides_until_calls_say_otherwise():
    slow = LinkEstimate(rtt_s=0.1, throughput_bytes_per_s=100e3, server_s=0.1)
    up, _ = uplink(prior=slow, margin_s=0.0, probe_interval_s=100)
    pixels = 640 * 480
    expected = (PRIOR_ENCODE_S_PER_PIXEL * pixels + 0.1 + 0.1
                + prior_bytes_per_pixel(80) * pixels / 100e3)
    predicted = up.predicted_s('a', BEST, 640, 480)
    assert predicted == pytest.approx(expected)
    assert up.choose(['a'], 640, 480, predicted) == BEST
    assert up.choose(['a'], 640, 480, predicted * 0.999) == DEFAULT_LADDER[1]
    assert up.snapshot()['a'] == {'rtt_ms': pytest.approx(100),
                                  'throughput_kbps': pytest.approx(800),
                                  'server_ms': pytest.approx(100), 'spread_ms': 0.0,
                                  'samples': 0.0}


def test_the_fit_is_a_ridge_regression_of_recent_calls():
    up, clock = uplink()
    calls = []
    for index, nbytes in enumerate((5_000, 30_000, 12_000, 20_000, 8_000)):
        clock.now = 0.1 * index
        network_s = 0.08 + nbytes / 400e3 + 0.003 * (-1) ** index
        up.replied('cloud', nbytes, network_s + 0.05 + 0.01 * index, 0.05 + 0.01 * index)
        calls.append((clock.now, nbytes, network_s))
    a, b = ridge_fit(calls)
    weights = [0.5 ** ((0.4 - at) / 2.0) for at, _, _ in calls]
    server = sum(w * (0.05 + 0.01 * i) for i, w in enumerate(weights)) / sum(weights)
    spread = math.sqrt(sum(w * (y + 0.01 * i - a - b * x - (server - 0.05)) ** 2
                           for i, (w, (_, x, y)) in enumerate(zip(weights, calls)))
                       / sum(weights))
    snap = up.snapshot()['cloud']
    assert snap['rtt_ms'] == pytest.approx(a * 1e3, rel=1e-9)
    assert snap['throughput_kbps'] == pytest.approx(8 / b / 1e3, rel=1e-9)
    assert snap['server_ms'] == pytest.approx(server * 1e3, rel=1e-9)
    assert snap['spread_ms'] == pytest.approx(spread * 1e3, rel=1e-6)
    assert snap['samples'] == 5
    # near the link's 80 ms and 3200 kbit/s; the prior (8000 kbit/s) pulls a little on 5 calls
    assert 80 < snap['rtt_ms'] < 90 and 3200 < snap['throughput_kbps'] < 4200, snap


def test_equal_sizes_leave_the_split_to_the_prior_slope():
    up, clock = uplink(prior=LinkEstimate(0.0, 500e3, 0.0))
    for index in range(10):
        clock.now = index * 0.1
        up.replied('cloud', 10_000, 0.12, 0.02)
    snap = up.snapshot()['cloud']
    assert snap['throughput_kbps'] == pytest.approx(4000)
    assert snap['rtt_ms'] == pytest.approx(100 - 20)
    assert snap['server_ms'] == pytest.approx(20) and snap['spread_ms'] == pytest.approx(0)


def test_a_negative_intercept_is_clamped_and_the_slope_refitted_through_zero():
    up, clock = uplink()
    calls = [(0.0, 10_000, 0.001), (0.1, 20_000, 0.3)]
    for at, nbytes, network_s in calls:
        clock.now = at
        up.replied('cloud', nbytes, network_s, 0.0)
    assert ridge_fit(calls)[0] < 0
    snap = up.snapshot()['cloud']
    assert snap['rtt_ms'] == 0.0
    weights = (0.5 ** 0.05, 1.0)
    numerator = SLOPE_PRIOR_WEIGHT / DEFAULT_THROUGHPUT_BYTES_PER_S + sum(
        w * x * y for w, (_, x, y) in zip(weights, calls))
    denominator = SLOPE_PRIOR_WEIGHT + sum(w * x * x for w, (_, x, _) in zip(weights, calls))
    assert snap['throughput_kbps'] == pytest.approx(8 / (numerator / denominator) / 1e3)


def test_throughput_is_capped_when_calls_claim_bytes_cost_nothing():
    up, clock = uplink()
    for index, nbytes in enumerate((1_000, 1_000_000)):
        clock.now = index
        up.replied('cloud', nbytes, 0.2 if index == 0 else 0.05, 0.0)
    assert up.snapshot()['cloud']['throughput_kbps'] == pytest.approx(
        MAX_THROUGHPUT_BYTES_PER_S * 8 / 1e3)


def feed(up: AdaptiveUplink, clock: Clock, start_s: float, seconds: float, rtt_s: float,
         bytes_per_s: float) -> None:
    """Reply at 10 Hz as a link of ``rtt_s`` and ``bytes_per_s``, sizes alternating."""
    for index in range(round(seconds * 10)):
        clock.now = start_s + index / 10
        nbytes = 5_000 if index % 2 else 25_000
        up.replied('cloud', nbytes, rtt_s + nbytes / bytes_per_s + 0.1, 0.1)


def test_the_estimate_follows_the_link_down_and_back_up():
    up, clock = uplink()
    feed(up, clock, 0, 10, 0.05, 2.5e6)
    assert up.snapshot()['cloud']['rtt_ms'] == pytest.approx(50, abs=1)
    assert up.choose(['cloud'], 640, 480, 0.3) == BEST
    feed(up, clock, 10, 1, 0.15, 250e3)
    assert 60 < up.snapshot()['cloud']['rtt_ms'] < 140  # on the way, after one second
    feed(up, clock, 11, 6, 0.15, 250e3)  # the window now holds only the slow link
    degraded = up.snapshot()['cloud']
    assert degraded['rtt_ms'] == pytest.approx(150, abs=3)
    assert degraded['throughput_kbps'] == pytest.approx(2000, rel=0.05)
    assert up.choose(['cloud'], 640, 480, 0.3) == Encoding(50, 480)
    assert up.choose(['cloud'], 640, 480, 0.28) == SMALLEST
    feed(up, clock, 17, 7, 0.05, 2.5e6)
    assert up.snapshot()['cloud']['rtt_ms'] == pytest.approx(50, abs=1)
    assert up.choose(['cloud'], 640, 480, 0.3) == BEST


def test_older_calls_weigh_half_per_half_life_and_the_window_forgets():
    up, clock = uplink(half_life_s=1.0, window=3, prior=LinkEstimate(0, 1e6, 0))
    for at, network_s in ((0.0, 0.5), (0.0, 0.1), (1.0, 0.1), (2.0, 0.2)):
        clock.now = at
        up.replied('cloud', 10_000, network_s, 0.0)
    # (0.1 at weight 1/4 + 0.1 at weight 1/2 + 0.2 at weight 1) / 1.75; the 0.5 left the window
    assert up.snapshot()['cloud']['rtt_ms'] == pytest.approx(
        (0.025 + 0.05 + 0.2) / 1.75 * 1e3 - 10)
    assert up.snapshot()['cloud']['samples'] == 3


def test_a_timeout_lowers_the_throughput_and_a_predicted_one_adds_nothing():
    up, clock = uplink()
    feed(up, clock, 0, 2, 0.05, 1e6)
    before = up.snapshot()['cloud']
    clock.now = 2.0
    up.failed('cloud', 5_000, 0.3, timed_out=True)
    after = up.snapshot()['cloud']
    assert after['throughput_kbps'] < before['throughput_kbps'] * 0.9
    assert after['rtt_ms'] == before['rtt_ms'] and after['samples'] == before['samples'] + 1
    predicted = up.predicted_s('cloud', SMALLEST, 640, 480)
    up.failed('cloud', 5_000, 0.1, timed_out=True)  # the model expects longer: nothing new
    up.failed('cloud', 25_000, 5.0, timed_out=False)  # an error says nothing about speed
    assert up.snapshot()['cloud'] == after
    assert up.predicted_s('cloud', SMALLEST, 640, 480) == predicted


def test_a_censored_call_counts_as_its_bound_plus_one_spread():
    up, clock = uplink(prior=LinkEstimate(0.1, 1e6, 0.05))
    up.failed('cloud', 10_000, 0.25, timed_out=True)  # network at least 0.2 s, no spread yet
    slope = (SLOPE_PRIOR_WEIGHT * 1e-6 + 1e4 * (0.2 - 0.1)) / (SLOPE_PRIOR_WEIGHT + 1e8)
    assert up.snapshot()['cloud']['throughput_kbps'] == pytest.approx(8 / slope / 1e3)
    assert up.snapshot()['cloud']['rtt_ms'] == pytest.approx(100)
    assert up.snapshot()['cloud']['server_ms'] == pytest.approx(50)

    up, clock = uplink()
    up.replied('cloud', 10_000, 0.1, 0.0)
    up.replied('cloud', 10_000, 0.2, 0.0)
    spread = up.snapshot()['cloud']['spread_ms'] / 1e3
    assert spread == pytest.approx(0.05)
    rtt = up.snapshot()['cloud']['rtt_ms'] / 1e3
    up.failed('cloud', 10_000, 0.4, timed_out=True)
    weighted = [(1e4, 0.1), (1e4, 0.2), (1e4, 0.4 + spread)]
    slope = ((SLOPE_PRIOR_WEIGHT * 1e-6 + sum(x * (y - rtt) for x, y in weighted))
             / (SLOPE_PRIOR_WEIGHT + 3e8))
    assert up.snapshot()['cloud']['throughput_kbps'] == pytest.approx(8 / slope / 1e3)


def test_only_censored_calls_keep_the_last_latency_and_server_time():
    up, clock = uplink()
    up.replied('cloud', 10_000, 0.2, 0.05)
    before = up.snapshot()['cloud']
    up2, _ = uplink(window=2)
    up2.replied('cloud', 10_000, 0.2, 0.05)
    up2.failed('cloud', 10_000, 1.0, timed_out=True)
    up2.failed('cloud', 10_000, 5.0, timed_out=True)  # pushes the only reply out
    after = up2.snapshot()['cloud']
    assert after['rtt_ms'] == before['rtt_ms'] and after['server_ms'] == before['server_ms']
    assert after['samples'] == 2 and after['throughput_kbps'] < before['throughput_kbps']


def slow_link(up: AdaptiveUplink, clock: Clock, endpoint: str = 'cloud') -> None:
    for index in range(6):
        clock.now = index * 0.1
        nbytes = 2_000 + 4_000 * index
        up.replied(endpoint, nbytes, 0.4 + nbytes / 1e6, 0.1)


def test_when_nothing_fits_only_a_rate_limited_probe_is_sent():
    up, clock = uplink(probe_interval_s=2.0)
    slow_link(up, clock)
    clock.now = 1.0
    assert up.choose(['cloud'], 640, 480, 0.3) == SMALLEST and up.probes == 1
    clock.now = 2.999
    assert up.choose(['cloud'], 640, 480, 0.3) is None
    clock.now = 3.0
    assert up.choose(['cloud'], 640, 480, 0.3) == SMALLEST and up.probes == 2
    assert up.choose(['cloud'], 640, 480, 0.3) is None and up.probes == 2


def test_a_frame_sent_postpones_the_next_probe_and_no_time_left_sends_nothing():
    up, clock = uplink(probe_interval_s=2.0)
    slow_link(up, clock)
    clock.now = 1.0
    assert up.choose(['cloud'], 640, 480, 10.0) == BEST  # fits: a send, not a probe
    clock.now = 2.5
    assert up.choose(['cloud'], 640, 480, 0.3) is None
    assert up.choose(['cloud'], 640, 480, 0.0) is None
    assert up.choose(['cloud'], 640, 480, -1.0) is None
    assert up.choose([], 640, 480, 10.0) is None
    clock.now = 3.0
    assert up.choose(['cloud'], 640, 480, 0.3) == SMALLEST and up.probes == 1


def test_the_smallest_rung_goes_out_when_only_the_margin_is_missing():
    up, clock = uplink(margin_s=0.0, margin_sigmas=1.0, probe_interval_s=100)
    up.replied('cloud', 10_000, 0.1, 0.0)
    up.replied('cloud', 10_000, 0.2, 0.0)  # spread 50 ms
    expected = up.predicted_s('cloud', SMALLEST, 640, 480) - 0.05
    up.choose(['cloud'], 640, 480, 0.0001)  # spend the first probe
    assert up.choose(['cloud'], 640, 480, expected) == SMALLEST
    assert up.choose(['cloud'], 640, 480, expected - 0.001) is None
    lenient, clock = uplink(margin_s=0.0, margin_sigmas=1.0, skip_sigmas=0.5,
                            probe_interval_s=100)
    lenient.replied('cloud', 10_000, 0.1, 0.0)
    lenient.replied('cloud', 10_000, 0.2, 0.0)
    lenient.choose(['cloud'], 640, 480, 0.0001)
    assert lenient.choose(['cloud'], 640, 480, expected - 0.025) == SMALLEST
    assert lenient.choose(['cloud'], 640, 480, expected - 0.026) is None


def test_the_margin_is_fixed_seconds_plus_sigmas_of_spread():
    up, clock = uplink(margin_s=0.01, margin_sigmas=2.0)
    up.replied('cloud', 10_000, 0.1, 0.0)
    up.replied('cloud', 10_000, 0.2, 0.0)
    plain, _ = uplink(margin_s=0.0, margin_sigmas=0.0)
    plain.replied('cloud', 10_000, 0.1, 0.0)
    plain.replied('cloud', 10_000, 0.2, 0.0)
    for rung in DEFAULT_LADDER:
        assert up.predicted_s('cloud', rung, 640, 480) == pytest.approx(
            plain.predicted_s('cloud', rung, 640, 480) + 0.01 + 2 * 0.05)


def test_the_fastest_endpoint_decides_and_an_unknown_one_gets_the_best_rung():
    up, clock = uplink(probe_interval_s=100)
    slow_link(up, clock, 'slow')
    feed(up, clock, 1, 1, 0.02, 5e6)  # 'cloud' is fast
    assert up.choose(['slow', 'cloud'], 640, 480, 0.3) == BEST
    assert up.choose(['slow', 'new'], 640, 480, 0.3) == BEST
    up.choose(['slow'], 640, 480, 0.3)  # the first probe
    assert up.choose(['slow'], 640, 480, 0.3) is None


def test_rungs_are_tried_best_first_and_the_first_that_fits_wins():
    up, clock = uplink(margin_s=0.0, probe_interval_s=100,
                       prior=LinkEstimate(0.05, 200e3, 0.05))
    times = [up.predicted_s('cloud', rung, 640, 480) for rung in DEFAULT_LADDER]
    for index, rung in enumerate(DEFAULT_LADDER):
        if index and times[index] == times[index - 1]:
            continue  # the 960 rung equals the one above it on a 640x480 frame
        assert up.choose(['cloud'], 640, 480, times[index]) == rung


def test_sizes_follow_the_scene_and_each_rungs_own_bytes_per_pixel():
    up, clock = uplink(margin_s=0.0, prior=LinkEstimate(0.0, 1e6, 0.0))
    pixels = 640 * 480
    prior_bytes = prior_bytes_per_pixel(80) * pixels
    base = up.predicted_s('cloud', BEST, 640, 480) - PRIOR_ENCODE_S_PER_PIXEL * pixels
    assert base == pytest.approx(prior_bytes / 1e6)
    up.sent(BEST, 640, 480, round(2 * prior_bytes), 0.002)
    scene = 1 + SCENE_RATE * (2 * prior_bytes / prior_bytes - 1)
    rung = 1 + RUNG_RATE * (2 / scene - 1)
    encode = PRIOR_ENCODE_S_PER_PIXEL + SCENE_RATE * (0.002 / pixels - PRIOR_ENCODE_S_PER_PIXEL)
    assert up.predicted_s('cloud', BEST, 640, 480) == pytest.approx(
        encode * pixels + prior_bytes * scene * rung / 1e6, rel=1e-3)
    small = SMALLEST.encoded_pixels(640, 480)
    assert up.predicted_s('cloud', SMALLEST, 640, 480) == pytest.approx(
        encode * small + prior_bytes_per_pixel(40) * small * scene / 1e6, rel=1e-3)


def test_many_encodes_converge_on_the_real_size():
    up, clock = uplink(margin_s=0.0, prior=LinkEstimate(0.0, 1e6, 0.0))
    for _ in range(200):
        up.sent(SMALLEST, 640, 480, 7_000, 0.0)
        up.sent(BEST, 640, 480, 40_000, 0.0)
    assert up.predicted_s('cloud', SMALLEST, 640, 480) == pytest.approx(7_000 / 1e6, rel=0.02)
    assert up.predicted_s('cloud', BEST, 640, 480) == pytest.approx(40_000 / 1e6, rel=0.02)


NAN, INF = float('nan'), float('inf')


@pytest.mark.parametrize('call, message', [
    (lambda up: up.choose(['a'], 0, 480, 0.3), 'frame size must be positive, got 0x480'),
    (lambda up: up.choose(['a'], 640, -1, 0.3), 'got 640x-1'),
    (lambda up: up.choose(['a'], 640, 480, NAN), 'time_left_s must be a number'),
    (lambda up: up.predicted_s('a', BEST, 0, 0), 'got 0x0'),
    (lambda up: up.sent(BEST, 640, 480, 0, 0.001), 'nbytes must be positive, got 0'),
    (lambda up: up.sent(BEST, 640, 0, 100, 0.001), 'got 640x0'),
    (lambda up: up.sent(BEST, 640, 480, 100, -0.001), 'encode_s must be a finite number'),
    (lambda up: up.sent(BEST, 640, 480, 100, NAN), 'encode_s'),
    (lambda up: up.replied('a', -5, 0.1, 0.0), 'nbytes must be positive, got -5'),
    (lambda up: up.replied('a', 100, NAN, 0.0), 'round_trip_s must be a finite number'),
    (lambda up: up.replied('a', 100, INF, 0.0), 'round_trip_s'),
    (lambda up: up.replied('a', 100, -0.1, 0.0), 'round_trip_s'),
    (lambda up: up.failed('a', 0, 0.1, True), 'nbytes'),
    (lambda up: up.failed('a', 100, NAN, True), 'waited_s must be a finite number'),
    (lambda up: up.failed('a', 100, -1.0, False), 'waited_s'),
])
def test_impossible_local_measurements_raise_and_change_nothing(call, message):
    up, clock = uplink()
    with pytest.raises(ValueError, match=message):
        call(up)
    assert up.snapshot() == {} and up.choose(['a'], 640, 480, 0.001) == BEST


@pytest.mark.parametrize('options, message', [
    ({'ladder': ()}, 'non-empty sequence of Encoding'),
    ({'ladder': [(80, 0)]}, 'non-empty sequence of Encoding'),
    ({'probe_interval_s': -1.0}, 'probe_interval_s must be a finite number >= 0, got -1.0'),
    ({'margin_s': NAN}, 'margin_s'), ({'margin_sigmas': INF}, 'margin_sigmas'),
    ({'skip_sigmas': -0.5}, 'skip_sigmas'),
    ({'half_life_s': 0.0}, 'half_life_s must be positive, got 0.0'),
    ({'half_life_s': INF}, 'half_life_s'), ({'window': 1}, 'window must be at least 2'),
])
def test_impossible_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveUplink(**options)


@pytest.mark.parametrize('estimate, message', [
    ((-0.1, 1e6, 0.0), 'rtt_s'), ((0.1, 0.0, 0.0), 'throughput_bytes_per_s must be positive'),
    ((0.1, INF, 0.0), 'throughput_bytes_per_s'), ((0.1, 1e6, NAN), 'server_s')])
def test_impossible_priors_are_refused(estimate, message):
    with pytest.raises(ValueError, match=message):
        LinkEstimate(*estimate)


@pytest.mark.parametrize('reported, counted', [
    (NAN, 0.0), (-1.0, 0.0), (0.0, 0.0), (0.05, 0.05), (10.0, 0.2), (INF, 0.2)])
def test_server_reported_time_is_not_trusted_beyond_the_round_trip(reported, counted):
    up, clock = uplink()
    up.replied('cloud', 10_000, 0.2, reported)
    snap = up.snapshot()['cloud']
    assert snap['server_ms'] == pytest.approx(counted * 1e3)
    assert all(math.isfinite(value) and value >= 0 for value in snap.values())


def test_a_clock_that_steps_back_does_not_break_the_fit():
    up, clock = uplink()
    clock.now = 10.0
    up.replied('cloud', 10_000, 0.2, 0.0)
    clock.now = 0.0
    up.replied('cloud', 20_000, 0.3, 0.0)
    assert all(math.isfinite(value) for value in up.snapshot()['cloud'].values())


@dataclass(frozen=True)
class Event:
    """One thing that happens to an uplink, drawn by hypothesis."""

    gap_s: float
    endpoint: str
    nbytes: int
    seconds: float
    server_s: float
    kind: str


events = st.builds(
    Event, st.floats(0, 5), st.sampled_from(['a', 'b']), st.integers(1, 2_000_000),
    st.floats(0, 10), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(['replied', 'timeout', 'error', 'sent']))


def apply(up: AdaptiveUplink, clock: Clock, event: Event) -> None:
    clock.now += event.gap_s
    if event.kind == 'replied':
        up.replied(event.endpoint, event.nbytes, event.seconds, event.server_s)
    elif event.kind == 'sent':
        up.sent(DEFAULT_LADDER[event.nbytes % len(DEFAULT_LADDER)], 640, 480, event.nbytes,
                event.seconds / 100)
    else:
        up.failed(event.endpoint, event.nbytes, event.seconds, event.kind == 'timeout')


@PROPERTY
@given(st.lists(events, max_size=40), st.floats(-1, 5),
       st.lists(st.sampled_from('ab'), min_size=1, max_size=2))
def test_any_history_gives_sane_estimates_and_a_consistent_choice(history, time_left_s,
                                                                  endpoints):
    up, clock = uplink(probe_interval_s=1e9)
    for event in history:
        apply(up, clock, event)
    for snap in up.snapshot().values():
        assert all(math.isfinite(value) for value in snap.values()), snap
        assert snap['rtt_ms'] >= 0 and snap['server_ms'] >= 0 and snap['spread_ms'] >= 0
        assert 0 < snap['throughput_kbps'] <= MAX_THROUGHPUT_BYTES_PER_S * 8 / 1e3 * 1.000001
    times = [[up.predicted_s(e, rung, 640, 480) for e in endpoints] for rung in DEFAULT_LADDER]
    choice = up.choose(endpoints, 640, 480, time_left_s)
    if time_left_s <= 0:
        assert choice is None
        return
    fitting = [i for i, row in enumerate(times) if min(row) <= time_left_s]
    if fitting:
        assert choice == DEFAULT_LADDER[fitting[0]]
    else:
        assert choice == SMALLEST  # a send of the smallest rung, or the one probe allowed


@PROPERTY
@given(st.lists(events, max_size=30), st.integers(1, 2_000_000), st.floats(0, 10))
def test_a_timeout_never_speeds_the_link_up(history, nbytes, waited_s):
    """At the moment of the link's last call (later, ageing alone pulls towards the prior)."""
    up, clock = uplink()
    last_call_s = None
    for event in history:
        apply(up, clock, event)
        if event.endpoint == 'a' and event.kind in ('replied', 'timeout'):
            last_call_s = clock.now
    if last_call_s is not None:
        clock.now = last_call_s
    before = {rung: up.predicted_s('a', rung, 640, 480) for rung in DEFAULT_LADDER}
    throughput = up.snapshot().get('a', {}).get('throughput_kbps', math.inf)
    up.failed('a', nbytes, waited_s, timed_out=True)
    snap = up.snapshot().get('a')
    if snap is not None:
        assert snap['throughput_kbps'] <= throughput * (1 + 1e-9)
    if 'a' in {event.endpoint for event in history if event.kind != 'sent'}:
        for rung in DEFAULT_LADDER:
            assert up.predicted_s('a', rung, 640, 480) >= before[rung] - 1e-9


# -- A simulated drive: NetworkModel delays, real JPEG sizes, replies fed back in time order. --

FIXED = Encoding(80, 0)
RESPONSE_BYTES = 300


@pytest.fixture(scope='module')
def drive_sizes() -> list[dict[Encoding, tuple[int, float]]]:
    """Bytes and a deterministic encode time per rung for 20 frames of the evaluation drive."""
    sizes = []
    for scene in render_drive(11, 20):
        sizes.append({})
        for rung in set(DEFAULT_LADDER) | {FIXED}:
            nbytes = encode_frame(scene.image, jpeg_quality=rung.jpeg_quality,
                                  max_image_side=rung.max_image_side).nbytes
            sizes[-1][rung] = nbytes, PRIOR_ENCODE_S_PER_PIXEL * rung.encoded_pixels(640, 480)
    return sizes


def simulate(profile: str, sizes: list[dict[Encoding, tuple[int, float]]], adaptive: bool,
             frames: int, deadline_s: float = 0.3, fps: float = 10.0,
             seed: int = 0) -> dict[str, float]:
    """Race ``frames`` frames' cloud calls through ``profile``; return the figures."""
    network = NetworkModel(load_profiles()[profile], seed)
    server_times = random.Random(seed)  # about the README's server p50 140 ms, p95 189 ms
    clock = Clock()
    up = AdaptiveUplink(clock=clock)
    pending: list[tuple[float, int, str, tuple]] = []
    in_time = sent = total_bytes = 0
    for index in range(frames):
        start_s = index / fps
        while pending and pending[0][0] <= start_s:
            clock.now, _, kind, args = heapq.heappop(pending)
            getattr(up, kind)(*args)
        clock.now = start_s
        encoding = up.choose(['cloud'], 640, 480, deadline_s) if adaptive else FIXED
        server_s = max(0.05, server_times.gauss(0.14, 0.03))
        nbytes, encode_s = sizes[index % len(sizes)][encoding or FIXED]
        delay_s = network.request_delay_s(start_s + encode_s, nbytes, RESPONSE_BYTES)
        if encoding is None:  # skipped; the delay was drawn all the same, so draws stay paired
            continue
        up.sent(encoding, 640, 480, nbytes, encode_s)
        sent += 1
        total_bytes += nbytes
        time_left_s = deadline_s - encode_s
        if delay_s is None or delay_s + server_s > time_left_s:
            heapq.heappush(pending, (start_s + deadline_s, index, 'failed',
                                     ('cloud', nbytes, time_left_s, True)))
        else:
            in_time += 1
            heapq.heappush(pending, (start_s + encode_s + delay_s + server_s, index, 'replied',
                                     ('cloud', nbytes, delay_s + server_s, server_s)))
    return {'in_time': in_time / frames, 'sent': sent, 'bytes_per_frame': total_bytes / frames,
            'probes': up.probes}


@pytest.mark.parametrize('profile, frames', [('poor-lte', 1200), ('lte-drive', 1800)])
def test_adaptive_beats_fixed_quality_80_at_a_300_ms_deadline(profile, frames, drive_sizes):
    fixed = simulate(profile, drive_sizes, adaptive=False, frames=frames)
    adaptive = simulate(profile, drive_sizes, adaptive=True, frames=frames)
    for name, figures in (('fixed q80 full size', fixed), ('adaptive', adaptive)):
        print(f'{profile} 300 ms, {frames} frames at 10 Hz, {name}: cloud in time '
              f'{figures["in_time"]:.1%}, sent {figures["sent"]}, '
              f'{figures["bytes_per_frame"] / 1e3:.1f} kB per frame, probes {figures["probes"]}')
    assert adaptive['in_time'] > fixed['in_time']
    assert adaptive['bytes_per_frame'] < fixed['bytes_per_frame']
