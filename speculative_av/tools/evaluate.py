"""
Offline evaluation of speculative execution: mAP per policy and deadline under a network.

Both detectors run over every frame of a recording with ground truth; their inference is timed
on this machine. A seeded network model (the one the relay emulates) adds each request's
network delay, and the node's arbiter decides every frame for every deadline. Policies:
local-only (the on-board result), cloud-only (the cloud result if it arrives by the deadline,
else nothing) and speculative (the fused rule). Writes a markdown report, plots and JSON.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
import json
from pathlib import Path
import sys
import time
from typing import Any

import matplotlib
import numpy as np
from rosbags.rosbag2 import Reader
from speculative_av.cloud.codec import (build_request, decode_request_image,
                                        detections_to_response, encode_frame,
                                        to_original_coordinates)
from speculative_av.core.detections import Detections
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.netem.profiles import load_profiles, NetworkModel
from speculative_av.package_files import model_path
from speculative_av.ros.image_conversion import compressed_msg_to_rgb, image_msg_to_rgb
from speculative_av.ros.messages import detections_from_msg
from speculative_av.scenes.generator import CATEGORIES
from speculative_av.tools.bag_types import typestore
from speculative_av.tools.coco_metrics import coco_map
from speculative_av.tools.offline_race import FrameResults, run_policies
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


@dataclass(frozen=True)
class MeasuredFrame:
    """Both detectors' answers for a frame and the measured costs of getting them."""

    t_s: float
    truth: Detections
    local: Detections
    cloud: Detections
    local_ms: float
    cloud_server_ms: float  # decode + inference on the server
    encode_ms: float
    request_bytes: int
    response_bytes: int


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


def measure(frames: list[RecordedFrame], local: TorchvisionDetector,
            cloud: TorchvisionDetector, jpeg_quality: int,
            max_image_side: int) -> list[MeasuredFrame]:
    """Run both detectors over every frame the way the live system does, timing each step."""
    local.detect(frames[0].rgb)  # warm-up: the first inference pays one-time costs
    cloud.detect(frames[0].rgb)
    measured = []
    for frame in tqdm(frames, desc='inference', unit='frame', file=sys.stderr):
        started = time.perf_counter()
        local_result = local.detect(frame.rgb)
        local_ms = (time.perf_counter() - started) * 1e3
        encoded = encode_frame(frame.rgb, jpeg_quality=jpeg_quality,
                               max_image_side=max_image_side)
        request = build_request(encoded, 'camera', 0, 0)
        started = time.perf_counter()
        decoded = decode_request_image(request)  # the cloud sees the JPEG, as it does live
        cloud_result = to_original_coordinates(cloud.detect(decoded), request,
                                               decoded.shape[1], decoded.shape[0])
        cloud_server_ms = (time.perf_counter() - started) * 1e3
        response = detections_to_response(
            cloud_result, model_name=cloud.model_name, model_version=cloud.model_version,
            server_receive_unix_ns=0, queue_ms=0, decode_ms=0, inference_ms=cloud_server_ms)
        measured.append(MeasuredFrame(
            frame.t_s, frame.truth, local_result, cloud_result, local_ms, cloud_server_ms,
            encoded.encode_ms, request.ByteSize(), response.ByteSize()))
    return measured


def with_network(frames: list[MeasuredFrame], network: NetworkModel,
                 cloud_speedup: float) -> list[FrameResults]:
    """Return each frame's arrival times: local as measured, cloud through the network."""
    results = []
    for f in frames:
        delay_s = network.request_delay_s(f.t_s, f.request_bytes, f.response_bytes)
        cloud_ms = (None if delay_s is None
                    else f.encode_ms + delay_s * 1e3 + f.cloud_server_ms / cloud_speedup)
        results.append(FrameResults(f.local, f.cloud, f.local_ms, cloud_ms))
    return results


def evaluate(frames: list[MeasuredFrame], profiles: list[str], deadlines_ms: list[float],
             seed: int, cloud_speedup: float, image_size: tuple[int, int]) -> dict:
    """Return mAP and arrival statistics per profile and deadline."""
    available = load_profiles()
    truth = [f.truth for f in frames]
    results: dict = {}
    for name in profiles:
        if name not in available:
            raise ValueError(f'unknown network profile {name!r}; known: {sorted(available)}')
        timed = with_network(frames, NetworkModel(available[name], seed), cloud_speedup)
        cloud_ms = [f.cloud_ms for f in timed]
        rows = []
        for deadline in deadlines_ms:
            outputs = run_policies(timed, deadline)
            speculative = [d.detections for d in outputs.speculative]
            row = {'deadline_ms': deadline,
                   'cloud_in_time': float(np.mean([c is not None and c <= deadline
                                                   for c in cloud_ms])),
                   'late': float(np.mean([d.late for d in outputs.speculative]))}
            for policy, predictions in (('local_only', outputs.local_only),
                                        ('cloud_only', outputs.cloud_only),
                                        ('speculative', speculative)):
                metrics = coco_map(predictions, truth, CATEGORIES, image_size)
                row[policy] = metrics['mAP']
                row[f'{policy}_mAP50'] = metrics['mAP50']
            rows.append(row)
        results[name] = {'rows': rows, 'cloud_ms': cloud_ms,
                         'local_ms': [f.local_ms for f in timed]}
    return results


