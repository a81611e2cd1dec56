"""Curation: snippets in, a training set out, the cloud's answers (or the teacher's) as labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from speculative_av.cloud.codec import encode_frame
from speculative_av.core.detections import Detections
from speculative_av.fleet.snippets import Snippet, write_snippet
from speculative_av.scenes.generator import CATEGORIES, generate_scene
from speculative_av.tools.curate import (curate, CurateSettings, difference_hash, main,
                                         snippet_files)
from speculative_av.tools.dataset import load_dataset

CAR, PEDESTRIAN = CATEGORIES.index('car'), CATEGORIES.index('pedestrian')


def dets(*objects: tuple[float, float, float, float, float, int]) -> Detections:
    """Return detections of (x1, y1, x2, y2, score, label) tuples."""
    array = np.array(objects, np.float64).reshape(-1, 6)
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(np.int64))


CLOUD = dets((10, 10, 110, 60, 0.9, CAR), (200, 50, 240, 150, 0.7, PEDESTRIAN),
             (300, 300, 320, 320, 0.2, CAR))


def snippet(seed: int, cloud: Detections | None = CLOUD, stamp_ns: int = 0) -> Snippet:
    rgb = generate_scene(seed, 320, 240).image
    return Snippet('camera', stamp_ns or seed, 'camera', encode_frame(rgb, jpeg_quality=90).data,
                   Detections.empty(), cloud, 'cloud' if cloud is not None else 'local', False,
                   ('cloud_only_object',), 'local:1', 'cloud' if cloud is not None else '',
                   tuple(CATEGORIES))


def write(directory: Path, *snippets: Snippet) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in snippets:
        path = directory / f'{item.stamp_ns}.mcap'
        write_snippet(path, item)
        paths.append(path)
    return paths


class Teacher:
    """A scripted cloud-side model: one pedestrian per image, counting its calls."""

    categories = list(CATEGORIES)
    model_name, model_version = 'teacher', '7'

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, rgb: np.ndarray) -> Detections:
        self.calls += 1
        return dets((5, 5, 50, 100, 0.95, PEDESTRIAN))


def test_confident_cloud_detections_become_the_labels(tmp_path):
    files = write(tmp_path / 'in', snippet(1), snippet(2))
    dataset, report = curate(files, tmp_path / 'set', CurateSettings(min_score=0.5),
                             progress=False)
    assert (len(dataset), report.kept, report.snippets) == (2, 2, 2)
    loaded = load_dataset(tmp_path / 'set')
    first = loaded.entries[0]
    assert first.labels.tolist() == [CAR, PEDESTRIAN]  # the 0.2-scoring car is no label
    assert first.boxes.tolist() == [[10, 10, 110, 60], [200, 50, 240, 150]]
    assert first.source['reasons'] == ['cloud_only_object']
    assert first.source['labelled_by'] == 'cloud'
    assert first.image().shape == (240, 320, 3)
    assert loaded.provenance['min_score'] == 0.5
    assert report.boxes == {'car': 2, 'pedestrian': 2}


def test_a_class_filter_keeps_only_those_labels_and_refuses_unknown_names(tmp_path):
    files = write(tmp_path / 'in', snippet(1))
    dataset, _ = curate(files, tmp_path / 'set', CurateSettings(classes=('pedestrian',)),
                        progress=False)
    assert dataset.entries[0].labels.tolist() == [PEDESTRIAN]
    with pytest.raises(ValueError, match="unknown class names \\['bus'\\]"):
        curate(files, tmp_path / 'other', CurateSettings(classes=('bus',)), progress=False)
    assert not (tmp_path / 'other').exists()


def test_duplicates_are_dropped_exact_and_near(tmp_path):
    original = snippet(1)
    same_jpeg = snippet(1, stamp_ns=999)
    rgb = generate_scene(1, 320, 240).image.copy()
    rgb[100:108, 100:108] //= 2  # a small dark patch: another file, nearly the same picture
    nearly = Snippet(**{**vars(original), 'stamp_ns': 1000,
                        'jpeg': encode_frame(rgb, jpeg_quality=90).data})
    files = write(tmp_path / 'in', original, same_jpeg, nearly, snippet(2))
    dataset, report = curate(files, tmp_path / 'set', progress=False)
    assert (report.exact_duplicates, report.near_duplicates, len(dataset)) == (1, 1, 2)
    near = bin(difference_hash(rgb) ^ difference_hash(generate_scene(1, 320, 240).image))
    far = bin(difference_hash(rgb) ^ difference_hash(generate_scene(2, 320, 240).image))
    assert near.count('1') <= 4 < far.count('1')


def test_unanswered_snippets_are_dropped_or_labelled_by_the_teacher(tmp_path):
    files = write(tmp_path / 'in', snippet(1, cloud=None), snippet(2))
    _, report = curate(files, tmp_path / 'without', progress=False)
    assert (report.no_cloud_answer, report.kept) == (1, 1)
    teacher = Teacher()
    dataset, report = curate(files, tmp_path / 'with', teacher=teacher, progress=False)
    assert (report.teacher_labelled, report.kept, teacher.calls) == (1, 2, 1)
    labelled = next(e for e in dataset.entries if e.source['stamp_ns'] == 1)
    assert labelled.labels.tolist() == [PEDESTRIAN]
    assert labelled.source['labelled_by'] == 'teacher teacher:7'


def test_a_teacher_with_another_label_map_is_refused(tmp_path):
    files = write(tmp_path / 'in', snippet(1, cloud=None))
    teacher = Teacher()
    teacher.categories = ['__background__', 'person']
    with pytest.raises(ValueError, match='the teacher knows'):
        curate(files, tmp_path / 'set', teacher=teacher, progress=False)


def test_malformed_snippets_are_counted_and_skipped(tmp_path):
    write(tmp_path / 'in', snippet(1))
    (tmp_path / 'in' / 'garbage.mcap').write_bytes(b'\x89MCAP0\r\n' + b'\x00' * 100)
    (tmp_path / 'in' / 'empty.mcap').write_bytes(b'')
    other_map = Snippet(**{**vars(snippet(2)), 'categories': ('__background__', 'car', 'x', 'y',
                                                              'z', 'w')})
    write(tmp_path / 'in', other_map)
    found = snippet_files([tmp_path / 'in'])
    assert len(found) == 4
    dataset, report = curate(found, tmp_path / 'set', progress=False)
    assert (report.malformed, report.kept, len(dataset)) == (3, 1, 1)


def test_nothing_usable_is_an_error_and_writes_nothing(tmp_path):
    files = write(tmp_path / 'in', snippet(1, cloud=None))
    with pytest.raises(ValueError, match='no usable snippet among 1'):
        curate(files, tmp_path / 'set', progress=False)
    assert not (tmp_path / 'set').exists()


@pytest.mark.parametrize('settings', [{'min_score': 0.0}, {'min_score': 1.5},
                                      {'near_duplicate_bits': -1}, {'near_duplicate_bits': 64}])
def test_settings_that_would_keep_nothing_or_everything_are_refused(settings):
    with pytest.raises(ValueError):
        CurateSettings(**settings)


def test_the_command_line_writes_a_set_and_reports(tmp_path, capsys):
    write(tmp_path / 'in', snippet(1), snippet(2, cloud=None))
    assert main([str(tmp_path / 'in'), str(tmp_path / 'set'), '--min-score', '0.8']) == 0
    out = capsys.readouterr().out
    assert '1 images, 1 labels from 2 snippets' in out and '1 without a cloud answer' in out
    assert main([str(tmp_path / 'in'), str(tmp_path / 'set')]) == 1  # exists: written once
    assert 'exists' in capsys.readouterr().err
