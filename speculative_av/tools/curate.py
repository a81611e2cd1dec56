"""
Build a training set from collected snippets, the cloud's detections as pseudo-labels.

Speculative execution gives the fleet a teacher for free: every snippet carries the cloud
detector's answer for the frame the vehicle's model got wrong or was unsure of. Curation keeps
the cloud's detections scoring at least ``--min-score`` of the chosen classes as labels. A
snippet the cloud never answered (the link was down: often the most interesting ones) is
labelled by the teacher model on the cloud side when ``--teacher-weights`` names one, else
dropped. Curation also drops exact duplicates (the same JPEG) and near duplicates (a
perceptual hash within ``--near-duplicate-bits`` of a kept image: consecutive frames of a
stopped car), and writes the :mod:`~speculative_av.tools.dataset` format ``train --dataset``
reads. A frame whose cloud answer is empty stays, with no boxes: it teaches the vehicle's
model to drop what it saw there alone.

    python -m speculative_av.tools.curate /srv/collector/snippets out/curated
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field, replace
import hashlib
import itertools
import logging
from pathlib import Path
import shlex
import sys
from typing import Iterator, Protocol, Sequence

import cv2
import numpy as np
import numpy.typing as npt
from speculative_av.core.detections import Detections
from speculative_av.core.image_decoding import decode_rgb
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.fleet.snippets import read_snippet, Snippet
from speculative_av.tools.dataset import Dataset, Sample, write_dataset
from tqdm import tqdm

_LOG = logging.getLogger('curate')
HASH_SIDE = 8  # the difference hash compares 8x8 neighbouring pixels: 64 bits


class Teacher(Protocol):
    """The cloud-side model that labels what the cloud did not answer during the drive."""

    @property
    def categories(self) -> list[str]:
        """Return the label map (label id = index)."""

    @property
    def model_name(self) -> str:
        """Return the model's name."""

    @property
    def model_version(self) -> str:
        """Return the model's version."""

    def detect(self, rgb: npt.NDArray[np.uint8]) -> Detections:
        """Detect objects in one (H, W, 3) uint8 RGB image."""


@dataclass(frozen=True)
class CurateSettings:
    """Which pseudo-labels count and when two images are the same."""

    min_score: float = 0.5
    classes: tuple[str, ...] = ()  # empty = every class
    near_duplicate_bits: int = 4  # dHash Hamming distance at or below which images are one

    def __post_init__(self) -> None:
        """Refuse settings that would silently keep nothing or everything."""
        if not 0.0 < self.min_score <= 1.0:
            raise ValueError(f'min_score must be in (0, 1], got {self.min_score}')
        if not 0 <= self.near_duplicate_bits < HASH_SIDE * HASH_SIDE:
            raise ValueError(f'near_duplicate_bits must be in 0..63, got '
                             f'{self.near_duplicate_bits}')


@dataclass
class CurateReport:
    """What curation read, refused and kept."""

    snippets: int = 0
    malformed: int = 0
    no_cloud_answer: int = 0  # dropped: no answer and no teacher
    teacher_labelled: int = 0  # no answer in the drive: labelled by the teacher here
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0
    boxes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)  # trigger reasons of kept snippets

    def as_dict(self) -> dict[str, object]:
        """Return plain data (for the set's provenance and reports)."""
        return {'snippets': self.snippets, 'malformed': self.malformed,
                'no_cloud_answer': self.no_cloud_answer,
                'teacher_labelled': self.teacher_labelled,
                'exact_duplicates': self.exact_duplicates,
                'near_duplicates': self.near_duplicates, 'kept': self.kept,
                'boxes': dict(self.boxes), 'reasons': dict(self.reasons)}


