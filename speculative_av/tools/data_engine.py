"""
The fleet data engine in one command: mine, upload, curate, fine-tune, gate, ship, measure.

1. **Drive A** (the fleet): the vehicle's own engine runs the mining drives in simulated time
   (:mod:`~speculative_av.tools.simulated_drive`) with the deployed local model racing the cloud
   model under an emulated network; the trigger recorder keeps the frames where they disagree,
   the local model is unsure or the cloud missed its deadline, as snippets.
2. **Upload**: the vehicle's uploader streams the snippets to a ``snippet_collector`` process.
3. **Curate**: the collected snippets become a training set, the cloud's answers as labels.
4. **Fine-tune** the deployed model from its checkpoint on that set, with generated scenes
   (the original training data) mixed into every batch.
5. **Gate**: deployed and candidate on held-out drives, mAP per condition; a candidate that
   does not improve the total, or loses a condition beyond the tolerance, is not shipped.
6. **Ship**: the candidate is signed, and a running ``speculative_detector`` (real processes over
   DDS, with a cloud server and the collector) swaps to it over the air in the middle of drive
   B, with triggers and upload on; every image is counted against the fused results.
7. **Drive B**: the improvement, deployed vs candidate, per condition on held-out drives no
   earlier step saw.

Writes ``report.md``, ``report.json`` and ``conditions.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import os
from pathlib import Path
import shutil
import sys
import time
from typing import Any

import grpc
from rcl_interfaces.srv import SetParameters
from rclpy.client import Client
from rclpy.parameter import Parameter
from speculative_av.core.arbiter import FrameRecord
from speculative_av.core.deadline import DeadlinePolicy
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.engine.engine import EngineSettings, Frame
from speculative_av.fleet.model_manifest import load_private_key, release
from speculative_av.fleet.recorder import TriggerRecorder
from speculative_av.fleet.snippets import SnippetStore
from speculative_av.fleet.triggers import TriggerSettings
from speculative_av.fleet.uploader import SnippetUploader
from speculative_av.netem.profiles import load_profiles, NetworkModel
from speculative_av.package_files import model_path
from speculative_av.ros.spinning import background_node
from speculative_av.scenes import CATEGORIES, render_drive
from speculative_av.tools import conditions, train
from speculative_av.tools.curate import curate, CurateSettings, snippet_files
from speculative_av.tools.demo import Processes, wait_for, Watcher
from speculative_av.tools.evaluate import measure_local, RecordedFrame
from speculative_av.tools.gate import GateSettings, run_gate, write_report as write_gate
from speculative_av.tools.make_recording import make_recording
from speculative_av.tools.model_release import keygen
from speculative_av.tools.ros_isolation import fastdds_shm_files, isolate, remove_stale_shm
from speculative_av.tools.simulated_drive import simulate_drive, SimulatedServer

# Drive seeds of each step, apart from each other, from training scenes (< 1e9), the held-out
# scenes (1e9 on) and the gate's held-out drives (conditions.HELDOUT_DRIVE_SEED_BASE on).
MINING_DRIVE_SEED_BASE = 1_600_000_000
DRIVE_B_SEED_BASE = 1_800_000_000
LOCAL_MODEL = 'ssdlite320_mobilenet_v3_large'
CAMERA = 'camera'
DRIVE_GAP_NS = 3_600 * 10**9  # each mining drive an hour after the last, on one clock
START_NS = 1_700_000_000 * 10**9


@dataclass(frozen=True)
class MiningResult:
    """What drive A produced on the vehicle."""

    frames: int
    decisions: dict[str, int]  # winner -> frames
    recorder: dict[str, int]  # the trigger recorder's and its store's counters
    seconds: float


def mine(args: argparse.Namespace, store: SnippetStore, deployed: TorchvisionDetector,
         cloud: TorchvisionDetector) -> MiningResult:
    """Drive the mining drives through the vehicle's engine, recording triggered frames."""
    started = time.monotonic()
    clock_s = [0.0]  # the recorder's rate limit runs on the drives' virtual clock
    recorder = TriggerRecorder(
        TriggerSettings(disagreement=True, min_score=args.trigger_min_score,
                        low_confidence=args.trigger_low_confidence, deadline_miss=True,
                        max_per_minute=args.triggers_per_minute, burst=10),
        store, CATEGORIES, queue_size=args.mining_frames, clock=lambda: clock_s[0])
    server = SimulatedServer(cloud)
    profile = load_profiles()[args.profile]
    settings = EngineSettings(DeadlinePolicy.from_ms(args.deadline_ms))
    model = f'{deployed.model_name}:{deployed.model_version}'
    seeds = conditions.heldout_drive_seeds(args.mining_drives_per_period, MINING_DRIVE_SEED_BASE)
    winners: dict[str, int] = {}
    frames_total = 0
    for index, seed in enumerate(seeds):
        print(f'drive A {index + 1}/{len(seeds)}: drive {seed}', file=sys.stderr)
        frames = measure_local([
            RecordedFrame(START_NS + index * DRIVE_GAP_NS + k * 100_000_000, k / 10, scene.image,
                          scene.ground_truth())
            for k, scene in enumerate(render_drive(seed, args.mining_frames))], deployed)
        images = {frame.stamp_ns: frame.rgb for frame in frames}

        def on_settled(frame: Frame[None], record: FrameRecord) -> None:
            clock_s[0] = frame.stamp_ns / 1e9
            recorder.offer(frame.camera, frame.stamp_ns, frame.frame_id,
                           images[frame.stamp_ns], record, ['cloud'], model,
                           frame.cloud_models)

        recorder.start()
        result = simulate_drive(frames, server, NetworkModel(profile, seed), settings,
                                on_settled=on_settled)
        recorder.stop()  # writes what is queued
        for outcome in result.frames.values():
            assert outcome.decision is not None
            winner = outcome.decision.winner or 'none'
            winners[winner] = winners.get(winner, 0) + 1
        frames_total += len(frames)
    return MiningResult(frames_total, winners, recorder.snapshot(), time.monotonic() - started)


