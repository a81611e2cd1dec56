"""
Adaptive uplink: per frame, the best JPEG quality and scale that can still reach the cloud in time.

Per endpoint, the network part of a call (the client's round trip less the server's reported
queue and inference time) is modelled as ``rtt + bytes / throughput`` and fitted by weighted
least squares to the endpoint's recent calls (a window of ``window`` calls, each weighing half as
much per ``half_life_s`` it is older than the newest), so the estimate follows the link whichever
way it changes. The slope is pulled towards a prior throughput with the weight of one call
10 kB off the mean size: while the sizes sent hardly vary, the data cannot split time between
latency and bandwidth, and the prior does. A call that timed out is censored (its network part
took at least the time waited less the server's usual time): when that contradicts the model it
joins the fit of the slope only, as that bound plus one spread (about what such a call takes), so
it always lowers the throughput estimate; a timeout the model already predicted adds nothing, so
a burst of timeouts counts about once. Failures that are not
timeouts say nothing about the link and are ignored.

A frame's bytes at a rung are predicted from bytes per pixel: a prior per JPEG quality (measured
on the generated scenes) times a scene factor learned from every encode (fast: the scene changes)
times a per-rung correction (slow: what scaling does to the bytes per pixel). Encode time is
predicted from the seconds per encoded pixel of recent encodes.

A rung fits an endpoint when encode + rtt + bytes / throughput + server time + ``margin_s`` +
``margin_sigmas`` times the spread of recent round trips about the model is within the time left.
When no rung fits, the smallest still goes out while its expected time (no margin, less
``skip_sigmas`` spreads) is within the time left: the margin picks the rung, and a frame is only
skipped when it is expected to arrive late. A skipped frame is sent anyway, at the smallest rung,
when nothing has been sent for ``probe_interval_s`` (a probe): without probes a link that looked
too slow once would never be measured again.
"""
from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
import math
import threading
import time
from typing import Callable, NamedTuple, Sequence


@dataclass(frozen=True)
class Encoding:
    """How a frame is encoded for the cloud (the arguments of ``codec.encode_frame``)."""

    jpeg_quality: int  # 1..100
    max_image_side: int  # longer side cap in pixels; 0 = full size

    def __post_init__(self) -> None:
        """Reject settings ``codec.encode_frame`` would refuse."""
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f'jpeg_quality must be in 1..100, got {self.jpeg_quality}')
        if self.max_image_side < 0:
            raise ValueError(f'max_image_side must be >= 0, got {self.max_image_side}')

    def encoded_pixels(self, width: int, height: int) -> int:
        """Return the pixel count of a ``width`` x ``height`` frame encoded this way."""
        longer = max(width, height)
        if 0 < self.max_image_side < longer:
            scale = self.max_image_side / longer
            return max(1, round(width * scale)) * max(1, round(height * scale))
        return width * height


# Best first. Lowering the quality from 80 to 60 saves about a third of the bytes while keeping
# every object's edges; below that, scaling saves more per step than quality does (a 320 px frame
# at quality 40 is a fifth of full size at 80 on a 640x480 scene) and quality 40 is the floor.
# The 960 rung serves 1080p cameras; on smaller frames it equals the one above it.
DEFAULT_LADDER: tuple[Encoding, ...] = (
    Encoding(80, 0), Encoding(60, 0), Encoding(60, 960), Encoding(50, 640), Encoding(50, 480),
    Encoding(40, 320))

# Median JPEG bytes per pixel of 8 generated 640x480 scenes at full size (4:2:0, simplejpeg).
PRIOR_BYTES_PER_PIXEL: tuple[tuple[int, float], ...] = (
    (1, 0.019), (10, 0.026), (20, 0.032), (30, 0.039), (40, 0.045), (50, 0.051), (60, 0.057),
    (70, 0.068), (80, 0.089), (90, 0.143), (95, 0.219), (100, 0.570))
_PRIOR_QUALITIES = tuple(quality for quality, _ in PRIOR_BYTES_PER_PIXEL)
PRIOR_ENCODE_S_PER_PIXEL = 1.7e-9  # simplejpeg here, 640x480 and 1920x1080 alike
DEFAULT_THROUGHPUT_BYTES_PER_S = 1e6  # slope prior when none is given: an 8 Mbit/s uplink
SLOPE_PRIOR_WEIGHT = 1e8  # bytes^2: one call 10 kB off the mean size
MAX_THROUGHPUT_BYTES_PER_S = 1.25e9  # 10 Gbit/s: the slope never reaches 0 or goes negative
SCENE_RATE = 0.3  # EWMA rate of the scene factor and the encode time, per encode
RUNG_RATE = 0.05  # EWMA rate of a rung's correction, per encode at that rung


