r"""
Gate a candidate local model against the deployed one on held-out drives, per condition.

Both checkpoints run on the same held-out frames (:mod:`speculative_av.tools.conditions`);
the command prints a per-condition table, writes ``gate.json`` and ``gate.png`` and exits 0
when the candidate is accepted, 1 when it is rejected (2: it could not be evaluated)::

    python -m speculative_av.tools.gate --deployed models/local_ssdlite320.pt \
        --candidate out/candidate.pt --out out/gate
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import math
from pathlib import Path
import pickle
import sys
import time
from typing import Sequence

import matplotlib
import numpy as np
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.scenes import CATEGORIES
from speculative_av.tools import conditions
from speculative_av.tools.conditions import GateVerdict, HeldoutDrives
import torch

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402,I100  (after choosing the headless backend)

ACCEPTED, REJECTED, FAILED = 0, 1, 2  # exit codes
DRIVES_PER_PERIOD = 8  # 24 drives, 360 frames, ~4100 boxes: see conditions.DEFAULT_TOLERANCE
MAX_DRIVES_PER_PERIOD = 1000  # finding seeds per period is a loop over seeds: keep it bounded


@dataclass(frozen=True)
class GateSettings:
    """How a gate run evaluates: which held-out frames and how strictly it judges."""

    drives: HeldoutDrives
    tolerance: float = conditions.DEFAULT_TOLERANCE
    min_boxes: int = conditions.DEFAULT_MIN_BOXES
    score_threshold: float = 0.0  # keep every detection: mAP counts low-scoring hits too


@dataclass(frozen=True)
class GateReport:
    """A gate run: the verdict, what was compared and how long the evaluation took."""

    verdict: GateVerdict
    deployed: str
    candidate: str
    frames: int
    frames_per_period: dict[str, int]
    seconds_per_frame: dict[str, float]
    evaluation_seconds: float

    def as_dict(self) -> dict:
        """Return plain data for gate.json."""
        return {'deployed': self.deployed, 'candidate': self.candidate, 'frames': self.frames,
                'frames_per_period': self.frames_per_period,
                'seconds_per_frame': self.seconds_per_frame,
                'evaluation_seconds': self.evaluation_seconds, **self.verdict.as_dict()}


def load_detector(checkpoint: str | Path, score_threshold: float = 0.0) -> TorchvisionDetector:
    """Load a checkpoint of :mod:`speculative_av.tools.train` (architecture read from it)."""
    try:
        stored = torch.load(checkpoint, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f'{checkpoint}: cannot load: {exc}') from None
    architecture = stored.get('architecture') if isinstance(stored, dict) else None
    if not isinstance(architecture, str):
        raise ValueError(f'{checkpoint}: no architecture recorded; not a train.py checkpoint')
    detector = TorchvisionDetector(architecture, str(checkpoint), score_threshold=score_threshold)
    if detector.categories != CATEGORIES:
        raise ValueError(f'{checkpoint}: categories {detector.categories}, the held-out scenes '
                         f'have {CATEGORIES}')
    return detector


def run_gate(deployed: str | Path, candidate: str | Path, settings: GateSettings) -> GateReport:
    """Evaluate both checkpoints on the same held-out frames and gate the candidate."""
    started = time.monotonic()
    detectors = {name: load_detector(path, settings.score_threshold).detect
                 for name, path in (('deployed', deployed), ('candidate', candidate))}
    truths, predictions, seconds = conditions.run_detectors(detectors, settings.drives)
    size = (settings.drives.width, settings.drives.height)
    before = conditions.condition_map(predictions['deployed'], truths, CATEGORIES, size)
    after = conditions.condition_map(predictions['candidate'], truths, CATEGORIES, size)
    verdict = conditions.gate(before, after, settings.tolerance, settings.min_boxes)
    per_period = {p: sum(t.period == p for t in truths) for p in conditions.world.PERIODS}
    return GateReport(verdict, str(deployed), str(candidate), len(truths), per_period, seconds,
                      time.monotonic() - started)


def write_report(out: Path, report: GateReport) -> tuple[Path, Path]:
    """Write gate.json and gate.png (mAP per condition, both models) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    data, plot = out / 'gate.json', out / 'gate.png'
    data.write_text(json.dumps(report.as_dict(), indent=1, allow_nan=False))
    rows = (report.verdict.total, *report.verdict.conditions)
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.6))
    y = np.arange(len(rows))[::-1]
    ax.barh(y + 0.2, [r.before for r in rows], 0.4, label='deployed', color='tab:gray')
    colors = ['tab:red' if r.status == 'regressed' else 'tab:blue' for r in rows]
    bars = ax.barh(y - 0.2, [r.after for r in rows], 0.4, label='candidate', color=colors)
    for bar, row in zip(bars, rows):
        if row.status == 'too_few_boxes':
            bar.set_hatch('//')
            bar.set_alpha(0.5)
    ax.set_yticks(y, [f'{r.name} ({r.boxes})' for r in rows])
    verdict = 'accepted' if report.verdict.accepted else 'rejected'
    ax.set(xlabel='mAP@[.5:.95] (hatched: too few boxes, not gated; red: regressed)',
           title=f'candidate {verdict}: tolerance {report.verdict.tolerance:g}, '
                 f'{report.frames} held-out frames')
    ax.grid(axis='x', alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    return data, plot


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command line options."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--deployed', type=Path, required=True, help='deployed checkpoint')
    parser.add_argument('--candidate', type=Path, required=True, help='candidate checkpoint')
    parser.add_argument('--drives-per-period', type=int, default=DRIVES_PER_PERIOD,
                        help='held-out drives of each time of day (day, dusk, night)')
    parser.add_argument('--frames', type=int, default=15, help='frames per drive')
    parser.add_argument('--fps', type=float, default=2.0, help='frame rate the drives are '
                        'sampled at (lower: frames further apart)')
    parser.add_argument('--tolerance', type=float, default=conditions.DEFAULT_TOLERANCE,
                        help='largest mAP loss (absolute, 0.01 = one point) a condition may have')
    parser.add_argument('--min-boxes', type=int, default=conditions.DEFAULT_MIN_BOXES,
                        help='conditions with fewer ground-truth boxes are reported, not gated')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--out', type=Path, default=Path('out/gate'))
    args = parser.parse_args(argv)
    if args.drives_per_period < 1 or args.frames < 1 or not args.fps > 0 or args.threads < 1:
        parser.error('--drives-per-period, --frames, --fps and --threads must be positive')
    if args.drives_per_period > MAX_DRIVES_PER_PERIOD or not math.isfinite(args.fps):
        parser.error(f'--drives-per-period at most {MAX_DRIVES_PER_PERIOD}; --fps finite')
    if not (0.0 <= args.tolerance < 1.0) or args.min_boxes < 1:
        parser.error('--tolerance must be in [0, 1) and --min-boxes positive')
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Gate, print the table and where the report is; the exit code is the verdict."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    drives = HeldoutDrives(conditions.heldout_drive_seeds(args.drives_per_period), args.frames,
                           args.fps)
    settings = GateSettings(drives, args.tolerance, args.min_boxes)
    try:
        report = run_gate(args.deployed, args.candidate, settings)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f'gate: cannot evaluate: {exc}', file=sys.stderr)
        return FAILED
    data, plot = write_report(args.out, report)
    print(conditions.format_table(report.verdict))
    print(f'{report.frames} frames ({report.frames_per_period}); '
          + ', '.join(f'{name} {s * 1e3:.0f} ms/frame'
                      for name, s in report.seconds_per_frame.items())
          + f'; {report.evaluation_seconds:.0f} s in all; {data}, {plot}', file=sys.stderr)
    return ACCEPTED if report.verdict.accepted else REJECTED


if __name__ == '__main__':
    sys.exit(main())
