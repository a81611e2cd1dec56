"""
Stress a cloud detection service with a simulated fleet: N vehicles, each a paced camera.

Every vehicle sends a frame every ``1 / rate`` seconds with a deadline, through the same client
code the node uses (an endpoint per vehicle, each with its own connection, behind a
:class:`~speculative_av.cloud.dispatch.CloudDispatcher`). For each fleet size it reports per
vehicle the share of frames answered in time and the reply latency p50/p99, and overall the
goodput (replies in time per second), next to the service's capacity when measured
(``--capacity``: the completion rate of back-to-back calls without deadlines). With
``--metrics-url`` it also reports the server's batch sizes from its Prometheus endpoint (the
native server's ``speculative_av_batch_size`` histogram or Triton's ``nv_inference_*``
counters). Results go to stdout as a table, and optionally to JSON and a plot.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
import heapq
import json
from pathlib import Path
import sys
import threading
import time
from typing import Any, Callable, Sequence
import urllib.request

import matplotlib
import numpy as np
from speculative_av.cloud.codec import encode_frame, EncodedFrame
from speculative_av.cloud.dispatch import CloudDispatcher, Plan
from speculative_av.cloud.endpoint_factory import open_endpoint
from speculative_av.cloud.endpoints import EndpointSpec, parse_endpoints
from speculative_av.cloud.reply import CloudReply
from speculative_av.cloud.security import ChannelSecurity
from speculative_av.detectors.torchvision_detector import coco_categories
from speculative_av.scenes.generator import generate_scene

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402,I100  (after choosing the headless backend)

OUTCOMES = ('in_time', 'late', 'rejected', 'expired', 'refused', 'skipped', 'error')
PREDICTED = 'predicted completion'  # how the native server words a refusal it predicts


@dataclass
class VehicleResult:
    """What one simulated vehicle saw during the measured window."""

    name: str
    frames: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    latencies_ms: list[float] = field(default_factory=list)  # successful replies only

    @property
    def share_in_time(self) -> float:
        """Return the share of this vehicle's frames answered by their deadline."""
        return self.outcomes['in_time'] / self.frames if self.frames else 0.0

    def latency_ms(self, percentile: float) -> float | None:
        """Return a percentile of the successful replies' latency, None without any."""
        return (float(np.percentile(self.latencies_ms, percentile)) if self.latencies_ms
                else None)


@dataclass
class LoadPoint:
    """One fleet size's measurement."""

    vehicles: int
    duration_s: float
    offered_per_s: float
    goodput_per_s: float
    outcomes: dict[str, int]
    vehicle_results: list[VehicleResult]
    batch_sizes: dict[str, float] | None = None

    def summary(self) -> dict[str, Any]:
        """Return the JSON-friendly figures of this point (per vehicle included)."""
        shares = [v.share_in_time for v in self.vehicle_results]
        latencies = [x for v in self.vehicle_results for x in v.latencies_ms]
        return {
            'vehicles': self.vehicles, 'duration_s': round(self.duration_s, 2),
            'offered_per_s': round(self.offered_per_s, 2),
            'goodput_per_s': round(self.goodput_per_s, 2),
            'share_in_time': round(sum(v.outcomes['in_time'] for v in self.vehicle_results)
                                   / max(1, sum(v.frames for v in self.vehicle_results)), 4),
            'share_in_time_min': round(min(shares), 4), 'share_in_time_max': round(max(shares), 4),
            'latency_p50_ms': _percentile(latencies, 50),
            'latency_p99_ms': _percentile(latencies, 99),
            'outcomes': self.outcomes, 'batch_sizes': self.batch_sizes,
            'per_vehicle': [{'name': v.name, 'frames': v.frames,
                             'share_in_time': round(v.share_in_time, 4),
                             'latency_p50_ms': v.latency_ms(50),
                             'latency_p99_ms': v.latency_ms(99),
                             'outcomes': v.outcomes} for v in self.vehicle_results],
        }


def _percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def classify(reply: CloudReply, deadline_ms: float) -> str:
    """Return which outcome a reply is, from the vehicle's point of view."""
    if reply.ok:
        return 'in_time' if reply.round_trip_ms <= deadline_ms else 'late'
    if reply.error.startswith('DEADLINE_EXCEEDED'):
        return 'rejected' if PREDICTED in reply.error else 'expired'
    if reply.error.startswith('RESOURCE_EXHAUSTED'):
        return 'refused'
    return 'error'


