"""The curated training-set format: round trip, and hostile sets refused at load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from speculative_av.scenes import CATEGORIES, generate_scene
from speculative_av.tools.dataset import (encode_jpeg, Limits, load_dataset, Sample,
                                          write_dataset)


@pytest.fixture(scope='module')
def jpeg() -> bytes:
    return encode_jpeg(generate_scene(5, 160, 120).image)


def _sample(jpeg: bytes, boxes: list[list[float]] | None = None,
            labels: list[int] | None = None) -> Sample:
    boxes = [[10.0, 20.0, 50.0, 60.0]] if boxes is None else boxes
    return Sample(jpeg, np.array(boxes, np.float32), np.array(labels or [1] * len(boxes)),
                  {'snippet': 'ab' * 32, 'stamp_ns': 7})


def test_write_then_load_round_trips(tmp_path: Path, jpeg: bytes) -> None:
    written = write_dataset(tmp_path / 'set', [_sample(jpeg), _sample(jpeg, [], [])],
                            CATEGORIES, {'teacher': 'cloud_frcnn', 'min_score': 0.5})
    loaded = load_dataset(tmp_path / 'set')
    assert len(loaded) == 2 and loaded.boxes == 1
    assert loaded.categories == tuple(CATEGORIES) == written.categories
    assert loaded.provenance == {'teacher': 'cloud_frcnn', 'min_score': 0.5}
    first = loaded.entries[0]
    assert (first.width, first.height) == (160, 120)
    np.testing.assert_array_equal(first.boxes, [[10, 20, 50, 60]])
    assert first.labels.tolist() == [1] and first.source['stamp_ns'] == 7
    assert first.path.read_bytes() == jpeg  # stored as it arrived
    assert first.image().shape == (120, 160, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['set']  # no temporary left


@pytest.mark.parametrize('boxes, labels, match', [
    ([[10, 20, 5, 60]], [1], 'empty or outside'),
    ([[10, 20, 50, 200]], [1], 'empty or outside'),
    ([[-1, 20, 50, 60]], [1], 'empty or outside'),
    ([[10, 20, float('nan'), 60]], [1], 'finite'),
    ([[10, 20, 50, 60]], [0], 'category id'),
    ([[10, 20, 50, 60]], [len(CATEGORIES)], 'category id'),
])
def test_write_refuses_bad_boxes_and_leaves_nothing(tmp_path: Path, jpeg: bytes,
                                                    boxes: list, labels: list,
                                                    match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_dataset(tmp_path / 'set', [_sample(jpeg, boxes, labels)], CATEGORIES, {})
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_non_jpeg_oversize_and_existing_targets(tmp_path: Path,
                                                              jpeg: bytes) -> None:
    with pytest.raises(ValueError, match='jpeg'):
        write_dataset(tmp_path / 'a', [_sample(b'\x89PNG not a jpeg')], CATEGORIES, {})
    with pytest.raises(ValueError, match='JPEG bytes'):
        write_dataset(tmp_path / 'b', [_sample(jpeg)], CATEGORIES, {},
                      Limits(image_bytes=100))
    with pytest.raises(ValueError, match='plain JSON'):
        write_dataset(tmp_path / 'c', [_sample(jpeg)], CATEGORIES, {'when': object()})
    with pytest.raises(ValueError, match='categories'):
        write_dataset(tmp_path / 'd', [_sample(jpeg)], ['car', '__background__'], {})
    (tmp_path / 'e').mkdir()
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / 'e', [_sample(jpeg)], CATEGORIES, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ['e']


@pytest.fixture
def written(tmp_path: Path, jpeg: bytes) -> Path:
    write_dataset(tmp_path / 'set', [_sample(jpeg), _sample(jpeg)], CATEGORIES, {})
    return tmp_path / 'set'


def _edit(root: Path, change) -> None:
    labels = root / 'labels.json'
    document = json.loads(labels.read_text())
    change(document)
    labels.write_text(json.dumps(document))


@pytest.mark.parametrize('change, match', [
    (lambda d: d.update(format='something else'), 'not a speculative_av.dataset'),
    (lambda d: d.update(version=2), 'version'),
    (lambda d: d.update(categories=['car']), 'categories'),
    (lambda d: d.update(categories=['__background__', 'car', 'car']), 'distinct'),
    (lambda d: d.update(provenance=[1]), 'provenance'),
    (lambda d: d.update(images={}), 'images must be a list'),
    (lambda d: d['images'].append(7), 'must be an object'),
    (lambda d: d['images'][1].update(file=d['images'][0]['file']), 'listed twice'),
    (lambda d: d['images'][0].update(file='../../etc/passwd'), 'not a file under'),
    (lambda d: d['images'][0].update(file='/etc/hostname'), 'not a file under'),
    (lambda d: d['images'][0].update(file='labels.json'), 'not a file under'),
    (lambda d: d['images'][0].update(file='images/missing.jpg'), 'not a file under'),
    (lambda d: d['images'][0].update(file=['x']), 'relative path'),
    (lambda d: d['images'][0].update(width=True), 'integers'),
    (lambda d: d['images'][0].update(width=30000, height=30000), 'claims'),
    (lambda d: d['images'][0].update(width=200), 'the labels say'),
    (lambda d: d['images'][0].update(boxes=[[1, 2, 3]]), 'four finite numbers'),
    (lambda d: d['images'][0].update(boxes=[['1', 2, 3, 4]]), 'four finite numbers'),
    (lambda d: d['images'][0].update(labels=[1.0]), 'category id'),
    (lambda d: d['images'][0].update(labels=[]), 'same length'),
    (lambda d: d['images'][0].update(boxes=[[0, 0, 5, 5]] * 1001, labels=[1] * 1001),
     'more than 1000'),
    (lambda d: d['images'][0].update(source='x'), 'source'),
])
def test_load_refuses_hostile_labels(written: Path, change, match: str) -> None:
    _edit(written, change)
    with pytest.raises(ValueError, match=match):
        load_dataset(written)


def test_load_refuses_broken_files_before_parsing_or_decoding(written: Path) -> None:
    labels = written / 'labels.json'
    good = labels.read_text()
    labels.write_text(good.replace('"version": 1', '"version": NaN'))
    with pytest.raises(ValueError, match='not a number'):
        load_dataset(written)
    labels.write_text('[' * 100_000)
    with pytest.raises(ValueError, match='not valid JSON'):
        load_dataset(written)
    labels.write_text(good)
    with pytest.raises(ValueError, match='bytes, more than'):
        load_dataset(written, Limits(labels_bytes=100))
    with pytest.raises(ValueError, match='2 images, more than 1'):
        load_dataset(written, Limits(images=1))
    image = written / 'images' / '000000.jpg'
    image.write_bytes(b'\xff\xd8 truncated')
    with pytest.raises(ValueError, match='jpeg'):
        load_dataset(written)
    (written / 'images' / '000000.jpg').unlink()
    (written / 'images' / '000000.jpg').symlink_to('/etc/hostname')
    with pytest.raises(ValueError, match='not a file under'):
        load_dataset(written)


def test_load_refuses_a_missing_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='cannot read'):
        load_dataset(tmp_path / 'nothing')


def test_an_image_replaced_after_loading_is_refused_at_decode(written: Path) -> None:
    entry = load_dataset(written).entries[0]
    entry.path.write_bytes(encode_jpeg(np.zeros((20, 30, 3), np.uint8)))
    with pytest.raises(ValueError, match='the labels say'):
        entry.image()
