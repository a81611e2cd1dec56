"""
Offline evaluation of speculative execution: mAP per policy and deadline under a network.

Every frame of a recording with ground truth goes through the vehicle's own
:class:`~speculative_av.engine.engine.SpeculativeEngine` in simulated time
(:mod:`speculative_av.tools.simulated_drive`), once per network profile and deadline: the local
detector's inference is timed on this machine, the cloud detector answers the JPEG the engine
sent, and a seeded network model (the one the relay emulates) delays each request. Policies:
local-only (the on-board result), cloud-only (the cloud result if it arrives by the deadline,
else nothing) and speculative (the engine's fused output). Writes a markdown report, plots and
JSON.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
from pathlib import Path
import sys
import time
from typing import Any

import matplotlib
import numpy as np
from rosbags.rosbag2 import Reader
from speculative_av.core.deadline import DeadlinePolicy
from speculative_av.core.detections import Detections
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.engine.engine import EngineSettings, FIXED_UPLINK, UPLINKS
from speculative_av.netem.profiles import load_profiles, NetworkModel, NetworkProfile
from speculative_av.package_files import model_path
from speculative_av.ros.image_conversion import compressed_msg_to_rgb, image_msg_to_rgb
from speculative_av.ros.messages import detections_from_msg
from speculative_av.scenes.generator import CATEGORIES
from speculative_av.tools.bag_types import typestore
from speculative_av.tools.coco_metrics import coco_map
from speculative_av.tools.simulated_drive import (DriveFrame, DriveResult, simulate_drive,
                                                  SimulatedServer)
from tqdm import tqdm

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402,I100  (after choosing the headless backend)

POLICIES = ('local_only', 'cloud_only', 'speculative')


@dataclass(frozen=True)
class RecordedFrame:
    """One camera frame of a recording and its ground truth."""

    stamp_ns: int
    t_s: float  # since the first frame
    rgb: np.ndarray
    truth: Detections


def read_recording(path: Path, image_topic: str, truth_topic: str) -> list[RecordedFrame]:
    """Return the frames of a rosbag2 recording that have ground truth with the same stamp."""
    store = typestore()
    images: dict[int, np.ndarray] = {}
    truths: dict[int, Detections] = {}
    with Reader(path) as reader:
        wanted = [c for c in reader.connections if c.topic in (image_topic, truth_topic)]
        if {c.topic for c in wanted} != {image_topic, truth_topic}:
            raise ValueError(f'{path} needs topics {image_topic} and {truth_topic}; it has '
                             f'{sorted(c.topic for c in reader.connections)}')
        for connection, _, raw in reader.messages(connections=wanted):
            msg: Any = store.deserialize_cdr(raw, connection.msgtype)
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            if connection.topic == truth_topic:
                truths[stamp] = detections_from_msg(msg)
            elif connection.msgtype.endswith('CompressedImage'):
                images[stamp] = compressed_msg_to_rgb(msg)
            else:
                images[stamp] = image_msg_to_rgb(msg)
    stamps = sorted(images.keys() & truths.keys())
    if not stamps:
        raise ValueError(f'{path}: no image on {image_topic} has ground truth on {truth_topic}')
    return [RecordedFrame(s, (s - stamps[0]) / 1e9, images[s], truths[s]) for s in stamps]


def measure_local(frames: list[RecordedFrame],
                  local: TorchvisionDetector) -> list[DriveFrame]:
    """Run the local detector over every frame, timing each inference on this machine."""
    local.detect(frames[0].rgb)  # warm-up: the first inference pays one-time costs
    measured = []
    for frame in tqdm(frames, desc='local inference', unit='frame', file=sys.stderr):
        started = time.perf_counter()
        detections = local.detect(frame.rgb)
        measured.append(DriveFrame(frame.stamp_ns, frame.rgb, detections,
                                   time.perf_counter() - started))
    return measured


@dataclass(frozen=True)
class DriveSetup:
    """What every simulated drive of one evaluation shares."""

    frames: list[DriveFrame]
    truth: list[Detections]
    server: SimulatedServer
    seed: int
    cloud_speedup: float
    jpeg_quality: int
    max_image_side: int
    max_outstanding: int
    image_size: tuple[int, int]  # (width, height)


def drive(setup: DriveSetup, profile: NetworkProfile, deadline_ms: float,
          uplink: str) -> DriveResult:
    """Drive the recording through the engine under ``profile`` with ``deadline_ms``."""
    settings = EngineSettings(DeadlinePolicy.from_ms(deadline_ms),
                              jpeg_quality=setup.jpeg_quality,
                              max_image_side=setup.max_image_side, uplink=uplink)
    return simulate_drive(setup.frames, setup.server, NetworkModel(profile, setup.seed),
                          settings, cloud_speedup=setup.cloud_speedup,
                          max_outstanding=setup.max_outstanding)


def policy_row(setup: DriveSetup, result: DriveResult, deadline_ms: float,
               uplink: str) -> dict:
    """Return one drive's mAP per policy, cloud results in time, lateness and bytes sent."""
    local_only, cloud_only, speculative, late, in_time = [], [], [], [], []
    for frame in setup.frames:
        outcome = result.frames.get(frame.stamp_ns)  # absent: dropped while the detector ran
        cloud = result.cloud_in_time(frame.stamp_ns)
        decision = outcome.decision if outcome is not None else None
        local_only.append(outcome.local if outcome is not None and outcome.local is not None
                          else Detections.empty())
        cloud_only.append(cloud if cloud is not None else Detections.empty())
        speculative.append(decision.detections if decision is not None else Detections.empty())
        late.append(decision is not None and decision.late)
        in_time.append(cloud is not None)
    row = {'deadline_ms': deadline_ms, 'uplink': uplink, 'cloud_in_time': float(np.mean(in_time)),
           'late': float(np.mean(late)),
           'bytes_per_frame': float(np.mean([result.bytes_sent(f.stamp_ns)
                                             for f in setup.frames])),
           'dropped_frames': len(setup.frames) - len(result.frames),
           'cloud_skipped': int(result.counters['cloud_skipped'])}
    for policy, predictions in (('local_only', local_only), ('cloud_only', cloud_only),
                                ('speculative', speculative)):
        metrics = coco_map(predictions, setup.truth, CATEGORIES, setup.image_size)
        row[policy] = metrics['mAP']
        row[f'{policy}_mAP50'] = metrics['mAP50']
    return row