def difference_hash(rgb: npt.NDArray[np.uint8]) -> int:
    """Return the 64-bit difference hash of an image: brighter-than-right-neighbour bits."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (HASH_SIDE + 1, HASH_SIDE), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).reshape(-1)
    return int(np.packbits(bits).view('>u8')[0])


def curate(snippet_files: Sequence[Path], out: Path, settings: CurateSettings = CurateSettings(),
           provenance: dict[str, object] | None = None, teacher: Teacher | None = None,
           progress: bool = True) -> tuple[Dataset, CurateReport]:
    """
    Write the training set of ``snippet_files`` to ``out``; return it and what was kept.

    ``teacher`` labels the snippets the cloud did not answer during the drive; its label map
    must be the snippets' (ValueError otherwise).
    """
    report = CurateReport(snippets=len(snippet_files))
    categories: list[tuple[str, ...]] = []
    samples = _samples(snippet_files, settings, report, categories, teacher, progress)
    first = next(samples, None)  # the label map comes with the first usable snippet
    if first is None:
        raise ValueError(f'no usable snippet among {len(snippet_files)}: '
                         f'{report.as_dict()}')
    dataset = write_dataset(out, itertools.chain([first], samples), categories[0], {
        **(provenance or {}), 'min_score': settings.min_score, 'classes': list(settings.classes),
        'near_duplicate_bits': settings.near_duplicate_bits, 'labels': 'cloud pseudo-labels'})
    _LOG.info('curated %s', report.as_dict())
    return dataset, report


def _samples(files: Sequence[Path], settings: CurateSettings, report: CurateReport,
             categories: list[tuple[str, ...]], teacher: Teacher | None,
             progress: bool) -> Iterator[Sample]:
    """Yield one sample per usable snippet, counting every one refused and why."""
    seen_content: set[bytes] = set()
    kept_hashes: list[int] = []
    for path in tqdm(files, desc='curating', unit='snippet', disable=not progress,
                     file=sys.stderr):
        try:
            snippet = read_snippet(path)
        except (ValueError, OSError) as error:
            report.malformed += 1
            _LOG.warning('skipping %s: %s', path, error)
            continue
        if categories and snippet.categories != categories[0]:
            report.malformed += 1
            _LOG.warning("skipping %s: its label map differs from the first snippet's", path)
            continue
        if snippet.cloud is None and teacher is None:
            report.no_cloud_answer += 1
            continue
        digest = hashlib.sha256(snippet.jpeg).digest()
        if digest in seen_content:
            report.exact_duplicates += 1
            continue
        seen_content.add(digest)
        try:
            rgb = decode_rgb(snippet.jpeg, 'jpeg')
        except ValueError as error:
            report.malformed += 1
            _LOG.warning('skipping %s: %s', path, error)
            continue
        fingerprint = difference_hash(rgb)
        if any(bin(fingerprint ^ kept).count('1') <= settings.near_duplicate_bits
               for kept in kept_hashes):
            report.near_duplicates += 1
            continue
        kept_hashes.append(fingerprint)
        categories[:] = [snippet.categories]
        labeller = snippet.cloud_model
        if snippet.cloud is None:
            assert teacher is not None
            if tuple(teacher.categories) != snippet.categories:
                raise ValueError(f'the teacher knows {teacher.categories}, the snippets '
                                 f'{list(snippet.categories)}')
            snippet = replace(snippet, cloud=teacher.detect(rgb))
            labeller = f'teacher {teacher.model_name}:{teacher.model_version}'
            report.teacher_labelled += 1
        sample = _pseudo_labelled(snippet, settings, path, labeller)
        report.kept += 1
        report.boxes.update(snippet.categories[label] for label in sample.labels.tolist())
        report.reasons.update(snippet.reasons)
        yield sample


def _pseudo_labelled(snippet: Snippet, settings: CurateSettings, path: Path,
                     labeller: str) -> Sample:
    """Return the snippet's image labelled with the cloud's confident detections."""
    assert snippet.cloud is not None
    labels = snippet.cloud.above(settings.min_score)
    if settings.classes:
        unknown = sorted(set(settings.classes) - set(snippet.categories))
        if unknown:
            raise ValueError(f'unknown class names {unknown}; the snippets know '
                             f'{list(snippet.categories[1:])}')
        wanted = np.isin(labels.labels, [snippet.categories.index(c) for c in settings.classes])
        labels = Detections(labels.boxes[wanted], labels.scores[wanted], labels.labels[wanted])
    return Sample(snippet.jpeg, labels.boxes, labels.labels, source={
        'snippet': path.name, 'camera': snippet.camera, 'stamp_ns': snippet.stamp_ns,
        'reasons': list(snippet.reasons), 'local_model': snippet.local_model,
        'labelled_by': labeller})


def snippet_files(paths: Sequence[Path]) -> list[Path]:
    """Return the .mcap files of ``paths`` (files, or directories searched recursively)."""
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(path.rglob('*.mcap')) if path.is_dir() else [path])
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Curate the snippets named on the command line; print what was kept."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('snippets', type=Path, nargs='+',
                        help='snippet .mcap files or directories holding them (the collector '
                             'root)')
    parser.add_argument('out', type=Path, help='training-set directory to create')
    parser.add_argument('--min-score', type=float, default=0.5,
                        help='cloud detections scoring at least this become labels')
    parser.add_argument('--classes', nargs='*', default=[],
                        help='keep labels of these classes only (default: every class)')
    parser.add_argument('--near-duplicate-bits', type=int, default=4,
                        help='difference-hash distance at or below which two images are one')
    parser.add_argument('--teacher-model', default='fasterrcnn_mobilenet_v3_large_320_fpn',
                        help='torchvision builder of the teacher (with --teacher-weights)')
    parser.add_argument('--teacher-weights', default='',
                        help='checkpoint of the teacher that labels snippets the cloud did not '
                             "answer during the drive ('' = drop those)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')
    try:
        settings = CurateSettings(args.min_score, tuple(args.classes), args.near_duplicate_bits)
        teacher = (TorchvisionDetector(args.teacher_model, args.teacher_weights,
                                       score_threshold=args.min_score)
                   if args.teacher_weights else None)
        dataset, report = curate(snippet_files(args.snippets), args.out, settings, {
            'command': shlex.join(['python', '-m', 'speculative_av.tools.curate', *argv])},
            teacher)
    except (ValueError, FileExistsError) as error:
        print(f'curate: {error}', file=sys.stderr)
        return 1
    print(f'{args.out}: {len(dataset)} images, {dataset.boxes} labels from '
          f'{report.snippets} snippets ({report.malformed} malformed, {report.no_cloud_answer} '
          f'without a cloud answer dropped, {report.teacher_labelled} labelled by the teacher, '
          f'{report.exact_duplicates} exact and '
          f'{report.near_duplicates} near duplicates)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