def upload(store: SnippetStore, target: str, timeout_s: float) -> dict[str, Any]:
    """Stream every pending snippet to the collector at ``target``; return the uploader's stats."""
    pending = len(store.pending())
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:  # loopback
        uploader = SnippetUploader(store, channel, link_busy=lambda: False)
        uploader.start()
        try:
            wait_for(lambda: not store.pending(), timeout_s,
                     f'{pending} snippets to reach the collector')
        finally:
            uploader.stop()
    stats = vars(uploader.stats())
    return {'snippets': pending, 'seconds': round(time.monotonic() - started, 2), **stats}


def fine_tune(args: argparse.Namespace, dataset: Path | None, out: Path,
              iterations: int = 0) -> dict[str, Any]:
    """
    Fine-tune the deployed model; return the checkpoint's metadata.

    With ``dataset``, half of each batch (``--mix-generated``) comes from it; without, every
    image is a generated scene (the control). ``iterations`` (0: the command line's budget)
    fixes the length, so the control trains exactly as long as the candidate did.
    """
    iterations = iterations or args.train_iterations
    budget = (['--iterations', str(iterations)] if iterations
              else ['--minutes', str(args.train_minutes)])
    data = ([] if dataset is None
            else ['--dataset', str(dataset), '--mix-generated', str(args.mix_generated)])
    return train.run([
        '--init', str(args.deployed), *data, *budget, '--batch-size', '8', '--lr', str(args.lr),
        '--eval-scenes', '20', '--threads', str(args.threads), '--out', str(out)])


def ship(candidate: Path, version: str, keys: Path) -> tuple[Path, Path]:
    """Sign ``candidate`` with a new release key; return the manifest and the public key."""
    keys.mkdir(parents=True, exist_ok=True)
    private, public = keys / 'release_private.pem', keys / 'release_public.pem'
    keygen(private, public)
    manifest = release(candidate, name='local-ssdlite', version=version,
                       architecture=LOCAL_MODEL, private_key=load_private_key(private))
    return manifest, public


