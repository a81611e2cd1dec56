"""
Soak: a looping 30 Hz replay while the cloud server flaps every 20 s, for minutes.

A 5 s synthetic drive (``make_recording``) is replayed with ``replay --loop``: at every loop the
header stamps step back 5 s, which the node must take as its camera's clock restarting rather
than dropping every later frame as stale. The node counts from each frame's arrival
(``deadline_reference: arrival``: the recording's stamps are from 2023). The cloud server is
started and stopped in turns of ``FLAP_S``. Checked from outside, as in ``test_faults.py``:
zero lost fused results among processed frames, every fused result in time at the observer
(or late only when the local result was), frames processed in every phase, threads,
descriptors and RSS flat from the first phase to the last.

The 2-minute run is part of the default test run; ``make benchmark PYTEST_ARGS=test/test_soak.py``
runs the 30-minute one (``SPECULATIVE_AV_SOAK_S`` overrides its length in seconds). Both print
their figures and write them to ``out/soak/``.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass
import json
import os
from pathlib import Path
import subprocess
import sys
import time

from fault_rig import (assert_no_growth, decision_stamp_ns, figures, leaked_shm, observer,
                       ProcessFootprint, RECEIVE_SLACK_MS, settled_footprint, StallWitness,
                       StampObserver, wait_until_quiet)
import numpy as np
import pytest
from ros_harness import running, stop, wait_until
from speculation_rig import cloud_server, detector, free_port

from speculative_av.tools.make_recording import make_recording
from speculative_av.tools.ros_isolation import fastdds_shm_files

DEADLINE_MS = 400.0
FLAP_S = 20.0
RECORDING_FRAMES = 150  # 5 s at 30 Hz: a loop, and a step back of the stamps, every 5 s
RSS_GROWTH_KB = 64 * 1024  # allocator noise; a leak per frame (4 MB/s of images) is far more
OUT = Path(__file__).resolve().parents[1] / 'out' / 'soak'


@dataclass
class Phase:
    """One stretch with the cloud server up or down."""

    cloud_up: bool
    first: int  # index of the first decision received in this phase
    last: int = 0
    seconds: float = 0.0
    footprint: ProcessFootprint | None = None

    def summary(self, observed: StampObserver) -> dict[str, object]:
        """Return the phase's figures."""
        winners = Counter(observed.winners(self.first)[:self.last - self.first])
        return {'cloud': 'up' if self.cloud_up else 'down', 'seconds': round(self.seconds, 1),
                'decided': self.last - self.first, 'cloud_wins': winners['cloud'],
                'local_wins': winners['local'], 'none': winners['none'],
                'footprint': vars(self.footprint) if self.footprint else None}


def _latest_before(times: list[int], when: int) -> int | None:
    """Return the latest of the sorted ``times`` not after ``when``."""
    index = bisect_right(times, when)
    return times[index - 1] if index else None


def receive_lateness(observed: StampObserver) -> tuple[np.ndarray, list[str]]:
    """
    Time each fused result against its frame's deadline, arrival + budget, at the observer.

    Stamps repeat at every loop, so a fused result belongs to the latest image with its stamp
    that reached the observer before it; that image's arrival here stands for its arrival at
    the node (both subscribe to the same publisher). Returns the lateness (ms) and the frames
    later than the slack allows (late only when the frame was marked late and its local result
    came after the deadline), unless the :class:`~fault_rig.StallWitness` saw the delivery
    path stalled then.
    """
    images, local = defaultdict(list), defaultdict(list)
    for stamp, received in observed.images:
        images[stamp].append(received)
    for stamp, received in observed.local:
        local[stamp].append(received)
    decided: dict[int, list[tuple[int, str]]] = defaultdict(list)  # (received, late)
    for (stamp, late), (_, received) in zip(_decisions_by_stamp(observed), observed.decisions):
        decided[stamp].append((received, late))
    witness = StallWitness(observed.images)
    after, problems = [], []
    for stamp, received in observed.fused:
        arrived = _latest_before(images[stamp], received)
        if arrived is None:
            continue  # the observer missed that image (reliable, so only at start-up)
        deadline = arrived + round(DEADLINE_MS * 1e6)
        after_ms = (received - deadline) / 1e6
        after.append(after_ms)
        if after_ms <= RECEIVE_SLACK_MS:
            continue
        local_at = _latest_before(local[stamp], received)
        local_late = local_at is None or local_at > deadline
        # Its decision is the first one with its stamp received after it (settled later).
        later = decided[stamp][bisect_left(decided[stamp], (received, '')):]
        if not (later and later[0][1] == 'true' and local_late) and not witness.stalled(
                received):
            problems.append(f'stamp {stamp}: fused {after_ms:.1f} ms after the deadline, '
                            f'local {"late" if local_late else "in time"}')
    return np.array(after), problems


def _decisions_by_stamp(observed: StampObserver) -> list[tuple[int, str]]:
    """Return (stamp, late) of every decision, stamps matched exactly to fused results."""
    exact = {round(stamp / 1000): stamp for stamp, _ in observed.fused}
    pairs = []
    for decision, _ in observed.decisions:
        us = round(decision_stamp_ns(decision) / 1000)
        stamp = next((exact[k] for k in (us, us - 1, us + 1) if k in exact), us * 1000)
        pairs.append((stamp, decision['late']))
    return pairs