@dataclass(frozen=True)
class LinkEstimate:
    """What an endpoint's link is assumed to be before its first call."""

    rtt_s: float
    throughput_bytes_per_s: float
    server_s: float

    def __post_init__(self) -> None:
        """Reject estimates no link has."""
        _check_seconds('rtt_s', self.rtt_s)
        _check_seconds('server_s', self.server_s)
        if not (self.throughput_bytes_per_s > 0 and math.isfinite(self.throughput_bytes_per_s)):
            raise ValueError(
                f'throughput_bytes_per_s must be positive, got {self.throughput_bytes_per_s}')


class _Call(NamedTuple):
    at_s: float  # when it ended, on the uplink's clock
    nbytes: int
    network_s: float  # censored: the lower bound plus one spread
    server_s: float
    censored: bool


class _LinkModel:
    """One endpoint: ``network_s = rtt_s + nbytes * s_per_byte``, refitted on every call."""

    def __init__(self, prior: LinkEstimate | None, window: int, half_life_s: float) -> None:
        self._calls: deque[_Call] = deque(maxlen=window)
        self._half_life_s = half_life_s
        throughput = prior.throughput_bytes_per_s if prior else DEFAULT_THROUGHPUT_BYTES_PER_S
        self._prior_s_per_byte = 1 / throughput
        self.rtt_s = prior.rtt_s if prior else 0.0
        self.s_per_byte = self._prior_s_per_byte
        self.server_s = prior.server_s if prior else 0.0
        self.spread_s = 0.0

    @property
    def samples(self) -> int:
        return len(self._calls)

    def network_s(self, nbytes: float) -> float:
        return self.rtt_s + nbytes * self.s_per_byte

    def add(self, call: _Call) -> None:
        self._calls.append(call)
        self._fit()

    def _fit(self) -> None:
        newest = max(call.at_s for call in self._calls)
        weighted = [(0.5 ** ((newest - call.at_s) / self._half_life_s), call)
                    for call in self._calls]
        measured = [(w, call) for w, call in weighted if not call.censored]
        prior_b, lam = self._prior_s_per_byte, SLOPE_PRIOR_WEIGHT
        rtt_s, server_s = self.rtt_s, self.server_s  # kept while only censored calls remain
        if measured:
            total = sum(w for w, _ in measured)
            mean_x = sum(w * call.nbytes for w, call in measured) / total
            mean_y = sum(w * call.network_s for w, call in measured) / total
            server_s = sum(w * call.server_s for w, call in measured) / total
            sxx = sum(w * (call.nbytes - mean_x) ** 2 for w, call in measured)
            sxy = sum(w * (call.nbytes - mean_x) * (call.network_s - mean_y)
                      for w, call in measured)
            rtt_s = max(0.0, mean_y - (sxy + lam * prior_b) / (sxx + lam) * mean_x)
        # The slope through that intercept, with the censored calls the model contradicts: the
        # same ridge fit as above when there are none, and steeper with each one there is.
        numerator = lam * prior_b + sum(w * call.nbytes * (call.network_s - rtt_s)
                                        for w, call in weighted)
        denominator = lam + sum(w * call.nbytes ** 2 for w, call in weighted)
        self.rtt_s, self.server_s = rtt_s, server_s
        self.s_per_byte = max(numerator / denominator, 1 / MAX_THROUGHPUT_BYTES_PER_S)
        if measured:
            self.spread_s = math.sqrt(sum(
                w * (call.network_s + call.server_s - self.network_s(call.nbytes) - server_s) ** 2
                for w, call in measured) / total)