@dataclass(frozen=True)
class SwapResult:
    """The over-the-air swap in a running node, counted over drive B."""

    images: int
    received: int
    fused: int
    late: int
    dropped: int  # by the node's newest-frame slots (a newer frame was waiting)
    models: dict[str, int]  # local model name:version -> frames it answered
    model_status: dict[str, str]
    shadow_status: dict[str, str]  # the candidate in shadow mode, just before the swap
    trigger_status: dict[str, str]
    upload_status: dict[str, str]


def swap_live(args: argparse.Namespace, candidate: Path, manifest: Path, public_key: Path,
              collector: str, out: Path) -> SwapResult:
    """
    Replay drive B into a live node and swap its local model over the air midway.

    Until the swap the candidate runs in shadow mode beside the deployed model; its agreement
    (per estimated period) is taken the moment before the swap.
    """
    recording = make_recording(out / 'drive_b_recording', frames=args.live_frames, fps=args.fps,
                               seed=conditions.heldout_drive_seeds(1, DRIVE_B_SEED_BASE)[0],
                               width=640, height=480)
    python = [sys.executable, '-m']
    procs = Processes(out / 'logs', dict(os.environ))
    try:
        _, line = procs.start('cloud_server', python + [
            'speculative_av.cloud.server', '--host', '127.0.0.1', '--port', '0', '--model',
            args.cloud_model, '--weights', str(args.cloud_weights), '--threads', '1',
            '--insecure'], announce='listening on')
        server = line.rsplit(' ', 1)[-1]
        procs.start('speculative_detector', python + [
            'speculative_av.ros.detector_node', '--ros-args', '-p', 'use_sim_time:=true',
            '-p', f'deadline_ms:={args.deadline_ms}', '-p', f'local.model:={LOCAL_MODEL}',
            '-p', f'local.weights:={args.deployed}', '-p', 'local.threads:=1',
            '-p', f'local.trusted_keys:=["{public_key}"]',
            '-p', f'cloud.endpoints:=["{server}"]', '-p', 'cloud.insecure:=true',
            '-p', 'shadow.enabled:=true', '-p', f'shadow.weights:={candidate}',
            '-p', 'shadow.every_nth:=2',
            '-p', 'triggers.enabled:=true', '-p', f'triggers.directory:={out / "vehicle_b"}',
            '-p', 'upload.enabled:=true', '-p', f'upload.target:={collector}',
            '-p', 'upload.insecure:=true'])
        with background_node('data_engine_watcher') as node:
            watcher = Watcher(node)
            wait_for(lambda: watcher.health.get('cloud') == 'SERVING', 120,
                     f'the node to see the cloud server (logs in {out / "logs"})')
            replay, _ = procs.start('replay', python + [
                'speculative_av.tools.replay', str(recording), '--topics', '/image',
                '--wait-for-subscribers', '1'])
            wait_for(lambda: len(watcher.decisions) >= args.live_frames // 3, 120,
                     'the first third of drive B')
            shadow = watcher.status('shadow')
            client: Client = node.create_client(SetParameters,
                                                '/speculative_detector/set_parameters')
            if not client.wait_for_service(timeout_sec=10):
                raise RuntimeError('the node offers no set_parameters service')
            future = client.call_async(SetParameters.Request(parameters=[
                Parameter('local.model_manifest', value=str(manifest)).to_parameter_msg()]))
            wait_for(future.done, 10, 'the node to take the release')
            result = future.result()
            if result is None or not result.results[0].successful:
                raise RuntimeError(f'the node refused the release: {result}')
            wait_for(lambda: replay.poll() is not None, 60 + 2 * args.live_frames / args.fps,
                     'the end of drive B')
            if replay.returncode != 0:
                raise RuntimeError(f'replay failed ({replay.returncode}); see its log')
            wait_for(lambda: int(watcher.counters.get('frames_received', -1)) == len(
                watcher.decisions) + int(watcher.counters.get('dropped_frames', 0)),
                10 + args.deadline_ms / 1e3, 'the last decisions')
            wait_for(lambda: int(watcher.status('upload').get('uploaded', 0)) >= int(
                watcher.status('triggers').get('written', 0)), 60, 'the uploads')
            models: dict[str, int] = {}
            for decision in watcher.decisions.values():
                models[decision['local_model']] = models.get(decision['local_model'], 0) + 1
            return SwapResult(
                args.live_frames, int(watcher.counters['frames_received']), len(watcher.fused),
                sum(d['late'] == 'true' for d in watcher.decisions.values()),
                int(watcher.counters.get('dropped_frames', 0)), models,
                watcher.status('local model'), shadow, watcher.status('triggers'),
                watcher.status('upload'))
    finally:
        procs.stop_all()


