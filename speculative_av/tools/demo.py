"""
The demo: speculative detection on a synthetic drive, under an emulated mobile network.

Generates a short recording, starts the cloud server, a network relay with a realistic profile,
the speculative_detector node (sim time) and a recorder of its outputs, replays the recording,
then prints a summary table and writes an annotated video and plots. Everything it starts is
stopped before it returns, also on errors and Ctrl-C.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import IO

import cv2
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import matplotlib
import numpy as np
from rclpy.node import Node
from speculative_av.core.detections import Detections
from speculative_av.ros.messages import detections_from_msg, draw_debug_image
from speculative_av.ros.spinning import background_node
from speculative_av.scenes.generator import CATEGORIES
from speculative_av.tools.coco_metrics import coco_map
from speculative_av.tools.evaluate import add_model_arguments, read_recording, RecordedFrame
from speculative_av.tools.make_recording import make_recording
from speculative_av.tools.ros_isolation import fastdds_shm_files, isolate, remove_stale_shm
from tqdm import tqdm
from vision_msgs.msg import Detection2DArray

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402,I100  (after choosing the headless backend)

OUTPUT_TOPICS = ['/detections', '/detections/local', '/detections/cloud',
                 '/speculation/decisions', '/diagnostics']


def _stamp(msg: Detection2DArray) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


@dataclass
class Watcher:
    """The demo's own subscriber: what a planning node would see, kept for the summary."""

    node: Node
    fused: dict[int, Detections] = field(default_factory=dict)
    local: dict[int, Detections] = field(default_factory=dict)
    cloud: dict[int, Detections] = field(default_factory=dict)
    decisions: dict[int, dict[str, str]] = field(default_factory=dict)
    health: dict[str, str] = field(default_factory=dict)
    counters: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, dict[str, str]] = field(default_factory=dict)  # by status name

    def __post_init__(self) -> None:
        """Subscribe to the node's outputs."""
        for topic, store in (('detections', self.fused), ('detections/local', self.local),
                             ('detections/cloud', self.cloud)):
            self.node.create_subscription(
                Detection2DArray, topic,
                lambda m, s=store: s.__setitem__(_stamp(m), detections_from_msg(m)), 100)
        self.node.create_subscription(DiagnosticStatus, 'speculation/decisions',
                                      self._on_decision, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)

    def status(self, suffix: str) -> dict[str, str]:
        """Return the latest values of the node's ``<node>: <suffix>`` status; {} if none came."""
        for name, values in self.statuses.items():
            if name.endswith(f': {suffix}'):
                return values
        return {}

    def _on_decision(self, msg: DiagnosticStatus) -> None:
        values = {kv.key: kv.value for kv in msg.values}
        self.decisions[round(float(values['stamp']) * 1e9)] = values

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            self.statuses[status.name] = values
            if status.name.endswith(': speculation'):
                self.counters = values
            elif 'health' in values:
                self.health[status.hardware_id] = values['health']


