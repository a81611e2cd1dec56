"""
Network conditions between vehicle and cloud: named profiles, traces, and the one delay model.

:class:`NetworkModel` drives both the live relay (:mod:`speculative_av.netem.relay`) and the
offline evaluation, so a deadline chosen offline is judged against the network the relay emulates.
Times are seconds since the relay (or the evaluation) started. A transfer is one message, or one
burst of bytes, in one direction; its one-way delay is the sum of

* propagation: half the round-trip time (``rtt_ms``, or the trace's value at that time);
* serialization: its bytes at the direction's bandwidth (``bandwidth_mbps`` or the trace's for
  the uplink, vehicle to cloud; ``downlink_mbps`` back; 0 means unlimited);
* jitter: a normal variation, standard deviation ``jitter_ms / sqrt(2)`` per direction so that a
  request/response exchange varies by ``jitter_ms``; it never makes a delay negative;
* a stall: with ``stall_probability`` the transfer waits ``stall_ms`` longer, as TCP does when a
  lost segment is only recovered by a retransmission timeout;

and during an outage window (``outages``, repeating every ``outage_period_s`` when that is set)
nothing is delivered at all, like a radio dead zone.

Not emulated: reordering and duplication (TCP hides them), loss inside a TCP stream other than
through stalls, congestion control (slow start, window growth), the TCP handshake, and rate
changes during one transfer (the bandwidth at its start applies throughout).

Trace files are CSV with the header ``t_s,rtt_ms,bandwidth_mbps``; blank lines and lines starting
with ``#`` are ignored. Times start at 0 and increase strictly; each row holds until the next, the
last one as long as the step before it, then the trace starts over (N rows 1 s apart loop every
N seconds). A trace sets the RTT and the uplink bandwidth (positive: use outages for dead zones).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, fields
import math
from pathlib import Path
import random
from typing import Any, Iterator, Literal, NamedTuple

from speculative_av.package_files import config_path
import yaml

PROFILES_FILE = 'network_profiles.yaml'
TRACE_HEADER = ('t_s', 'rtt_ms', 'bandwidth_mbps')

Direction = Literal['up', 'down']


class TraceRow(NamedTuple):
    """Network conditions from ``t_s`` on, until the next row of the trace."""

    t_s: float
    rtt_ms: float
    bandwidth_mbps: float


class Latency(NamedTuple):
    """The latency part of one transfer's delay (no serialization), in seconds."""

    propagation_s: float
    jitter_s: float  # never below -propagation_s
    stall_s: float

    @property
    def total_s(self) -> float:
        """Return the latency of the transfer."""
        return self.propagation_s + self.jitter_s + self.stall_s


@dataclass(frozen=True)
class NetworkProfile:
    """Named network conditions; see the module docstring for what each field does."""

    name: str
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbps: float = 0.0  # uplink, vehicle to cloud; 0 = unlimited
    downlink_mbps: float = 0.0  # cloud to vehicle; 0 = unlimited
    stall_probability: float = 0.0  # per transfer
    stall_ms: float = 0.0
    outages: tuple[tuple[float, float], ...] = ()  # (start_s, duration_s) windows
    outage_period_s: float = 0.0  # > 0: the windows repeat with this period
    trace: tuple[TraceRow, ...] = ()  # overrides rtt_ms and bandwidth_mbps when given

    def __post_init__(self) -> None:
        """Store sequences as tuples and reject impossible values with a ValueError."""
        object.__setattr__(self, 'outages', tuple(
            (float(start), float(duration)) for start, duration in self.outages))
        object.__setattr__(self, 'trace', tuple(TraceRow(*map(float, row)) for row in self.trace))
        for key in ('rtt_ms', 'jitter_ms', 'bandwidth_mbps', 'downlink_mbps', 'stall_ms',
                    'outage_period_s'):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f'profile {self.name!r}: {key} must be >= 0, got {value}')
        if not 0 <= self.stall_probability <= 1:
            raise ValueError(f'profile {self.name!r}: stall_probability must be in [0, 1], '
                             f'got {self.stall_probability}')
        for start, duration in self.outages:
            if start < 0 or duration <= 0:
                raise ValueError(f'profile {self.name!r}: outage ({start}, {duration}) needs '
                                 'start_s >= 0 and duration_s > 0')
            if self.outage_period_s and start + duration > self.outage_period_s:
                raise ValueError(f'profile {self.name!r}: outage ({start}, {duration}) does not '
                                 f'fit in outage_period_s {self.outage_period_s}')
        for index, row in enumerate(self.trace):
            problem = _trace_row_problem(row, self.trace[index - 1] if index else None)
            if problem:
                raise ValueError(f'profile {self.name!r}: trace row {index}: {problem}')