def measure_drive_b(args: argparse.Namespace, candidate: Path, out: Path) -> dict[str, Any]:
    """Deployed vs candidate, mAP per condition on drive B's held-out drives."""
    drives = conditions.HeldoutDrives(
        conditions.heldout_drive_seeds(args.drive_b_per_period, DRIVE_B_SEED_BASE),
        frames=args.drive_b_frames)
    report = run_gate(args.deployed, candidate, GateSettings(drives))
    write_gate(out, report)
    return report.as_dict()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the command line options."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('out/data_engine'))
    parser.add_argument('--deployed', type=Path, default=model_path('local_ssdlite320.pt'),
                        help='the local model on the vehicles now (a train.py checkpoint)')
    parser.add_argument('--cloud-model', default='fasterrcnn_mobilenet_v3_large_320_fpn')
    parser.add_argument('--cloud-weights', type=Path, default=model_path('cloud_frcnn.pt'))
    parser.add_argument('--profile', default='lte-drive', help='network profile of drive A')
    parser.add_argument('--deadline-ms', type=float, default=200.0)
    parser.add_argument('--mining-drives-per-period', type=int, default=2,
                        help='drive A: this many drives each by day, at dusk and at night')
    parser.add_argument('--mining-frames', type=int, default=150, help='per mining drive (10 Hz)')
    parser.add_argument('--trigger-min-score', type=float, default=0.5)
    parser.add_argument('--trigger-low-confidence', type=float, default=0.3)
    parser.add_argument('--triggers-per-minute', type=float, default=240.0)
    parser.add_argument('--train-minutes', type=float, default=6.0)
    parser.add_argument('--train-iterations', type=int, default=0,
                        help='train this many batches instead of --train-minutes (0: minutes)')
    parser.add_argument('--mix-generated', type=float, default=0.5,
                        help='share of each batch from generated scenes with ground truth')
    parser.add_argument('--lr', type=float, default=5e-4)
    parser.add_argument('--control', action=argparse.BooleanOptionalAction, default=True,
                        help='also train a control as long on generated scenes only and compare '
                             'it with the candidate on the gate drives')
    parser.add_argument('--gate-per-period', type=int, default=8)
    parser.add_argument('--gate-frames', type=int, default=15)
    parser.add_argument('--tolerance', type=float, default=conditions.DEFAULT_TOLERANCE)
    parser.add_argument('--live-frames', type=int, default=60, help='drive B replayed live')
    parser.add_argument('--fps', type=float, default=5.0, help='drive B camera rate')
    parser.add_argument('--drive-b-per-period', type=int, default=4)
    parser.add_argument('--drive-b-frames', type=int, default=15)
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    return parser.parse_args(argv)


def condition_table(gate_dict: dict[str, Any]) -> list[str]:
    """Return a gate run's rows as a markdown table."""
    def cell(value: float | None, sign: str = '') -> str:
        return '–' if value is None else f'{value:{sign}.3f}'

    lines = ['| condition | boxes | deployed | candidate | change | status |',
             '|---|---:|---:|---:|---:|---|']
    lines += [f"| {r['condition']} | {r['boxes']} | {cell(r['before'])} | {cell(r['after'])} | "
              f"{cell(r['change'], '+')} | {r['status']} |" for r in gate_dict['rows']]
    return lines