class Processes:
    """Child processes of the demo, each logging to its own file, all stopped on exit."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        """Log into ``log_dir``; start every child with ``env``."""
        self._log_dir, self._env = log_dir, env
        self._children: list[tuple[str, subprocess.Popen[str], IO[str]]] = []

    def start(self, name: str, command: list[str], announce: str = '') -> tuple[
            subprocess.Popen[str], str]:
        """Start ``command``; with ``announce``, wait for its first stdout line and return it."""
        log = open(self._log_dir / f'{name}.log', 'w')
        process = subprocess.Popen(command, env=self._env, text=True, stderr=log,
                                   stdout=subprocess.PIPE if announce else log)
        self._children.append((name, process, log))
        if not announce:
            return process, ''
        assert process.stdout is not None
        line = process.stdout.readline()
        if announce not in line:
            raise RuntimeError(f'{name} did not start (see {log.name}): {line!r}')
        threading.Thread(target=shutil.copyfileobj, args=(process.stdout, log),
                         daemon=True).start()
        return process, line.strip()

    def stop_all(self) -> None:
        """Interrupt the children newest first, as Ctrl-C would; kill any that hang."""
        for name, process, log in reversed(self._children):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    print(f'demo: {name} did not stop; killing it', file=sys.stderr)
                    process.kill()
                    process.wait()
            log.close()
        self._children.clear()


def wait_for(condition: object, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out after {timeout:.0f} s waiting for {what}')
        time.sleep(0.05)


def run_pipeline(args: argparse.Namespace, recording: Path, outputs: Path,
                 frames: int) -> Watcher:
    """Run server, relay, node, recorder and replay; return what the watcher saw."""
    python = [sys.executable, '-m']
    env = dict(os.environ)
    procs = Processes(args.out / 'logs', env)
    try:
        _, line = procs.start('cloud_server', python + [
            'speculative_av.cloud.server', '--host', '127.0.0.1', '--port', '0', '--model',
            args.cloud_model, '--weights', str(args.cloud_weights), '--threads', '2',
            '--insecure'],  # loopback only
            announce='listening on')
        server = line.rsplit(' ', 1)[-1]
        _, line = procs.start('network_relay', python + [
            'speculative_av.netem.relay', '--listen', '127.0.0.1:0', '--target', server,
            '--profile', args.profile, '--seed', str(args.seed)], announce='listening on')
        relay = line.split(' listening on ')[1].split()[0]
        procs.start('speculative_detector', python + [
            'speculative_av.ros.detector_node', '--ros-args', '-p', 'use_sim_time:=true',
            '-p', f'deadline_ms:={args.deadline_ms}', '-p', f'local.model:={args.local_model}',
            '-p', f'local.weights:={args.local_weights}', '-p', 'local.threads:=1',
            '-p', f'cloud.endpoints:=["{relay}"]', '-p', 'cloud.insecure:=true'])
        with background_node('demo_watcher') as node:
            watcher = Watcher(node)
            print(f'demo: cloud server {server} behind a {args.profile} relay {relay}; '
                  'waiting for both models to load', file=sys.stderr)
            wait_for(lambda: watcher.health.get('cloud') == 'SERVING', 120,
                     'the node to see the cloud server (logs in out/demo/logs)')
            procs.start('record', python + ['speculative_av.tools.record', '-o', str(outputs),
                                            *OUTPUT_TOPICS[:4]])
            replay, _ = procs.start('replay', python + [
                'speculative_av.tools.replay', str(recording), '--topics', '/image',
                '--wait-for-subscribers', '1'])
            with tqdm(total=frames, desc='frames decided', unit='frame',
                      file=sys.stderr) as bar:
                while replay.poll() is None:
                    bar.update(len(watcher.decisions) - bar.n)
                    time.sleep(0.1)
                # The last frames resolve at their deadlines (plus the cloud's cancellation).
                wait_for(lambda: watcher.counters and len(watcher.decisions) >= int(
                    watcher.counters.get('frames_processed', 0)), 10 + args.deadline_ms / 1e3,
                    'the last decisions')
                bar.update(len(watcher.decisions) - bar.n)
            if replay.returncode != 0:
                raise RuntimeError(f'replay failed ({replay.returncode}); see its log')
            wait_for(lambda: int(watcher.counters.get('frames_received', -1))
                     == len(watcher.decisions) + int(watcher.counters.get('dropped_frames', 0)),
                     3, 'final counters')
    finally:
        procs.stop_all()
    return watcher


def summarize(args: argparse.Namespace, frames: list[RecordedFrame], seen: Watcher) -> str:
    """Return the summary table (markdown) of one demo run."""
    decided = [seen.decisions[f.stamp_ns] for f in frames if f.stamp_ns in seen.decisions]
    winners = [d['winner'] for d in decided]

    def latencies(key: str) -> list[float]:
        return [float(d[key]) for d in decided if d[key]]

    def misses(source: str) -> int:
        return sum(not d[f'{source}_latency_ms'] or float(d[f'{source}_latency_ms'])
                   > args.deadline_ms for d in decided)

    # Accuracy over the frames the node processed (dropped frames have no result at all).
    processed = [f for f in frames if f.stamp_ns in seen.decisions]
    truth = [f.truth for f in processed]
    size = (frames[0].rgb.shape[1], frames[0].rgb.shape[0])
    empty = Detections.empty()
    cloud_in_time = [seen.cloud.get(f.stamp_ns, empty) if (
        latency := seen.decisions[f.stamp_ns]['cloud_latency_ms']) and float(
        latency) <= args.deadline_ms else empty for f in processed]
    policies = {
        'speculative (fused topic)': [seen.fused.get(f.stamp_ns, empty) for f in processed],
        'local-only': [seen.local.get(f.stamp_ns, empty) for f in processed],
        'cloud-only (if in time)': cloud_in_time,
    }
    lines = [
        f'| frames | {len(frames)} in the recording, {len(decided)} decided, '
        f'{seen.counters.get("dropped_frames", "?")} dropped (newer frame waiting) |',
        '|---|---|',
        f'| winners | cloud {winners.count("cloud")}, local {winners.count("local")}, none '
        f'{winners.count("none")}; late fused results {sum(d["late"] == "true" for d in decided)}'
        ' |',
        f'| deadline misses ({args.deadline_ms:g} ms) | cloud {misses("cloud")}, local '
        f'{misses("local")} |']
    for source in ('local', 'cloud'):
        values = latencies(f'{source}_latency_ms')
        lines.append(f'| {source} latency | p50 {np.percentile(values, 50):.0f} ms, p95 '
                     f'{np.percentile(values, 95):.0f} ms ({len(values)} results) |'
                     if values else f'| {source} latency | no results |')
    after = latencies('published_after_deadline_ms')
    lines.append(f'| fused published after deadline | p50 {np.median(after):.1f} ms, max '
                 f'{max(after):.1f} ms (negative: before it) |')
    for name, predictions in policies.items():
        metrics = coco_map(predictions, truth, CATEGORIES, size)
        lines.append(f'| mAP {name} | {metrics["mAP"]:.3f} (mAP50 {metrics["mAP50"]:.3f}) over '
                     f'the {len(processed)} processed frames |')
    return '\n'.join(lines)


def write_video(path: Path, frames: list[RecordedFrame], seen: Watcher, fps: float) -> Path:
    """Write the fused detections drawn on every frame as mp4; return one annotated PNG."""
    height, width = frames[0].rgb.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*'mp4v'), fps, (width, height))
    still = path.with_name('annotated_frame.png')
    for index, frame in enumerate(frames):
        decision = seen.decisions.get(frame.stamp_ns, {})
        canvas = draw_debug_image(frame.rgb, seen.fused.get(frame.stamp_ns, Detections.empty()),
                                  CATEGORIES, decision.get('winner_source') or None,
                                  decision.get('late') == 'true')
        bgr = cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)
        writer.write(bgr)
        if index == len(frames) // 2:
            cv2.imwrite(str(still), bgr)
    writer.release()
    return still


def plot_latency(path: Path, frames: list[RecordedFrame], seen: Watcher,
                 deadline_ms: float) -> None:
    """Plot each frame's local and cloud latency against the deadline, marking the winner."""
    fig, ax = plt.subplots(figsize=(10, 4))
    for source, color in (('local', 'tab:orange'), ('cloud', 'tab:blue')):
        points = [(i, float(d[f'{source}_latency_ms'])) for i, f in enumerate(frames)
                  if (d := seen.decisions.get(f.stamp_ns)) and d[f'{source}_latency_ms']]
        if points:
            ax.plot(*zip(*points), '.', color=color, label=f'{source} result')
    top = ax.get_ylim()[1] if ax.lines else 2 * deadline_ms
    missing = [i for i, f in enumerate(frames)
               if (d := seen.decisions.get(f.stamp_ns)) and not d['cloud_latency_ms']]
    ax.plot(missing, [max(top, deadline_ms * 1.1)] * len(missing), 'x', color='tab:blue',
            label='cloud result never came (cancelled, lost or failed)')
    ax.axhline(deadline_ms, color='red', lw=1, label=f'deadline {deadline_ms:g} ms')
    for i, f in enumerate(frames):
        if seen.decisions.get(f.stamp_ns, {}).get('winner') == 'cloud':
            ax.axvspan(i - 0.5, i + 0.5, color='tab:blue', alpha=0.08, lw=0)
    ax.set(xlabel='frame (shaded: the cloud result was fused)', ylabel='latency from frame '
           'start (ms)', title='per-frame latency against the deadline')
    ax.legend(loc='upper right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the command line options."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('out/demo'))
    parser.add_argument('--frames', type=int, default=100)
    parser.add_argument('--fps', type=float, default=5.0,
                        help='camera rate; the CPU-bound cloud server of this demo keeps up '
                        'with 5')
    parser.add_argument('--seed', type=int, default=7, help='drive and network seed')
    parser.add_argument('--profile', default='good-lte',
                        help='network profile of the relay (config/network_profiles.yaml)')
    parser.add_argument('--deadline-ms', type=float, default=500.0)
    add_model_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo end to end and print its summary."""
    args = parse_args(argv)
    started = time.monotonic()
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / 'logs').mkdir(parents=True)
    isolate(os.environ)
    shm_before = fastdds_shm_files()
    recording = make_recording(args.out / 'recording', frames=args.frames, fps=args.fps,
                               seed=args.seed, width=640, height=480)
    try:
        seen = run_pipeline(args, recording, args.out / 'outputs', args.frames)
    finally:
        remove_stale_shm(shm_before)
    frames = read_recording(recording, '/image', '/ground_truth')
    table = summarize(args, frames, seen)
    still = write_video(args.out / 'annotated.mp4', frames, seen, args.fps)
    plot_latency(args.out / 'latency.png', frames, seen, args.deadline_ms)
    report = (f'# Demo: {args.frames} frames, deadline {args.deadline_ms:g} ms, network '
              f'{args.profile}\n\n{table}\n\nOutputs in {args.out}: annotated.mp4, {still.name}, '
              "latency.png, outputs/ (rosbag2 of the node's topics), logs/\n")
    (args.out / 'summary.md').write_text(report)
    print(report)
    print(f'demo finished in {time.monotonic() - started:.0f} s', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
