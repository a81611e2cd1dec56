"""
Calibrate shadow mode's day/dusk/night estimate on generated scenes and measure its accuracy.

``python -m speculative_av.tools.period_calibration --fit 0:400 --held-out 100000:100300``
fits the two brightness thresholds of :func:`speculative_av.engine.shadow.image_period` on the
first seed range, then reports their accuracy and confusion on the second (seeds no fit saw).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import numpy.typing as npt
from speculative_av.engine.shadow import (DUSK_BELOW, image_brightness, NIGHT_BELOW,
                                          PERIODS)
from speculative_av.scenes.generator import generate_scene


def brightness_and_periods(seeds: range) -> tuple[npt.NDArray[np.float64], list[str]]:
    """Return each seed's scene brightness and its true period (the generator's)."""
    brightness, periods = [], []
    for seed in seeds:
        scene = generate_scene(seed)
        brightness.append(image_brightness(scene.image))
        periods.append(scene.period)
    return np.array(brightness), periods


def classify(brightness: npt.NDArray[np.float64], night_below: float,
             dusk_below: float) -> list[str]:
    """Return the period :func:`image_period` gives each brightness."""
    return ['night' if b < night_below else 'dusk' if b < dusk_below else 'day'
            for b in brightness.tolist()]


def fit_thresholds(brightness: npt.NDArray[np.float64],
                   periods: list[str]) -> tuple[float, float]:
    """
    Return the (night_below, dusk_below) pair classifying the most frames right.

    Of the equally good pairs, the one nearest the middle of them: a cut at the very edge of
    one period's brightest frame would misplace the next such frame.
    """
    values = np.unique(brightness)
    cuts = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1]])
    truth = np.array([PERIODS.index(p) for p in periods])  # day 0, dusk 1, night 2
    scored = []
    for i, low in enumerate(cuts.tolist()):
        for high in cuts[i:].tolist():
            predicted = np.where(brightness < low, 2, np.where(brightness < high, 1, 0))
            scored.append((int(np.count_nonzero(predicted == truth)), low, high))
    best = max(hits for hits, _, _ in scored)
    pairs = np.array([(low, high) for hits, low, high in scored if hits == best])
    middle = np.median(pairs, axis=0)
    low, high = pairs[np.argmin(np.abs(pairs - middle).sum(axis=1))]
    return float(low), float(high)


def accuracy(predicted: list[str], periods: list[str]) -> float:
    """Return the share of frames whose period was estimated right."""
    return sum(p == t for p, t in zip(predicted, periods)) / len(periods)


def confusion(predicted: list[str], periods: list[str]) -> dict[str, dict[str, int]]:
    """Return, per true period, how often each period was estimated."""
    table = {t: dict.fromkeys(PERIODS, 0) for t in PERIODS}
    for p, t in zip(predicted, periods):
        table[t][p] += 1
    return table


def _seeds(text: str) -> range:
    start, _, stop = text.partition(':')
    seeds = range(int(start), int(stop))
    if not seeds:
        raise argparse.ArgumentTypeError(f'empty seed range {text!r}')
    return seeds


def main(argv: list[str] | None = None) -> int:
    """Fit on one seed range, report on another."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--fit', type=_seeds, default=range(0, 400), help='seeds START:STOP')
    parser.add_argument('--held-out', type=_seeds, default=range(100_000, 100_300),
                        help='seeds START:STOP no fit uses')
    args = parser.parse_args(argv)
    brightness, periods = brightness_and_periods(args.fit)
    night_below, dusk_below = fit_thresholds(brightness, periods)
    print(f'fitted on seeds {args.fit.start}-{args.fit.stop - 1}: night below '
          f'{night_below:.1f}, dusk below {dusk_below:.1f} (in use: {NIGHT_BELOW}, {DUSK_BELOW}); '
          f'accuracy there {accuracy(classify(brightness, night_below, dusk_below), periods):.3f}')
    held_brightness, held_periods = brightness_and_periods(args.held_out)
    predicted = classify(held_brightness, NIGHT_BELOW, DUSK_BELOW)
    print(f'held-out seeds {args.held_out.start}-{args.held_out.stop - 1}, thresholds in use: '
          f'accuracy {accuracy(predicted, held_periods):.3f}')
    for truth, row in confusion(predicted, held_periods).items():
        print(f'  true {truth:5s}: ' + ', '.join(f'{p} {n}' for p, n in row.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