def load_profiles(path: str | Path | None = None) -> dict[str, NetworkProfile]:
    """
    Read the named profiles of a YAML file, by default the package's ``config/``.

    The file holds ``profiles: {NAME: {FIELD: VALUE, ...}, ...}``; a ``trace`` is the path of a
    trace file, relative to the YAML file's directory. Raises ValueError naming the profile and
    field on anything invalid.
    """
    path = Path(path) if path is not None else config_path(PROFILES_FILE)
    document = yaml.safe_load(path.read_text())
    entries = document.get('profiles') if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f'{path}: expected a non-empty "profiles:" mapping of names to fields')
    return {str(name): _profile_from_mapping(str(name), settings, path.parent)
            for name, settings in entries.items()}


def _profile_from_mapping(name: str, settings: Any, base: Path) -> NetworkProfile:
    known = {field.name for field in fields(NetworkProfile)} - {'name'}
    if not isinstance(settings, dict):
        raise ValueError(f'profile {name!r}: expected a mapping of fields, got {settings!r}')
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f'profile {name!r}: unknown field(s) {", ".join(map(str, unknown))}; '
                         f'known: {", ".join(sorted(known))}')
    values = dict(settings)
    if 'trace' in values:
        values['trace'] = load_trace(base / str(values['trace']))
    try:
        return NetworkProfile(name, **values)
    except TypeError as exc:  # a list where a number belongs, a window without a duration, ...
        raise ValueError(f'profile {name!r}: {exc}') from exc


def load_trace(path: str | Path) -> tuple[TraceRow, ...]:
    """Read a trace CSV (format in the module docstring); raise ValueError with file:line."""
    path = Path(path)
    rows: list[TraceRow] = []
    header_seen = False
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        line = text.strip()
        if not line or line.startswith('#'):
            continue
        cells = tuple(cell.strip() for cell in line.split(','))
        if not header_seen:
            if cells != TRACE_HEADER:
                raise ValueError(f'{path}:{number}: the header must be '
                                 f'{",".join(TRACE_HEADER)}, got {line!r}')
            header_seen = True
            continue
        try:
            row = TraceRow(*(float(cell) for cell in cells))
        except (TypeError, ValueError):
            raise ValueError(f'{path}:{number}: expected {len(TRACE_HEADER)} numbers, '
                             f'got {line!r}') from None
        problem = _trace_row_problem(row, rows[-1] if rows else None)
        if problem:
            raise ValueError(f'{path}:{number}: {problem}')
        rows.append(row)
    if not rows:
        raise ValueError(f'{path}: no trace rows')
    return tuple(rows)


def _trace_row_problem(row: TraceRow, previous: TraceRow | None) -> str | None:
    """Describe what is wrong with ``row`` after ``previous``, or return None."""
    if not all(math.isfinite(value) for value in row):
        return f'values must be finite, got {tuple(row)}'
    if previous is None and row.t_s != 0:
        return f'the first row must be at t_s 0, got {row.t_s}'
    if previous is not None and row.t_s <= previous.t_s:
        return f't_s must increase strictly, got {row.t_s} after {previous.t_s}'
    if row.rtt_ms < 0:
        return f'rtt_ms must be >= 0, got {row.rtt_ms}'
    if row.bandwidth_mbps <= 0:
        return f'bandwidth_mbps must be > 0 (an outage models no link), got {row.bandwidth_mbps}'
    return None