def soak(duration_s: float, tmp_path: Path) -> None:
    """Run the soak for ``duration_s`` (whole flaps of ``FLAP_S``), print and check figures."""
    recording = make_recording(tmp_path / 'drive', frames=RECORDING_FRAMES, fps=30.0, seed=7,
                               width=640, height=480, progress=False)
    port = free_port()
    shm_before = fastdds_shm_files()
    phases: list[Phase] = []
    replay = [sys.executable, '-m', 'speculative_av.tools.replay', str(recording), '--loop',
              '--topics', '/image', '--no-clock', '--qos', 'reliable',
              '--wait-for-subscribers', '2']
    params = {'deadline_ms': DEADLINE_MS, 'deadline_reference': 'arrival',
              'cloud.endpoints': f'["127.0.0.1:{port}"]'}
    with observer() as observed, detector(**params) as node:
        observed.wait_for_node_outputs()
        with running(replay, stdout=subprocess.DEVNULL) as player:
            for index in range(max(2, round(duration_s / FLAP_S))):
                phase = Phase(index % 2 == 0, len(observed.decisions))
                phases.append(phase)
                start = time.monotonic()
                if phase.cloud_up:
                    with cloud_server(port):
                        _hold(start)
                else:
                    _hold(start)
                phase.seconds = time.monotonic() - start
                phase.last = len(observed.decisions)
                phase.footprint = settled_footprint(node.pid)
            stop(player)
            counters = wait_until_quiet(observed, timeout=60)
    leaked = leaked_shm(shm_before)
    lateness, problems = receive_lateness(observed)
    report = _report(duration_s, phases, observed, counters, lateness, problems, leaked)
    fused_stamps = Counter(stamp for stamp, _ in observed.fused)
    decided_stamps = Counter(stamp for stamp, _ in _decisions_by_stamp(observed))
    assert fused_stamps == decided_stamps, 'fused results and decisions differ frame by frame'
    assert all(p.last - p.first >= 3 * FLAP_S for p in phases), \
        f'a phase decided fewer than 3 frames/s: {report["phases"]}'
    assert all(p['cloud_wins'] for p in report['phases'][2::2]), \
        f'the cloud did not win in a later up phase: {report["phases"]}'
    assert not problems, f'{len(problems)} fused results late:\n' + '\n'.join(problems[:5])
    start, end = phases[0].footprint, phases[-1].footprint
    assert start is not None and end is not None
    assert_no_growth(start, end, 'soak')
    assert end.rss_kb - start.rss_kb <= RSS_GROWTH_KB, f'RSS grew: {start} -> {end}'
    assert not leaked, f'/dev/shm files left behind: {sorted(leaked)}'


def _hold(start: float) -> None:
    """Let the phase that began at ``start`` run for ``FLAP_S`` (frames flow meanwhile)."""
    wait_until(lambda: time.monotonic() - start >= FLAP_S, FLAP_S + 60, 'the phase to end')


def _report(duration_s: float, phases: list[Phase], observed: StampObserver,
            counters: dict[str, str], lateness: np.ndarray, problems: list[str],
            leaked: set[str]) -> dict:
    """Print the soak's figures and write them to ``out/soak/``; return them."""
    start, end = phases[0].footprint, phases[-1].footprint
    processed = int(counters['frames_processed'])
    report = {
        'duration_s': duration_s, 'flap_s': FLAP_S, 'deadline_ms': DEADLINE_MS,
        'frames_processed': processed, 'decided': len(observed.decisions),
        'fused': len(observed.fused), 'lost': processed - len(observed.fused),
        'late_marked': sum(d['late'] == 'true' for d, _ in observed.decisions),
        'late_beyond_slack': len(problems), 'counters': counters,
        'clock_resets': counters.get('clock_resets', 'n/a'),
        'after_deadline_ms': figures(lateness),
        'start': vars(start) if start else None, 'end': vars(end) if end else None,
        'phases': [p.summary(observed) for p in phases], 'leaked_shm': sorted(leaked),
    }
    print(f'\nsoak {duration_s:.0f} s: processed {processed}, fused {len(observed.fused)}, '
          f"lost {report['lost']}, late {report['late_marked']} (beyond slack "
          f'{len(problems)}), received after the deadline {figures(lateness)}, clock_resets '
          f"{report['clock_resets']}, stale_frames {counters.get('stale_frames')}\n"
          f'node start {start} -> end {end}')
    for number, phase in enumerate(report['phases']):
        print(f'  phase {number} cloud {phase["cloud"]}: decided {phase["decided"]}, cloud '
              f'wins {phase["cloud_wins"]}, local {phase["local_wins"]}, none {phase["none"]}')
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f'soak_{duration_s:.0f}s.json').write_text(json.dumps(report, indent=2) + '\n')
    return report


def test_soak_2_minutes_looping_replay_with_the_cloud_flapping(tmp_path):
    soak(120.0, tmp_path)


@pytest.mark.benchmark
def test_soak_30_minutes_looping_replay_with_the_cloud_flapping(tmp_path):
    soak(float(os.environ.get('SPECULATIVE_AV_SOAK_S', 1800)), tmp_path)