class Vehicle:
    """One simulated vehicle: its endpoints, its dispatcher and its tally."""

    def __init__(self, name: str, specs: list[EndpointSpec], security: ChannelSecurity,
                 categories: list[str], max_outstanding: int,
                 hedge_after_s: float | None) -> None:
        """Connect this vehicle's own endpoints (one connection each)."""
        self.name = name
        self.endpoints = [open_endpoint(s, security=security, categories=categories,
                                        private_connection=True) for s in specs]
        self.dispatcher = CloudDispatcher(
            self.endpoints, {s.name: s.priority for s in specs},
            max_outstanding=max_outstanding, hedge_after_s=hedge_after_s)
        self.result = VehicleResult(name)
        self._lock = threading.Lock()
        self._open = 0
        self.idle = threading.Condition(self._lock)

    @property
    def healthy(self) -> bool:
        """Return whether every endpoint of this vehicle is ready to take frames."""
        return all(e.healthy for e in self.endpoints)

    def send(self, frame: EncodedFrame, seq: int, deadline_ms: float, counted: bool) -> None:
        """Send one frame; its outcome is tallied when ``counted``."""
        plan: Plan = self.dispatcher.plan()
        if counted:
            with self._lock:
                self.result.frames += 1
                if not plan.sources:
                    self.result.outcomes['skipped'] += 1
        if not plan.sources:
            return
        replies: list[CloudReply] = []
        expected = len(plan.sources)
        with self._lock:
            self._open += 1

        def on_done(reply: CloudReply) -> None:
            with self._lock:
                replies.append(reply)
                if len(replies) < expected:
                    return
                self._open -= 1
                self.idle.notify_all()
                if counted:
                    self._tally(replies, deadline_ms)

        self.dispatcher.send(plan, frame, f'{self.name}/{seq}', time.time_ns(),
                             deadline_ms / 1e3, time.time_ns() + round(deadline_ms * 1e6),
                             on_done, lambda name, call: None)

    def _tally(self, replies: list[CloudReply], deadline_ms: float) -> None:
        """Count a frame's best outcome (a hedged frame is in time if either reply was)."""
        outcomes = [classify(r, deadline_ms) for r in replies]
        best = min(outcomes, key=OUTCOMES.index)
        self.result.outcomes[best] += 1
        for reply, outcome in zip(replies, outcomes):
            if outcome in ('in_time', 'late'):
                self.result.latencies_ms.append(reply.round_trip_ms)
                break

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every frame sent has resolved."""
        with self._lock:
            return self.idle.wait_for(lambda: self._open == 0, timeout_s)

    def close(self) -> None:
        """Stop the dispatcher and the endpoints."""
        self.dispatcher.stop()
        for endpoint in self.endpoints:
            endpoint.stop()


def road_frames(count: int = 4, seed: int = 7) -> list[EncodedFrame]:
    """Return ``count`` distinct 640x480 road scenes as quality-80 JPEG, as a camera sends."""
    return [encode_frame(generate_scene(seed + i).image, jpeg_quality=80) for i in range(count)]


def run_point(vehicles: int, args: argparse.Namespace, frames: list[EncodedFrame],
              security: ChannelSecurity, categories: list[str]) -> LoadPoint:
    """Drive ``vehicles`` paced vehicles for warm-up plus the measured duration."""
    specs = parse_endpoints(args.endpoint)
    fleet = [Vehicle(f'v{i:02d}', specs, security, categories, args.max_outstanding,
                     args.hedge_after_ms / 1e3 if args.hedge_after_ms > 0 else None)
             for i in range(vehicles)]
    try:
        _wait(lambda: all(v.healthy for v in fleet), args.connect_timeout,
              'endpoints did not all become healthy (is the server up?)')
        before = scrape(args.metrics_url) if args.metrics_url else None
        period_s = 1.0 / args.rate
        start = time.monotonic() + 0.1
        measure_from, measure_to = start + args.warmup, start + args.warmup + args.duration
        # One pacing thread for the whole fleet: vehicles are spread evenly over a period.
        due = [(start + i * period_s / vehicles, i, 0) for i in range(vehicles)]
        heapq.heapify(due)
        while due:
            when, index, seq = heapq.heappop(due)
            if when >= measure_to:
                continue
            time.sleep(max(0.0, when - time.monotonic()))
            fleet[index].send(frames[seq % len(frames)], seq, args.deadline_ms,
                              counted=when >= measure_from)
            heapq.heappush(due, (when + period_s, index, seq + 1))
        for vehicle in fleet:
            vehicle.wait_idle(args.deadline_ms / 1e3 + 5.0)
        after = scrape(args.metrics_url) if args.metrics_url else None
    finally:
        for vehicle in fleet:
            vehicle.close()
    results = [v.result for v in fleet]
    outcomes = {k: sum(r.outcomes[k] for r in results) for k in OUTCOMES}
    return LoadPoint(vehicles, args.duration, vehicles * args.rate,
                     outcomes['in_time'] / args.duration, outcomes, results,
                     batch_sizes(before, after) if before is not None and after is not None
                     else None)


def measure_capacity(args: argparse.Namespace, frames: list[EncodedFrame],
                     security: ChannelSecurity, categories: list[str]) -> float:
    """Return completions/s with ``args.capacity`` calls always in flight, no deadlines."""
    spec = parse_endpoints(args.endpoint)[0]
    endpoint = open_endpoint(spec, security=security, categories=categories,
                             private_connection=True)
    lock = threading.Condition()
    done: list[float] = []
    stop_at = [0.0]

    try:
        _wait(lambda: endpoint.healthy, args.connect_timeout, f'{spec.name} is not healthy')

        def launch(seq: int) -> None:
            def on_done(reply: CloudReply) -> None:
                with lock:
                    if reply.ok:
                        done.append(time.monotonic())
                    lock.notify_all()
                if time.monotonic() < stop_at[0]:
                    launch(seq + args.capacity)
            endpoint.submit(frames[seq % len(frames)], f'capacity/{seq}', 0, 60.0, 0, on_done)

        start = time.monotonic()
        stop_at[0] = start + args.warmup + args.duration
        for seq in range(args.capacity):
            launch(seq)
        with lock:
            lock.wait_for(lambda: time.monotonic() >= stop_at[0], args.warmup + args.duration
                          + 60.0)
        counted = [t for t in done if start + args.warmup <= t < stop_at[0]]
        return len(counted) / args.duration
    finally:
        endpoint.stop()


def scrape(url: str) -> dict[str, float]:
    """Return the samples of a Prometheus text endpoint, keyed by name{labels}."""
    with urllib.request.urlopen(url, timeout=5.0) as response:  # noqa: S310 (operator's URL)
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            key, _, value = line.rpartition(' ')
            try:
                samples[key] = float(value)
            except ValueError:
                continue
    return samples


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> dict[str, float] | None:
    """Return the mean batch size over the window and, for the native server, its histogram."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    native_count = delta('speculative_av_batch_size_count')
    if native_count > 0:
        buckets = {k.split('le="')[1].rstrip('"}'): delta(k) for k in after
                   if k.startswith('speculative_av_batch_size_bucket')}
        histogram: dict[str, float] = {'batches': native_count,
                                       'mean': delta('speculative_av_batch_size_sum')
                                       / native_count}
        previous = 0.0
        for bound, cumulative in sorted(((b, c) for b, c in buckets.items() if b != '+Inf'),
                                        key=lambda item: float(item[0])):
            if cumulative > previous:
                histogram[f'<={float(bound):g}'] = cumulative - previous
            previous = cumulative
        return histogram
    executions = sum(delta(k) for k in after if k.startswith('nv_inference_exec_count'))
    inferences = sum(delta(k) for k in after if k.startswith('nv_inference_count'))
    if executions > 0:
        return {'batches': executions, 'mean': inferences / executions}
    return None