def evaluate(setup: DriveSetup, profiles: list[str], deadlines_ms: list[float],
             uplinks: list[str]) -> dict:
    """Return mAP and arrival statistics per profile, deadline and uplink, one drive each."""
    available = load_profiles()
    unknown = [name for name in profiles if name not in available]
    if unknown:
        raise ValueError(f'unknown network profile(s) {unknown}; known: {sorted(available)}')
    results: dict = {}
    progress = tqdm(total=len(profiles) * len(deadlines_ms) * len(uplinks),
                    desc='simulated drives', unit='drive', file=sys.stderr)
    for name in profiles:
        rows: list[dict] = []
        cloud_ms: dict[str, list[float | None]] = {}
        for uplink in uplinks:
            for deadline in deadlines_ms:
                result = drive(setup, available[name], deadline, uplink)
                rows.append(policy_row(setup, result, deadline, uplink))
                # The longest deadline's calls last: their replies are cut off least.
                cloud_ms[uplink] = [None if c.reply_ns is None
                                    else (c.reply_ns - c.stamp_ns) / 1e6
                                    for c in result.calls]
                progress.update()
        results[name] = {'rows': rows, 'cloud_ms': cloud_ms,
                         'local_ms': [f.local_s * 1e3 for f in setup.frames]}
    progress.close()
    return results


def _pct(values: list[float], q: float) -> str:
    return f'{np.percentile(values, q):.0f}' if values else 'n/a'