def _pct(values: list[float], q: float) -> str:
    return f'{np.percentile(values, q):.0f}' if values else 'n/a'


def write_report(out: Path, args: argparse.Namespace, frames: list[MeasuredFrame],
                 results: dict) -> Path:
    """Write report.md, map_vs_deadline.png, latency_cdf.png and results.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    local_ms = [f.local_ms for f in frames]
    server_ms = [f.cloud_server_ms for f in frames]
    lines = [
        '# Speculative execution: offline evaluation', '',
        f'Recording `{args.recording}`: {len(frames)} frames with ground truth. Network seed '
        f'{args.seed}. Local: `{args.local_model}` (`{args.local_weights}`); cloud: '
        f'`{args.cloud_model}` (`{args.cloud_weights}`), server time divided by '
        f'{args.cloud_speedup:g}. JPEG quality {args.jpeg_quality}.', '',
        f'Measured on this machine: local inference p50 {_pct(local_ms, 50)} ms / p95 '
        f'{_pct(local_ms, 95)} ms; cloud server (decode + inference) p50 '
        f'{_pct(server_ms, 50)} ms / p95 {_pct(server_ms, 95)} ms; request '
        f'{np.mean([f.request_bytes for f in frames]) / 1e3:.0f} kB on average.', '',
        'mAP is COCO mAP@[.5:.95] (pycocotools); mAP50 in parentheses. *cloud in time*: share '
        'of frames whose cloud result arrives by the deadline; *late*: share of frames whose '
        'fused result came after the deadline because even the local detector was slower.', '']
    for profile, result in results.items():
        arrived = [c for c in result['cloud_ms'] if c is not None]
        lines += [f'## `{profile}`', '',
                  f'Cloud result after p50 {_pct(arrived, 50)} ms / p95 {_pct(arrived, 95)} ms; '
                  f'{sum(c is None for c in result["cloud_ms"])} of {len(frames)} requests lost '
                  'to outages.', '',
                  '| deadline ms | cloud in time | local-only | cloud-only | speculative | late |',
                  '|---:|---:|---:|---:|---:|---:|']
        for row in result['rows']:
            cells = [f'{row[p]:.3f} ({row[p + "_mAP50"]:.3f})' for p in POLICIES]
            lines.append(f'| {row["deadline_ms"]:g} | {row["cloud_in_time"]:.0%} | '
                         + ' | '.join(cells) + f' | {row["late"]:.0%} |')
        lines.append('')
    lines += ['![mAP vs deadline](map_vs_deadline.png)', '',
              '![latency CDF](latency_cdf.png)', '']
    report = out / 'report.md'
    report.write_text('\n'.join(lines))
    _plot_map(out / 'map_vs_deadline.png', results)
    _plot_latency(out / 'latency_cdf.png', frames, results)
    (out / 'results.json').write_text(json.dumps(
        {'args': {k: str(v) for k, v in vars(args).items()}, 'results': results,
         'frames': [{k: v for k, v in asdict(f).items() if k.endswith(('_ms', '_bytes'))}
                    for f in frames]}, indent=1))
    return report


def _plot_map(path: Path, results: dict) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), sharey=True,
                             squeeze=False)
    for ax, (profile, result) in zip(axes[0], results.items()):
        deadlines = [r['deadline_ms'] for r in result['rows']]
        for policy, style in zip(POLICIES, ('s--', 'o--', 'D-')):
            ax.plot(deadlines, [r[policy] for r in result['rows']], style,
                    label=policy.replace('_', '-'))
        ax.set(title=f'network: {profile}', xlabel='deadline (ms)', xscale='log')
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('mAP@[.5:.95]')
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_latency(path: Path, frames: list[MeasuredFrame], results: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))

    def cdf(values: list[float], label: str, style: str) -> None:
        ordered = np.sort(values)
        ax.step(ordered, np.arange(1, len(ordered) + 1) / len(frames), style, where='post',
                label=label)

    cdf([f.local_ms for f in frames], 'local inference', 'k-')
    for profile, result in results.items():
        cdf([c for c in result['cloud_ms'] if c is not None], f'cloud via {profile}', '-')
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
    measured = measure(frames, local, cloud, args.jpeg_quality, args.max_image_side)
    height, width = frames[0].rgb.shape[:2]
    results = evaluate(measured, args.profiles, sorted(args.deadlines_ms), args.seed,
                       args.cloud_speedup, (width, height))
    report = write_report(args.out, args, measured, results)
    print(report.read_text())
    print(f'report: {report}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