class NetworkModel:
    """
    Delays of transfers through a profile's network, reproducible from a seed.

    Jitter and stalls come from two random streams derived from ``seed``; every call of
    :meth:`sample_latency`, :meth:`one_way_delay_s` and :meth:`request_delay_s` takes the same
    number of draws whatever the outcome, so the n-th call's randomness depends only on the seed
    and n, not on outages or on arguments.
    """

    def __init__(self, profile: NetworkProfile, seed: int = 0) -> None:
        """Model ``profile``; equal seeds give equal sequences of delays."""
        self.profile = profile
        self._jitter = random.Random(f'{seed}:jitter')
        self._stalls = random.Random(f'{seed}:stalls')
        self._trace_times = [row.t_s for row in profile.trace]
        trace = profile.trace
        self._trace_period_s = (2 * trace[-1].t_s - trace[-2].t_s) if len(trace) > 1 else math.inf

    def rtt_ms(self, t_s: float) -> float:
        """Return the base round-trip time at ``t_s``."""
        row = self._trace_row(t_s)
        return row.rtt_ms if row else self.profile.rtt_ms

    def bandwidth_mbps(self, t_s: float, direction: Direction) -> float:
        """Return the bandwidth of ``direction`` at ``t_s`` (0: unlimited)."""
        if direction == 'down':
            return self.profile.downlink_mbps
        row = self._trace_row(t_s)
        return row.bandwidth_mbps if row else self.profile.bandwidth_mbps

    def serialization_s(self, t_s: float, nbytes: int, direction: Direction) -> float:
        """Return how long ``nbytes`` starting at ``t_s`` take to pass at the bandwidth."""
        mbps = self.bandwidth_mbps(t_s, direction)
        return nbytes * 8 / (mbps * 1e6) if mbps > 0 else 0.0

    def sample_latency(self, t_s: float) -> Latency:
        """Draw the latency of one transfer starting at ``t_s``: propagation, jitter, stall."""
        propagation_s = self.rtt_ms(t_s) / 2e3
        jitter_s = self._jitter.gauss(0.0, self.profile.jitter_ms / 1e3 / math.sqrt(2))
        stalled = self._stalls.random() < self.profile.stall_probability
        return Latency(propagation_s, max(jitter_s, -propagation_s),
                       self.profile.stall_ms / 1e3 if stalled else 0.0)

    def one_way_delay_s(self, t_s: float, nbytes: int, direction: Direction) -> float | None:
        """
        Return how long ``nbytes`` sent at ``t_s`` in ``direction`` take to arrive.

        None when an outage overlaps the transfer: it is lost to whoever waits for it with a
        deadline (the relay holds such bytes until the outage ends).
        """
        delay_s = self.sample_latency(t_s).total_s + self.serialization_s(t_s, nbytes, direction)
        return None if any(self._windows(t_s, t_s + delay_s)) else delay_s

    def request_delay_s(self, t_s: float, request_bytes: int,
                        response_bytes: int) -> float | None:
        """
        Return the time the network adds to a request sent at ``t_s`` and its response.

        The request travels the uplink, the response the downlink right after it arrives (the
        server's own time is the caller's to add). None when an outage swallows either.
        """
        up_s = self.one_way_delay_s(t_s, request_bytes, 'up')
        down_s = self.one_way_delay_s(t_s + (up_s or 0.0), response_bytes, 'down')
        return None if up_s is None or down_s is None else up_s + down_s

    def is_down(self, t_s: float) -> bool:
        """Return whether ``t_s`` falls in an outage."""
        return any(self._windows(t_s, t_s))

    def outage_end_s(self, t_s: float) -> float:
        """Return ``t_s`` when the link is up then, else when the outage holding it ends."""
        while True:
            ends = [end for _, end in self._windows(t_s, t_s)]
            if not ends:
                return t_s
            t_s = max(ends)

    def down_time_s(self, start_s: float, end_s: float) -> float:
        """Return how many seconds between ``start_s`` and ``end_s`` fall in outages."""
        return sum(min(end, end_s) - max(start, start_s)
                   for start, end in self._windows(start_s, end_s))

    def _windows(self, start_s: float, end_s: float) -> Iterator[tuple[float, float]]:
        """Yield the outage windows (absolute start, end) that contain a time in the range."""
        period = self.profile.outage_period_s
        first = math.floor(start_s / period) if period else 0
        last = math.floor(end_s / period) if period else 0
        for cycle in range(first, last + 1):
            for offset, duration in self.profile.outages:
                start = cycle * period + offset
                if start <= end_s and start + duration > start_s:
                    yield start, start + duration

    def _trace_row(self, t_s: float) -> TraceRow | None:
        if not self.profile.trace:
            return None
        phase = t_s % self._trace_period_s if math.isfinite(self._trace_period_s) else t_s
        index = max(0, bisect_right(self._trace_times, phase) - 1)
        return self.profile.trace[index]