def write_report(out: Path, args: argparse.Namespace, setup: DriveSetup,
                 results: dict) -> Path:
    """Write report.md, map_vs_deadline.png, latency_cdf.png and results.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    local_ms = [f.local_s * 1e3 for f in setup.frames]
    server_ms = [(a.decode_s + a.inference_s) * 1e3 for a in setup.server.answers]
    lines = [
        '# Speculative execution: offline evaluation', '',
        f'Recording `{args.recording}`: {len(setup.frames)} frames with ground truth, driven '
        "through the vehicle's `SpeculativeEngine` in simulated time. Network seed "
        f'{args.seed}. Local: `{args.local_model}` (`{args.local_weights}`); cloud: '
        f'`{args.cloud_model}` (`{args.cloud_weights}`), server time divided by '
        f'{args.cloud_speedup:g}. JPEG quality {args.jpeg_quality}, max image side '
        f'{args.max_image_side}; at most {args.max_outstanding} cloud calls outstanding.', '',
        f'Measured on this machine: local inference p50 {_pct(local_ms, 50)} ms / p95 '
        f'{_pct(local_ms, 95)} ms; cloud server (decode + inference) p50 '
        f'{_pct(server_ms, 50)} ms / p95 {_pct(server_ms, 95)} ms.', '',
        'mAP is COCO mAP@[.5:.95] (pycocotools); mAP50 in parentheses. *cloud in time*: share '
        'of frames whose cloud result arrives by the deadline; *late*: share of frames whose '
        'fused result came after the deadline because even the local detector was slower; '
        '*kB/frame*: JPEG bytes sent to the cloud per frame.', '']
    for profile, result in results.items():
        lines += [f'## `{profile}`', '']
        for uplink, calls_ms in result['cloud_ms'].items():
            arrived = [c for c in calls_ms if c is not None]
            lines += [f'### `{uplink}` uplink', '',
                      f'Cloud result after p50 {_pct(arrived, 50)} ms / p95 '
                      f'{_pct(arrived, 95)} ms from the stamp; '
                      f'{sum(c is None for c in calls_ms)} of {len(calls_ms)} requests lost '
                      'to outages (longest deadline).', '',
                      '| deadline ms | cloud in time | local-only | cloud-only | speculative '
                      '| late | kB/frame |',
                      '|---:|---:|---:|---:|---:|---:|---:|']
            for row in (r for r in result['rows'] if r['uplink'] == uplink):
                cells = [f'{row[p]:.3f} ({row[p + "_mAP50"]:.3f})' for p in POLICIES]
                lines.append(f'| {row["deadline_ms"]:g} | {row["cloud_in_time"]:.0%} | '
                             + ' | '.join(cells) + f' | {row["late"]:.0%} | '
                             f'{row["bytes_per_frame"] / 1e3:.1f} |')
            lines.append('')
        if len(result['cloud_ms']) > 1:
            lines += _comparison(result['rows'], list(result['cloud_ms']))
    lines += ['![mAP vs deadline](map_vs_deadline.png)', '',
              '![latency CDF](latency_cdf.png)', '']
    report = out / 'report.md'
    report.write_text('\n'.join(lines))
    _plot_map(out / 'map_vs_deadline.png', results)
    _plot_latency(out / 'latency_cdf.png', results)
    (out / 'results.json').write_text(json.dumps(
        {'args': {k: str(v) for k, v in vars(args).items()}, 'results': results,
         'server': [{'decode_ms': a.decode_s * 1e3, 'inference_ms': a.inference_s * 1e3,
                     'response_bytes': a.response_bytes} for a in setup.server.answers]},
        indent=1))
    return report


def _comparison(rows: list[dict], uplinks: list[str]) -> list[str]:
    """Return a markdown table of the uplinks side by side, per deadline."""
    names = ' / '.join(uplinks)
    lines = [f'### Side by side: {names}', '',
             '| deadline ms | cloud in time | speculative mAP | kB/frame |',
             '|---:|---:|---:|---:|']
    for deadline in dict.fromkeys(r['deadline_ms'] for r in rows):
        by_uplink = {r['uplink']: r for r in rows if r['deadline_ms'] == deadline}
        ordered = [by_uplink[u] for u in uplinks]
        lines.append(f'| {deadline:g} | '
                     + ' / '.join(f'{r["cloud_in_time"]:.0%}' for r in ordered) + ' | '
                     + ' / '.join(f'{r["speculative"]:.3f}' for r in ordered) + ' | '
                     + ' / '.join(f'{r["bytes_per_frame"] / 1e3:.1f}' for r in ordered) + ' |')
    return lines + ['']


def _plot_map(path: Path, results: dict) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), sharey=True,
                             squeeze=False)
    for ax, (profile, result) in zip(axes[0], results.items()):
        for index, uplink in enumerate(result['cloud_ms']):
            rows = [r for r in result['rows'] if r['uplink'] == uplink]
            deadlines = [r['deadline_ms'] for r in rows]
            # Local-only does not depend on the uplink: drawn once.
            for policy, marker in zip(POLICIES[index > 0:], 'soD'[index > 0:]):
                style = ':' if index else '-' if policy == 'speculative' else '--'
                ax.plot(deadlines, [r[policy] for r in rows], marker + style,
                        label=policy.replace('_', '-') + f' ({uplink} uplink)')
        ax.set(title=f'network: {profile}', xlabel='deadline (ms)', xscale='log')
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('mAP@[.5:.95]')
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_latency(path: Path, results: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))

    def cdf(values: list[float | None], label: str, style: str) -> None:
        ordered = np.sort([v for v in values if v is not None])
        ax.step(ordered, np.arange(1, len(ordered) + 1) / len(values), style, where='post',
                label=label)

    cdf(next(iter(results.values()))['local_ms'], 'local inference', 'k-')
    for profile, result in results.items():
        for uplink, calls_ms in result['cloud_ms'].items():
            cdf(calls_ms, f'cloud via {profile} ({uplink} uplink)', '-')
    for deadline in next(iter(results.values()))['rows']:
        ax.axvline(deadline['deadline_ms'], color='grey', lw=0.5, ls=':')
    ax.set(xlabel='time from frame start to result (ms); dotted: evaluated deadlines',
           ylabel='share of frames', xscale='log', ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the local and cloud model options, defaulting to the shipped checkpoints."""
    parser.add_argument('--local-model', default='ssdlite320_mobilenet_v3_large')
    parser.add_argument('--local-weights', default=str(model_path('local_ssdlite320.pt')))
    parser.add_argument('--cloud-model', default='fasterrcnn_mobilenet_v3_large_320_fpn')
    parser.add_argument('--cloud-weights', default=str(model_path('cloud_frcnn.pt')))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the command line options."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('recording', type=Path, help='rosbag2 recording with ground truth')
    parser.add_argument('--image-topic', default='/image')
    parser.add_argument('--truth-topic', default='/ground_truth')
    add_model_arguments(parser)
    parser.add_argument('--profiles', nargs='+', default=['good-lte', 'poor-lte'],
                        help='network profiles (config/network_profiles.yaml)')
    parser.add_argument('--deadlines-ms', nargs='+', type=float,
                        default=[50, 100, 150, 200, 300, 400, 600, 1000])
    parser.add_argument('--seed', type=int, default=0, help='network model seed')
    parser.add_argument('--jpeg-quality', type=int, default=80)
    parser.add_argument('--max-image-side', type=int, default=0)
    parser.add_argument('--cloud-speedup', type=float, default=1.0,
                        help='divide measured cloud server time by this (emulate a GPU server)')
    parser.add_argument('--uplink', nargs='+', choices=UPLINKS, default=[FIXED_UPLINK],
                        help="how frames are encoded for the cloud (the node's cloud.uplink); "
                        'several are compared side by side')
    parser.add_argument('--max-outstanding', type=int, default=4,
                        help="cloud calls in flight at most (the node's cloud.max_outstanding)")
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--out', type=Path, default=Path('out/evaluation'))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Evaluate and print where the report is."""
    args = parse_args(argv)
    frames = read_recording(args.recording, args.image_topic, args.truth_topic)
    local = TorchvisionDetector(args.local_model, args.local_weights, threads=args.threads,
                                score_threshold=0.05)
    cloud = TorchvisionDetector(args.cloud_model, args.cloud_weights, threads=args.threads,
                                score_threshold=0.05)
    height, width = frames[0].rgb.shape[:2]
    cloud.detect(frames[0].rgb)  # warm-up
    setup = DriveSetup(measure_local(frames, local), [f.truth for f in frames],
                       SimulatedServer(cloud), args.seed, args.cloud_speedup, args.jpeg_quality,
                       args.max_image_side, args.max_outstanding, (width, height))
    results = evaluate(setup, args.profiles, sorted(args.deadlines_ms),
                       list(dict.fromkeys(args.uplink)))
    report = write_report(args.out, args, setup, results)
    print(report.read_text())
    print(f'report: {report}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