class _SizeModel:
    """Bytes and encode time of a frame at a rung, learned from real encodes."""

    def __init__(self) -> None:
        self._scene = 1.0
        self._rung: dict[Encoding, float] = {}
        self._encode_s_per_pixel = PRIOR_ENCODE_S_PER_PIXEL

    def nbytes(self, encoding: Encoding, pixels: int) -> float:
        return (prior_bytes_per_pixel(encoding.jpeg_quality) * pixels * self._scene
                * self._rung.get(encoding, 1.0))

    def encode_s(self, pixels: int) -> float:
        return self._encode_s_per_pixel * pixels

    def learn(self, encoding: Encoding, pixels: int, nbytes: int, encode_s: float) -> None:
        observed = nbytes / (prior_bytes_per_pixel(encoding.jpeg_quality) * pixels)
        rung = self._rung.get(encoding, 1.0)
        self._scene += SCENE_RATE * (observed / rung - self._scene)
        self._rung[encoding] = rung + RUNG_RATE * (observed / self._scene - rung)
        self._encode_s_per_pixel += SCENE_RATE * (encode_s / pixels - self._encode_s_per_pixel)


def prior_bytes_per_pixel(jpeg_quality: int) -> float:
    """Return the prior bytes per pixel at ``jpeg_quality``, interpolated in the measured table."""
    index = min(max(bisect_right(_PRIOR_QUALITIES, jpeg_quality), 1), len(_PRIOR_QUALITIES) - 1)
    (q0, b0), (q1, b1) = PRIOR_BYTES_PER_PIXEL[index - 1], PRIOR_BYTES_PER_PIXEL[index]
    return b0 + (b1 - b0) * (jpeg_quality - q0) / (q1 - q0)