def write_report(out: Path, steps: dict[str, Any]) -> Path:
    """Write report.md from the steps' results; return its path."""
    mining, sent, kept = steps['mining'], steps['upload'], steps['curate']
    recorder = mining['recorder']
    reasons = ', '.join(f'{k[len("reason_"):]} {v}' for k, v in recorder.items()
                        if k.startswith('reason_') and v)
    lines = [
        '# The fleet data engine, one loop', '',
        f"`{steps['command']}` in {steps['seconds']} s.", '',
        '| step | result |', '|---|---|',
        f"| drive A (mining) | {mining['frames']} frames in {mining['seconds']:.0f} s; winners "
        + ', '.join(f'{k} {v}' for k, v in sorted(mining['decisions'].items()))
        + ' |',
        f"| triggers | {recorder['triggered']} frames triggered ({reasons}); "
        f"{recorder['rate_limited']} rate-limited, {recorder['queue_full']} queue full; "
        f"{recorder['written']} snippets written |",
        f"| upload | {sent['uploaded']} snippets stored, {sent['duplicates']} duplicate(s), "
        f"{sent['bytes_sent'] / 1e6:.1f} MB in {sent['seconds']:.1f} s |",
        f"| curate | {kept['images']} images, {kept['labels']} cloud pseudo-labels "
        f"({kept['near_duplicates']} near and {kept['exact_duplicates']} exact duplicates, "
        f"{kept['teacher_labelled']} not answered in the drive labelled by the cloud model "
        f"afterwards, {kept['malformed']} malformed) |",
        f"| fine-tune | {steps['train']['images_seen']} images "
        f"({steps['train']['dataset_images_seen']} curated) in "
        f"{steps['train']['train_seconds']:.0f} s |"]
    gate = steps['gate']
    lines += [f"| gate | {'ACCEPTED' if gate['accepted'] else 'REJECTED'} on {gate['frames']} "
              f"held-out frames (tolerance {gate['tolerance']:g})"
              + ('' if gate['accepted'] else ': ' + '; '.join(gate['reasons'])) + ' |']
    swap = steps.get('swap')
    if swap is not None:
        shadow = swap['shadow_status']
        models = ', '.join(f'{k} {v}' for k, v in swap['models'].items())
        lines += [f"| over-the-air swap | {swap['images']} images published, "
                  f"{swap['received']} received, {swap['fused']} fused, {swap['late']} late, "
                  f"{swap['dropped']} dropped; frames per local model: {models} |",
                  '| shadow mode, until the swap | candidate vs deployed / vs cloud agreement: '
                  + (', '.join(f"{p} {shadow[f'{p}_agreement_deployed']} / "
                               f"{shadow[f'{p}_agreement_cloud']} ({shadow[f'{p}_frames']} frames)"
                               for p in ('day', 'dusk', 'night')
                               if int(shadow.get(f'{p}_frames', 0)))
                     or 'no frame compared') + ' (periods estimated from the image) |',
                  f"| live triggers and upload | {swap['trigger_status'].get('written', '?')} "
                  f"snippets written, {swap['upload_status'].get('uploaded', '?')} uploaded "
                  'while detection calls ran |']
    control = steps.get('control')
    if control is not None:
        total = control['rows'][0]
        lines += ['| control: as long on generated scenes only | gate-drive mAP '
                  f"{total['before']:.3f}; the candidate with the mined frames "
                  f"{total['after']:.3f} ({total['change']:+.3f}) |"]
    lines += ['', '## Gate: held-out drives per condition', '', *condition_table(gate)]
    if control is not None:
        lines += ['', '## Control: the mined frames against as much training without them', '',
                  'The same fine-tuning, as many iterations, every image a generated scene with '
                  'exact ground truth ("deployed" column) vs the candidate:', '',
                  *condition_table(control)]
    drive_b = steps.get('drive_b')
    if drive_b is not None:
        total = drive_b['rows'][0]
        lines += ['', '## Drive B: the improvement on drives no step saw', '',
                  f"Local model mAP {total['before']:.3f} -> {total['after']:.3f} "
                  f"({total['change']:+.3f}) on {drive_b['frames']} frames; per condition "
                  '(plot: drive_b/gate.png):', '', *condition_table(drive_b)]
    path = out / 'report.md'
    path.write_text('\n'.join(lines) + '\n')
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the whole loop and print its report."""
    args = parse_args(argv)
    began = time.monotonic()
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / 'logs').mkdir(parents=True)
    isolate(os.environ)
    shm_before = fastdds_shm_files()
    steps: dict[str, Any] = {'command': ' '.join(['data_engine', *(argv or sys.argv[1:])])}
    procs = Processes(args.out / 'logs', dict(os.environ))
    try:
        _, line = procs.start('snippet_collector', [
            sys.executable, '-m', 'speculative_av.cloud.collector', '--root',
            str(args.out / 'cloud' / 'collector'), '--host', '127.0.0.1', '--port', '0',
            '--insecure', '--min-free-mb', '64'], announce='listening on')
        collector = line.rsplit(' ', 1)[-1]
        deployed = TorchvisionDetector(LOCAL_MODEL, str(args.deployed), threads=args.threads,
                                       score_threshold=0.05)
        cloud = TorchvisionDetector(args.cloud_model, str(args.cloud_weights),
                                    threads=args.threads, score_threshold=0.05)
        store = SnippetStore(args.out / 'vehicle_a' / 'snippets', 1 << 30)
        mining = mine(args, store, deployed, cloud)
        steps['mining'] = vars(mining)
        steps['upload'] = upload(store, collector, 300)
        dataset, curated = curate(snippet_files([args.out / 'cloud' / 'collector' / 'snippets']),
                                  args.out / 'cloud' / 'curated',
                                  CurateSettings(min_score=args.trigger_min_score),
                                  teacher=cloud)
        steps['curate'] = {**curated.as_dict(), 'images': len(dataset), 'labels': dataset.boxes}
        candidate = args.out / 'cloud' / 'candidate_ssdlite320.pt'
        metadata = fine_tune(args, dataset.directory, candidate)
        steps['train'] = {k: metadata[k] for k in ('train_seconds', 'iterations', 'images_seen',
                                                   'dataset_images_seen', 'heldout_metrics')}
        gate_settings = GateSettings(conditions.HeldoutDrives(
            conditions.heldout_drive_seeds(args.gate_per_period), frames=args.gate_frames),
            tolerance=args.tolerance)
        gate_report = run_gate(args.deployed, candidate, gate_settings)
        write_gate(args.out / 'gate', gate_report)
        steps['gate'] = gate_report.as_dict()
        if args.control:  # what the same training without the mined frames would have done
            control = args.out / 'cloud' / 'control_generated_only.pt'
            fine_tune(args, None, control, iterations=metadata['iterations'])
            control_report = run_gate(control, candidate, gate_settings)
            write_gate(args.out / 'control', control_report)
            steps['control'] = control_report.as_dict()
        if gate_report.verdict.accepted:
            manifest, public_key = ship(candidate, time.strftime('%Y.%m.%d-%H%M%S'),
                                        args.out / 'keys')
            steps['swap'] = vars(swap_live(args, candidate, manifest, public_key, collector,
                                           args.out))
            steps['drive_b'] = measure_drive_b(args, candidate, args.out / 'drive_b')
    finally:
        procs.stop_all()
        remove_stale_shm(shm_before)
    steps['seconds'] = round(time.monotonic() - began)
    (args.out / 'report.json').write_text(json.dumps(steps, indent=1, default=str))
    report = write_report(args.out, steps)
    print(report.read_text())
    return 0 if 'drive_b' in steps else 1


if __name__ == '__main__':
    sys.exit(main())
