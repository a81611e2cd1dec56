"""
The curated training-set format: JPEG images plus one labels file, validated both ways.

A set is a directory holding ``images/NNNNNN.jpg`` and ``labels.json``::

    {"format": "speculative_av.dataset", "version": 1,
     "categories": ["__background__", "car", ...],      # label id = index
     "provenance": {...},                                 # how the set was made (plain data)
     "images": [{"file": "images/000000.jpg", "width": 640, "height": 480,
                 "boxes": [[x1, y1, x2, y2], ...], "labels": [1, ...],
                 "source": {...}}, ...]}                   # where the image came from

Images keep the bytes they arrived with (a snippet's JPEG is not re-encoded). Everything read
is checked against limits before it is parsed or decoded (file sizes, then the JPEG header),
and every box must lie inside its image with a known label, so a broken or hostile set fails
at load with a ValueError naming the entry, not in the middle of a training run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
import math
import os
from pathlib import Path
import shutil
from typing import Any, Iterable, Mapping, Sequence, TypeGuard

import numpy as np
import numpy.typing as npt
import simplejpeg
from speculative_av.core.image_decoding import check_size, declared_size, decode_rgb

FORMAT = 'speculative_av.dataset'
VERSION = 1
LABELS_FILE = 'labels.json'
IMAGES_DIR = 'images'
BACKGROUND = '__background__'


@dataclass(frozen=True)
class Limits:
    """What a set may hold at most: checked before anything is parsed or decoded."""

    labels_bytes: int = 256 * 1024 * 1024
    image_bytes: int = 16 * 1024 * 1024
    images: int = 1_000_000
    boxes_per_image: int = 1000
    categories: int = 1000


@dataclass(frozen=True)
class Sample:
    """One image to write: its JPEG bytes, boxes (N, 4) x1 y1 x2 y2 in pixels, label ids."""

    jpeg: bytes
    boxes: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    source: Mapping[str, Any] = field(default_factory=dict)  # plain data, e.g. the snippet


@dataclass(frozen=True)
class Entry:
    """One image of a loaded set; :meth:`image` decodes it (size-checked first)."""

    path: Path
    width: int
    height: int
    boxes: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    source: Mapping[str, Any]
    max_bytes: int

    def image(self) -> npt.NDArray[np.uint8]:
        """Return the (H, W, 3) uint8 RGB image; ValueError if the file changed or is broken."""
        data = _read_bounded(self.path, self.max_bytes)
        rgb = decode_rgb(data, 'jpeg')
        if rgb.shape[:2] != (self.height, self.width):
            raise ValueError(f'{self.path}: {rgb.shape[1]}x{rgb.shape[0]} pixels, the labels '
                             f'say {self.width}x{self.height}')
        return rgb


@dataclass(frozen=True)
class Dataset:
    """A loaded, validated set."""

    directory: Path
    categories: tuple[str, ...]
    provenance: Mapping[str, Any]
    entries: tuple[Entry, ...]

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.entries)

    @property
    def boxes(self) -> int:
        """Return the number of labelled boxes over all images."""
        return sum(len(e.labels) for e in self.entries)


def encode_jpeg(rgb: npt.NDArray[np.uint8], quality: int = 90) -> bytes:
    """Return (H, W, 3) uint8 RGB as JPEG bytes (to build a :class:`Sample` from pixels)."""
    return bytes(simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality, colorspace='RGB'))


def write_dataset(directory: str | Path, samples: Iterable[Sample], categories: Sequence[str],
                  provenance: Mapping[str, Any], limits: Limits = Limits()) -> Dataset:
    """
    Write a new set to ``directory`` (which must not exist) and return it loaded.

    Every sample is validated as :func:`load_dataset` would; the set is assembled in a
    temporary sibling directory and renamed into place, so a failure leaves nothing behind
    and a reader never sees half a set.
    """
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f'{target} exists; a data set is written once')
    names = _check_categories(list(categories), limits)
    tmp = target.with_name(f'.{target.name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / IMAGES_DIR).mkdir(parents=True)
    try:
        records = []
        for index, sample in enumerate(samples):
            if index >= limits.images:
                raise ValueError(f'more than {limits.images} images')
            where = f'sample {index}'
            if len(sample.jpeg) > limits.image_bytes:
                raise ValueError(f'{where}: {len(sample.jpeg)} JPEG bytes, more than '
                                 f'{limits.image_bytes}')
            width, height = declared_size(sample.jpeg, 'jpeg')
            check_size(width, height, f'{where} JPEG header')
            boxes = np.asarray(sample.boxes, np.float64).reshape(-1, 4)
            labels = np.asarray(sample.labels)
            _check_boxes(boxes.tolist(), labels.tolist(), width, height, len(names), limits,
                         where)
            name = f'{IMAGES_DIR}/{index:06d}.jpg'
            (tmp / name).write_bytes(sample.jpeg)
            records.append({'file': name, 'width': width, 'height': height,
                            'boxes': boxes.tolist(), 'labels': [int(v) for v in labels],
                            'source': dict(sample.source)})
        document = {'format': FORMAT, 'version': VERSION, 'categories': names,
                    'provenance': dict(provenance), 'images': records}
        try:
            text = json.dumps(document, allow_nan=False, indent=1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f'provenance and sources must be plain JSON data: {exc}') from None
        (tmp / LABELS_FILE).write_text(text)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_dataset(target, limits)


def load_dataset(directory: str | Path, limits: Limits = Limits()) -> Dataset:
    """Read and validate a set (labels, file sizes, JPEG headers); pixels decode on demand."""
    root = Path(directory).resolve()
    document = _parse_labels(root / LABELS_FILE, limits)
    categories = _check_categories(document.get('categories'), limits)
    provenance = document.get('provenance', {})
    images = document.get('images')
    if not isinstance(provenance, dict):
        raise ValueError(f'{LABELS_FILE}: provenance must be an object')
    if not isinstance(images, list):
        raise ValueError(f'{LABELS_FILE}: images must be a list')
    if len(images) > limits.images:
        raise ValueError(f'{LABELS_FILE}: {len(images)} images, more than {limits.images}')
    entries, seen = [], set()
    for index, record in enumerate(images):
        where = f'{LABELS_FILE} images[{index}]'
        if not isinstance(record, dict):
            raise ValueError(f'{where}: must be an object')
        path = _image_path(root, record.get('file'), where)
        if path in seen:
            raise ValueError(f'{where}: {record["file"]!r} is listed twice')
        seen.add(path)
        width, height = record.get('width'), record.get('height')
        if not (_is_int(width) and _is_int(height)):
            raise ValueError(f'{where}: width and height must be integers')
        check_size(width, height, where)
        boxes, labels, source = record.get('boxes'), record.get('labels'), record.get('source', {})
        _check_boxes(boxes, labels, width, height, len(categories), limits, where)
        if not isinstance(source, dict):
            raise ValueError(f'{where}: source must be an object')
        header = declared_size(_read_bounded(path, limits.image_bytes), 'jpeg')
        if header != (width, height):
            raise ValueError(f'{where}: the JPEG is {header[0]}x{header[1]}, the labels say '
                             f'{width}x{height}')
        entries.append(Entry(path, width, height, np.array(boxes, np.float32).reshape(-1, 4),
                             np.array(labels, np.int64), source, limits.image_bytes))
    return Dataset(root, tuple(categories), provenance, tuple(entries))


def _parse_labels(path: Path, limits: Limits) -> dict[str, Any]:
    """Read the labels file within its size limit and check format and version."""
    text = _read_bounded(path, limits.labels_bytes)
    try:
        document = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f'{path}: not valid JSON: {exc}') from None
    if not isinstance(document, dict) or document.get('format') != FORMAT:
        raise ValueError(f'{path}: not a {FORMAT} labels file')
    if document.get('version') != VERSION:
        raise ValueError(f'{path}: version {document.get("version")!r}; this code reads '
                         f'version {VERSION}')
    return document


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """Return a regular file's bytes, refusing it before reading when it is too large."""
    try:
        with open(path, 'rb') as stream:
            size = os.fstat(stream.fileno()).st_size
            if size > max_bytes:
                raise ValueError(f'{path}: {size} bytes, more than the {max_bytes} allowed')
            data = stream.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f'cannot read {path}: {exc}') from None
    if len(data) > max_bytes:  # grew after the check
        raise ValueError(f'{path}: more than the {max_bytes} bytes allowed')
    return data