class AdaptiveUplink:
    """
    Chooses each frame's encoding from what recent calls say about each endpoint's link.

    Thread-safe: the engine chooses on its frame thread while replies arrive on others.
    """

    def __init__(self, ladder: Sequence[Encoding] = DEFAULT_LADDER, *,
                 clock: Callable[[], float] = time.monotonic, probe_interval_s: float = 1.0,
                 margin_s: float = 0.005, margin_sigmas: float = 0.5, skip_sigmas: float = 0.0,
                 half_life_s: float = 2.0,
                 window: int = 64, prior: LinkEstimate | None = None) -> None:
        """
        Adapt over ``ladder`` (best first); see the module docstring for the model.

        Without a ``prior`` an endpoint with no calls yet gets the best rung: its first calls
        measure it. ``probe_interval_s`` bounds how often a frame is sent when none fits.
        """
        self._ladder = tuple(ladder)
        if not self._ladder or not all(isinstance(rung, Encoding) for rung in self._ladder):
            raise ValueError(f'ladder must be a non-empty sequence of Encoding, got {ladder!r}')
        for name, value in (('probe_interval_s', probe_interval_s), ('margin_s', margin_s),
                            ('margin_sigmas', margin_sigmas), ('skip_sigmas', skip_sigmas)):
            _check_seconds(name, value)
        if not (half_life_s > 0 and math.isfinite(half_life_s)):
            raise ValueError(f'half_life_s must be positive, got {half_life_s}')
        if window < 2:
            raise ValueError(f'window must be at least 2 calls, got {window}')
        self._clock = clock
        self._probe_interval_s = probe_interval_s
        self._margin_s = margin_s
        self._margin_sigmas = margin_sigmas
        self._skip_sigmas = skip_sigmas
        self._half_life_s = half_life_s
        self._window = window
        self._prior = prior
        self._links: dict[str, _LinkModel] = {}
        self._sizes = _SizeModel()
        self._last_send_s = -math.inf
        self._lock = threading.Lock()
        self.probes = 0  # frames sent although no rung fitted

    @property
    def ladder(self) -> tuple[Encoding, ...]:
        """Return the rungs, best first."""
        return self._ladder

    def choose(self, endpoints: Sequence[str], width: int, height: int,
               time_left_s: float) -> Encoding | None:
        """
        Return the best rung predicted to arrive in time at one of ``endpoints``, else None.

        None also when there is no endpoint or no time left; a probe (the smallest rung) when
        nothing fits and nothing was sent for ``probe_interval_s``.
        """
        _check_frame(width, height)
        if math.isnan(time_left_s):
            raise ValueError('time_left_s must be a number, got nan')
        if not endpoints or time_left_s <= 0:
            return None
        with self._lock:
            now = self._clock()
            choice = self._best_fitting(endpoints, width, height, time_left_s)
            if choice is None and now - self._last_send_s >= self._probe_interval_s:
                choice = self._ladder[-1]
                self.probes += 1
            if choice is not None:
                self._last_send_s = now
            return choice

    def predicted_s(self, endpoint: str, encoding: Encoding, width: int, height: int) -> float:
        """Return the predicted encode + call time, margin included (0: nothing known)."""
        _check_frame(width, height)
        with self._lock:
            link = self._link(endpoint)
            return 0.0 if link is None else self._predicted_s(link, encoding, width, height)

    def sent(self, encoding: Encoding, width: int, height: int, nbytes: int,
             encode_s: float) -> None:
        """Learn from one real encode of a ``width`` x ``height`` frame."""
        _check_frame(width, height)
        _check_bytes(nbytes)
        _check_seconds('encode_s', encode_s)
        with self._lock:
            self._sizes.learn(encoding, encoding.encoded_pixels(width, height), nbytes, encode_s)

    def replied(self, endpoint: str, nbytes: int, round_trip_s: float, server_s: float) -> None:
        """
        Learn from a successful call of ``nbytes`` bytes.

        ``server_s`` comes from the server and is not trusted: NaN or negative counts as 0, more
        than the round trip as the whole round trip.
        """
        _check_bytes(nbytes)
        _check_seconds('round_trip_s', round_trip_s)
        server_s = min(server_s, round_trip_s) if server_s > 0 else 0.0
        with self._lock:
            self._model(endpoint).add(_Call(self._clock(), nbytes, round_trip_s - server_s,
                                            server_s, False))

    def failed(self, endpoint: str, nbytes: int, waited_s: float, timed_out: bool) -> None:
        """Learn from a failed call: a timeout bounds the link's speed, other failures do not."""
        _check_bytes(nbytes)
        _check_seconds('waited_s', waited_s)
        if not timed_out:
            return
        with self._lock:
            link = self._model(endpoint)
            at_least_s = max(0.0, waited_s - link.server_s)
            if at_least_s > link.network_s(nbytes):
                # What a call took given it took longer than at_least_s: roughly one spread more.
                link.add(_Call(self._clock(), nbytes, at_least_s + link.spread_s, 0.0, True))

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Return each measured endpoint's estimates, for diagnostics."""
        with self._lock:
            return {endpoint: {'rtt_ms': link.rtt_s * 1e3,
                               'throughput_kbps': 8 / link.s_per_byte / 1e3,
                               'server_ms': link.server_s * 1e3,
                               'spread_ms': link.spread_s * 1e3,
                               'samples': float(link.samples)}
                    for endpoint, link in self._links.items()}

    def _best_fitting(self, endpoints: Sequence[str], width: int, height: int,
                      time_left_s: float) -> Encoding | None:
        for encoding in self._ladder:
            for endpoint in endpoints:
                link = self._link(endpoint)
                if link is None or self._predicted_s(link, encoding, width,
                                                     height) <= time_left_s:
                    return encoding
        smallest = self._ladder[-1]
        for endpoint in endpoints:
            link = self._link(endpoint)
            if link and (self._predicted_s(link, smallest, width, height, False)
                         - self._skip_sigmas * link.spread_s) <= time_left_s:
                return smallest
        return None

    def _predicted_s(self, link: _LinkModel, encoding: Encoding, width: int, height: int,
                     margin: bool = True) -> float:
        pixels = encoding.encoded_pixels(width, height)
        expected_s = (self._sizes.encode_s(pixels) + link.server_s
                      + link.network_s(self._sizes.nbytes(encoding, pixels)))
        return expected_s + margin * (self._margin_s + self._margin_sigmas * link.spread_s)

    def _link(self, endpoint: str) -> _LinkModel | None:
        """Return the endpoint's model; None when it has no calls and there is no prior."""
        link = self._links.get(endpoint)
        if link is None and self._prior is not None:
            link = self._model(endpoint)
        return link

    def _model(self, endpoint: str) -> _LinkModel:
        link = self._links.get(endpoint)
        if link is None:
            link = self._links[endpoint] = _LinkModel(self._prior, self._window,
                                                      self._half_life_s)
        return link


def _check_seconds(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f'{name} must be a finite number >= 0, got {value}')


def _check_bytes(nbytes: int) -> None:
    if nbytes <= 0:
        raise ValueError(f'nbytes must be positive, got {nbytes}')


def _check_frame(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f'frame size must be positive, got {width}x{height}')