def _wait(condition: Callable[[], bool], timeout_s: float, failure: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f'fleet_load: {failure}')
        time.sleep(0.05)


def table(points: list[dict[str, Any]], capacity: float | None) -> str:
    """Return the markdown table of a sweep."""
    lines = ['| vehicles | offered/s | goodput/s | goodput / capacity | in time (all, min-max) '
             '| p50 / p99 ms | rejected | expired | refused | skipped | mean batch |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for p in points:
        share = (f'{p["goodput_per_s"] / capacity:.0%}' if capacity else '-')
        batch = p['batch_sizes']['mean'] if p['batch_sizes'] else None
        lines.append(
            f'| {p["vehicles"]} | {p["offered_per_s"]:.0f} | {p["goodput_per_s"]:.1f} | {share} '
            f'| {p["share_in_time"]:.0%} ({p["share_in_time_min"]:.0%}-'
            f'{p["share_in_time_max"]:.0%}) | {p["latency_p50_ms"]} / {p["latency_p99_ms"]} '
            f'| {p["outcomes"]["rejected"]} | {p["outcomes"]["expired"]} '
            f'| {p["outcomes"]["refused"]} | {p["outcomes"]["skipped"]} '
            f'| {"-" if batch is None else f"{batch:.2f}"} |')
    return '\n'.join(lines)


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Plot goodput against fleet size for one or more runs (label -> JSON report)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, report in runs.items():
        points = report['points']
        ax.plot([p['vehicles'] for p in points], [p['goodput_per_s'] for p in points],
                marker='o', label=label)
        if report.get('capacity_per_s'):
            ax.axhline(report['capacity_per_s'], linestyle=':', linewidth=1, color='grey')
    ax.set_xscale('log', base=2)
    sizes = sorted({p['vehicles'] for report in runs.values() for p in report['points']})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    rates = sorted({report['rate'] for report in runs.values()})
    ax.set_xlabel(f'vehicles, each {" or ".join(f"{r:g}" for r in rates)} frames/s')
    ax.set_ylabel('replies in time per second (goodput)')
    ax.set_title('Fleet load: goodput against fleet size (dotted: capacity)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--endpoint', action='append', default=[],
                        help="endpoint in the node's cloud.endpoints syntax; repeat for replicas")
    parser.add_argument('--vehicles', default='1,2,4,8,16,32',
                        help='comma-separated fleet sizes to measure, in order')
    parser.add_argument('--rate', type=float, default=5.0, help='frames per second per vehicle')
    parser.add_argument('--deadline-ms', type=float, default=300.0)
    parser.add_argument('--duration', type=float, default=20.0, help='measured seconds per size')
    parser.add_argument('--warmup', type=float, default=3.0, help='unmeasured seconds first')
    parser.add_argument('--max-outstanding', type=int, default=4,
                        help='calls in flight per endpoint per vehicle (client pacing)')
    parser.add_argument('--hedge-after-ms', type=float, default=0.0, help='0 disables hedging')
    parser.add_argument('--capacity', type=int, default=0, metavar='CALLS',
                        help='first measure capacity with CALLS back-to-back calls in flight')
    parser.add_argument('--metrics-url', default='',
                        help="the server's Prometheus endpoint, for batch sizes")
    parser.add_argument('--categories', default='coco',
                        help="the vehicle's label names: 'coco' or a checkpoint path")
    parser.add_argument('--connect-timeout', type=float, default=60.0)
    parser.add_argument('--insecure', action='store_true',
                        help='plaintext gRPC (a server on this machine or a trusted network)')
    parser.add_argument('--ca-file', default='')
    parser.add_argument('--token-file', default='')
    parser.add_argument('--label', default='', help='name of this run in the JSON and plot')
    parser.add_argument('--json', type=Path, help='write the full report here')
    parser.add_argument('--plot', type=Path, help='write a goodput plot here')
    parser.add_argument('--compare', type=Path, nargs='*', default=[],
                        help='earlier --json reports to draw in the same plot')
    parser.add_argument('--replot', action='store_true',
                        help='only draw --plot from the --compare reports, measuring nothing')
    args = parser.parse_args(argv)
    if args.replot:
        if not (args.plot and args.compare):
            parser.error('--replot needs --plot and --compare')
        return args
    if not args.endpoint:
        parser.error('at least one --endpoint is required')
    try:
        args.sizes = [int(n) for n in args.vehicles.split(',')]
        parse_endpoints(args.endpoint)
    except ValueError as error:
        parser.error(str(error))
    if min(args.sizes) < 1 or args.rate <= 0 or args.deadline_ms <= 0 or args.duration <= 0:
        parser.error('vehicles, --rate, --deadline-ms and --duration must be positive')
    return args


def _categories(choice: str) -> list[str]:
    if choice == 'coco':
        return coco_categories()
    import torch
    checkpoint = torch.load(choice, map_location='cpu', weights_only=True)
    return [str(c) for c in checkpoint['categories']]


def main(argv: list[str] | None = None) -> int:
    """Measure each fleet size; print the table; write JSON and a plot when asked."""
    args = parse_args(argv)
    if args.replot:
        plot({r['label']: r for r in (json.loads(p.read_text()) for p in args.compare)},
             args.plot)
        return 0
    security = ChannelSecurity.from_settings(insecure=args.insecure, ca_file=args.ca_file,
                                             token_file=args.token_file)
    categories = _categories(args.categories)
    frames = road_frames()
    capacity = None
    if args.capacity:
        capacity = measure_capacity(args, frames, security, categories)
        print(f'capacity: {capacity:.2f} replies/s with {args.capacity} calls in flight',
              flush=True)
    points = []
    for size in args.sizes:
        point = run_point(size, args, frames, security, categories).summary()
        points.append(point)
        print(f'{size} vehicles: goodput {point["goodput_per_s"]:.2f}/s, in time '
              f'{point["share_in_time"]:.0%}, outcomes {point["outcomes"]}', flush=True)
    print(table(points, capacity))
    label = args.label or ','.join(args.endpoint)
    report = {'label': label, 'endpoints': args.endpoint, 'rate': args.rate,
              'deadline_ms': args.deadline_ms, 'duration_s': args.duration,
              'capacity_per_s': capacity, 'points': points}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        runs = {r['label']: r for r in (json.loads(p.read_text()) for p in args.compare)}
        runs[label] = report
        plot(runs, args.plot)
    return 0


if __name__ == '__main__':
    sys.exit(main())