def _image_path(root: Path, name: object, where: str) -> Path:
    """Resolve an image's relative path, refusing any that leaves the set's images folder."""
    if not isinstance(name, str) or not name or len(name) > 255 or '\x00' in name:
        raise ValueError(f'{where}: file must be a short relative path')
    path = (root / name).resolve()
    if not path.is_relative_to(root / IMAGES_DIR) or not path.is_file():
        raise ValueError(f'{where}: {name[:80]!r} is not a file under {IMAGES_DIR}/')
    return path


def _check_categories(categories: object, limits: Limits) -> list[str]:
    """Refuse anything but distinct names with the background first."""
    if (not isinstance(categories, list) or not 2 <= len(categories) <= limits.categories
            or not all(isinstance(c, str) and 0 < len(c) <= 100 for c in categories)):
        raise ValueError(f'categories must be 2 to {limits.categories} names of 1-100 '
                         'characters')
    if categories[0] != BACKGROUND or len(set(categories)) != len(categories):
        raise ValueError(f'categories must be distinct and start with {BACKGROUND!r}')
    return list(categories)


def _check_boxes(boxes: object, labels: object, width: int, height: int, classes: int,
                 limits: Limits, where: str) -> None:
    """Refuse boxes that are not finite, positive-sized and inside the image, or bad labels."""
    if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
        raise ValueError(f'{where}: boxes and labels must be lists of the same length')
    if len(boxes) > limits.boxes_per_image:
        raise ValueError(f'{where}: {len(boxes)} boxes, more than {limits.boxes_per_image}')
    for box, label in zip(boxes, labels):
        if not (_is_int(label) and 1 <= label < classes):
            raise ValueError(f'{where}: label {str(label)[:20]} is not a category id in '
                             f'1..{classes - 1}')
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for v in box)):
            raise ValueError(f'{where}: a box must be four finite numbers x1, y1, x2, y2')
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ValueError(f'{where}: box {box} is empty or outside the {width}x{height} '
                             'image')


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _refuse_constant(name: str) -> None:
    raise ValueError(f'{name} is not a number')
