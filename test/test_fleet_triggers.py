"""Triggers, the rate limit, snippet files (hostile ones too), the store's budget, the recorder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from speculative_av.cloud.codec import encode_frame
from speculative_av.core.arbiter import Arbiter, Source
from speculative_av.core.detections import Detections
from speculative_av.fleet.recorder import TriggerRecorder
from speculative_av.fleet.snippets import (IMAGE_TOPIC, read_snippet, Snippet, SnippetStore,
                                           TOPIC_TYPES, write_snippet)
from speculative_av.fleet.triggers import (CLASS_OF_INTEREST, CLOUD_DEADLINE_MISS,
                                           CLOUD_ONLY_OBJECT, LOCAL_ONLY_OBJECT, LOW_CONFIDENCE,
                                           RateLimiter, TriggerRules, TriggerSettings)
from speculative_av.tools.bag_types import typestore

CATEGORIES = ('__background__', 'person', 'bicycle', 'car')
PERSON, CAR = 1, 3
MS = 1_000_000


def dets(*objects: tuple[float, float, float, float, float, int]) -> Detections:
    """Return detections of (x1, y1, x2, y2, score, label) tuples."""
    array = np.array(objects, np.float64).reshape(-1, 6)
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(np.int64))


CAR_BOX = (10, 10, 110, 60, 0.9, CAR)
PERSON_BOX = (200, 50, 240, 150, 0.8, PERSON)


def rules(**settings: object) -> TriggerRules:
    return TriggerRules(TriggerSettings(**settings), CATEGORIES)  # type: ignore[arg-type]


def test_agreement_triggers_nothing_and_each_disagreement_names_its_side():
    r = rules()
    assert r.reasons(dets(CAR_BOX), dets((12, 11, 111, 61, 0.7, CAR)), False) == []
    assert r.reasons(dets(), dets(CAR_BOX), False) == [CLOUD_ONLY_OBJECT]
    assert r.reasons(dets(CAR_BOX), dets(), False) == [LOCAL_ONLY_OBJECT]
    # Same box, other class: both sides have an unmatched object.
    assert r.reasons(dets(CAR_BOX), dets((*CAR_BOX[:5], PERSON)), False) == [
        CLOUD_ONLY_OBJECT, LOCAL_ONLY_OBJECT]
    assert r.reasons(dets(CAR_BOX), None, False) == []  # no teacher, no disagreement


def test_disagreement_respects_min_score_iou_and_classes():
    weak_car = (*CAR_BOX[:4], 0.3, CAR)
    assert rules().reasons(dets(), dets(weak_car), False) == []
    shifted = (60, 10, 160, 60, 0.9, CAR)  # IoU 1/3 with CAR_BOX
    assert rules(iou=0.5).reasons(dets(CAR_BOX), dets(shifted), False) != []
    assert rules(iou=0.3).reasons(dets(CAR_BOX), dets(shifted), False) == []
    person_only = rules(disagreement_classes=('person',))
    assert person_only.reasons(dets(), dets(CAR_BOX), False) == []
    assert person_only.reasons(dets(), dets(PERSON_BOX), False) == [CLOUD_ONLY_OBJECT]
    assert rules(disagreement=False).reasons(dets(), dets(CAR_BOX), False) == []


def test_low_confidence_class_of_interest_and_deadline_miss():
    r = rules(disagreement=False, low_confidence=0.2, classes_of_interest=('person',),
              deadline_miss=True)
    assert r.reasons(dets((*CAR_BOX[:4], 0.35, CAR)), None, False) == [LOW_CONFIDENCE]
    assert r.reasons(dets((*CAR_BOX[:4], 0.1, CAR)), None, False) == []
    assert r.reasons(dets(CAR_BOX), dets(PERSON_BOX), False) == [CLASS_OF_INTEREST]
    assert r.reasons(dets(CAR_BOX), None, True) == [CLOUD_DEADLINE_MISS]


@pytest.mark.parametrize('settings', [
    {'iou': 0.0}, {'iou': 1.5}, {'min_score': 0.0}, {'low_confidence': 0.6},
    {'low_confidence': -0.1}, {'max_per_minute': 0.0}, {'max_per_minute': float('nan')},
    {'burst': 0}, {'classes_of_interest': ('car', 'car')}, {'disagreement_classes': ('',)}])
def test_settings_no_one_could_mean_are_refused(settings):
    with pytest.raises(ValueError):
        TriggerSettings(**settings)


def test_unknown_class_names_are_refused_against_the_label_map():
    with pytest.raises(ValueError, match='unknown class names'):
        rules(classes_of_interest=('pedestrian',))


def test_rate_limiter_allows_a_burst_then_the_sustained_rate_on_its_clock():
    limiter = RateLimiter(per_minute=6.0, burst=2, now_s=100.0)
    assert [limiter.take(100.0) for _ in range(3)] == [True, True, False]
    assert not limiter.take(109.9)  # one token per 10 s
    assert limiter.take(110.0)
    assert not limiter.take(50.0)  # a clock stepping back refills nothing
    assert limiter.take(130.0) and limiter.take(130.0) and not limiter.take(130.0)  # capped


# Snippet files ----------------------------------------------------------------------------

def snippet(stamp_ns: int = 1_700_000_000_123_456_789, camera: str = 'front',
            cloud: Detections | None = None, side: int = 64) -> Snippet:
    rgb = np.random.default_rng(0).integers(0, 255, (side, side, 3), np.uint8)
    return Snippet(camera, stamp_ns, 'cam_front', encode_frame(rgb).data,
                   dets(CAR_BOX, (1.5, 2.25, 30.125, 40.75, 0.4, PERSON)), cloud, 'cloud', True,
                   (CLOUD_ONLY_OBJECT, LOW_CONFIDENCE), 'ssdlite:random', 'cloud', CATEGORIES)


def test_a_snippet_round_trips_through_one_mcap_file_rosbags_reads(tmp_path):
    original = snippet(cloud=dets(CAR_BOX, PERSON_BOX))
    write_snippet(tmp_path / 'a.mcap', original)
    assert [p.name for p in tmp_path.iterdir()] == ['a.mcap']  # one file, nothing else
    back = read_snippet(tmp_path / 'a.mcap')
    for name in ('camera', 'stamp_ns', 'frame_id', 'jpeg', 'winner', 'late', 'reasons',
                 'local_model', 'cloud_model', 'categories'):
        assert getattr(back, name) == getattr(original, name), name
    for got, want in ((back.local, original.local), (back.cloud, original.cloud)):
        assert got is not None and want is not None
        np.testing.assert_array_equal(got.boxes, want.boxes)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.labels, want.labels)
    with Reader(tmp_path / 'a.mcap') as reader:  # the plain rosbags reader, as any tool would
        assert {c.topic: c.msgtype for c in reader.connections} == TOPIC_TYPES
        assert {t for _, t, _ in reader.messages()} == {original.stamp_ns}


def test_without_a_cloud_answer_there_is_no_cloud_message(tmp_path):
    write_snippet(tmp_path / 'a.mcap', snippet(cloud=None))
    assert read_snippet(tmp_path / 'a.mcap').cloud is None


def _write_bag(path: Path, messages: dict[str, list]) -> None:
    """Write a bare .mcap with the given topic -> (type, [messages]) as rosbags would."""
    store = typestore()
    with Writer(path.parent / 'bag', version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        for topic, (msgtype, msgs) in messages.items():
            connection = writer.add_connection(topic, msgtype, typestore=store)
            for msg in msgs:
                writer.write(connection, 1, store.serialize_cdr(msg, msgtype))
    (path.parent / 'bag' / 'bag.mcap').rename(path)


def test_hostile_files_are_refused_with_value_error(tmp_path):
    good = tmp_path / 'good.mcap'
    write_snippet(good, snippet())
    data = good.read_bytes()
    reasons = data.index(b'cloud_only_object,')
    hostile = {
        'empty': b'', 'garbage': b'\x00' * 1000, 'truncated': data[:len(data) // 2],
        'no_footer': data[:-9], 'magic_only': b'\x89MCAP0\r\n' * 2,
        'claims_huge_record': data[:8] + b'\x06' + (2**62).to_bytes(8, 'little') + data[17:],
        'cut_with_end_magic': data[:len(data) // 2] + data[-8:],
        # The length of the decision's reasons string made huge:
        'bad_string_length': data[:reasons - 4] + b'\xff\xff\xff\x7f' + data[reasons:],
        'bad_jpeg': data.replace(b'\xff\xd8\xff', b'\x00\x00\x00', 1),
    }
    for name, content in hostile.items():
        path = tmp_path / f'{name}.mcap'
        path.write_bytes(content)
        with pytest.raises(ValueError):
            read_snippet(path)
    with pytest.raises(ValueError, match='more than'):
        read_snippet(good, max_bytes=len(data) - 1)


def test_files_with_wrong_topics_types_or_counts_are_refused(tmp_path):
    t = typestore().types
    header = t['std_msgs/msg/Header'](stamp=t['builtin_interfaces/msg/Time'](sec=0, nanosec=1),
                                      frame_id='x')
    image = t['sensor_msgs/msg/CompressedImage'](
        header=header, format='jpeg',
        data=np.frombuffer(encode_frame(np.zeros((8, 8, 3), np.uint8)).data, np.uint8))
    string = t['std_msgs/msg/String'](data='hello')
    cases = {
        'other_topic': {'/chatter': ('std_msgs/msg/String', [string])},
        'wrong_type': {IMAGE_TOPIC: ('std_msgs/msg/String', [string])},
        'missing_topics': {IMAGE_TOPIC: (TOPIC_TYPES[IMAGE_TOPIC], [image])},
        'two_images': {IMAGE_TOPIC: (TOPIC_TYPES[IMAGE_TOPIC], [image, image])},
    }
    for name, messages in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        _write_bag(directory / 'x.mcap', messages)
        with pytest.raises(ValueError):
            read_snippet(directory / 'x.mcap')


def test_a_decision_with_bad_fields_is_refused(tmp_path, monkeypatch):
    import speculative_av.fleet.snippets as snippets
    for field, value in (('reasons', 'because'), ('late', 'maybe'), ('categories', '{'),
                         ('stamp_ns', '-1')):
        original = snippets._decision_msg

        def tampered(s, field=field, value=value, original=original):
            msg = original(s)
            for item in msg.values:
                if item.key == field:
                    item.value = value
            return msg
        monkeypatch.setattr(snippets, '_decision_msg', tampered)
        path = tmp_path / f'{field}.mcap'
        write_snippet(path, snippet())
        monkeypatch.setattr(snippets, '_decision_msg', original)
        with pytest.raises(ValueError):
            read_snippet(path)
    # A label beyond the label map:
    bad = snippet()
    object.__setattr__(bad, 'categories', CATEGORIES[:2])
    write_snippet(tmp_path / 'labels.mcap', bad)
    with pytest.raises(ValueError, match='label map'):
        read_snippet(tmp_path / 'labels.mcap')


# The store ---------------------------------------------------------------------------------

def test_store_keeps_the_budget_dropping_uploaded_then_oldest_first(tmp_path):
    write_snippet(tmp_path / 'probe.mcap', snippet(stamp_ns=1000))
    one = (tmp_path / 'probe.mcap').stat().st_size
    store = SnippetStore(tmp_path / 'store', budget_bytes=3 * one + one // 2)
    entries = [store.add(snippet(stamp_ns=1000 + i)) for i in range(3)]
    assert store.pending() == entries and store.bytes_on_disk == 3 * one
    store.mark_uploaded(entries[1])
    fourth = store.add(snippet(stamp_ns=2000))
    assert [e.stamp_ns for e in store.entries()] == [1000, 1002, 2000]  # the uploaded one went
    assert store.counters['evicted'] == 1 and store.counters['evicted_not_uploaded'] == 0
    store.add(snippet(stamp_ns=3000))
    assert [e.stamp_ns for e in store.entries()] == [1002, 2000, 3000]  # then the oldest
    assert store.counters['evicted_not_uploaded'] == 1
    assert not entries[0].path.exists() and fourth.path.exists()
    assert sorted(p.name for p in (tmp_path / 'store').iterdir()) == sorted(
        [e.file for e in store.entries()] + ['index.jsonl'])
    lines = [json.loads(x) for x in (tmp_path / 'store' / 'index.jsonl').read_text().splitlines()]
    assert [x['stamp_ns'] for x in lines] == [1002, 2000, 3000]
    assert all(len(x['sha256']) == 64 and x['bytes'] == one for x in lines)
    with pytest.raises(ValueError, match='budget'):
        SnippetStore(tmp_path / 'tiny', budget_bytes=one // 2).add(snippet())
    assert [p.name for p in (tmp_path / 'tiny').iterdir()] == ['index.jsonl']


def test_reopening_reconciles_the_index_with_the_directory(tmp_path):
    store = SnippetStore(tmp_path, budget_bytes=10**7)
    kept, removed, _ = [store.add(snippet(stamp_ns=s)) for s in (1, 2, 3)]
    store.mark_uploaded(kept)
    removed.path.unlink()  # gone behind the store's back
    write_snippet(tmp_path / 'orphan.mcap', snippet(stamp_ns=9))  # a crash before indexing
    (tmp_path / 'junk.mcap').write_bytes(b'not a snippet')
    (tmp_path / 'index.jsonl').write_text((tmp_path / 'index.jsonl').read_text()
                                          + '{"file": "../../etc/passwd"}\nnot json\n')
    reopened = SnippetStore(tmp_path, budget_bytes=10**7)
    assert [e.stamp_ns for e in reopened.entries()] == [1, 3, 9]
    assert [e.stamp_ns for e in reopened.pending()] == [3, 9]
    assert not (tmp_path / 'junk.mcap').exists()
    assert reopened.counters['files_adopted'] == 1 and reopened.counters['files_removed'] == 1
    assert reopened.counters['index_lines_dropped'] == 3


# The recorder ------------------------------------------------------------------------------

def record(local: Detections, cloud: Detections | None, cloud_in_time: bool = True):
    """Return the FrameRecord of a frame raced by local and one cloud endpoint."""
    arbiter = Arbiter()
    key = arbiter.open('front', 5 * MS, 0, 100 * MS,
                       [Source('local', 0, cancellable=False), Source('cloud', 10)])
    outcome = arbiter.arrive(key, 'local', local, 10 * MS)
    if cloud is not None and cloud_in_time:
        outcome.extend(arbiter.arrive(key, 'cloud', cloud, 50 * MS))
    else:
        outcome.extend(arbiter.tick(100 * MS))
    if cloud is None:
        outcome.extend(arbiter.fail(key, 'cloud', 120 * MS, 'UNAVAILABLE'))
    elif not cloud_in_time:
        outcome.extend(arbiter.arrive(key, 'cloud', cloud, 150 * MS))
    assert len(outcome.settled) == 1
    return outcome.settled[0]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recorder(tmp_path: Path, clock: FakeClock, **settings: object) -> TriggerRecorder:
    return TriggerRecorder(TriggerSettings(**settings),  # type: ignore[arg-type]
                           SnippetStore(tmp_path, 10**8), CATEGORIES, queue_size=2, clock=clock)


RGB = np.full((48, 64, 3), 128, np.uint8)


def test_recorder_writes_triggered_frames_with_both_results_and_the_decision(tmp_path):
    clock = FakeClock()
    rec = recorder(tmp_path, clock, deadline_miss=True)
    rec.start()
    assert rec.offer('front', 5 * MS, 'cam', RGB, record(dets(CAR_BOX), dets(CAR_BOX)),
                     ['cloud'], 'ssd:1') == []
    assert rec.offer('front', 5 * MS, 'cam', RGB, record(dets(), dets(CAR_BOX)), ['cloud'],
                     'ssd:1', {'cloud': 'frcnn:7', 'edge': 'other:1'}) == [CLOUD_ONLY_OBJECT]
    rec.stop()
    assert rec.counters['triggered'] == rec.counters['written'] == 1
    (entry,) = rec.store.entries()
    back = read_snippet(entry.path)
    assert back.winner == 'cloud' and not back.late and back.reasons == (CLOUD_ONLY_OBJECT,)
    assert back.local_model == 'ssd:1' and back.cloud_model == 'cloud frcnn:7'
    assert len(back.local) == 0
    assert back.cloud is not None and len(back.cloud) == 1
    assert back.jpeg.startswith(b'\xff\xd8')


def test_recorder_counts_deadline_misses_rate_limits_and_a_full_queue(tmp_path):
    clock = FakeClock()
    rec = recorder(tmp_path, clock, disagreement=False, deadline_miss=True, burst=4,
                   max_per_minute=60.0)
    late = record(dets(CAR_BOX), dets(CAR_BOX), cloud_in_time=False)
    assert rec.offer('front', 5, 'cam', RGB, late, ['cloud'], 'm') == [CLOUD_DEADLINE_MISS]
    assert rec.offer('front', 5, 'cam', RGB, record(dets(), None), ['cloud'], 'm') == [
        CLOUD_DEADLINE_MISS]
    # The writer is not started: the queue (2) is full now.
    rec.offer('front', 5, 'cam', RGB, late, ['cloud'], 'm')
    rec.offer('front', 5, 'cam', None, late, ['cloud'], 'm')
    rec.offer('front', 5, 'cam', RGB, late, ['cloud'], 'm')  # burst spent: rate limited
    clock.now = 1.0
    rec.offer('front', 5, 'cam', RGB, late, ['cloud'], 'm')  # one token back, queue full
    assert rec.snapshot()['queued'] == 2
    rec.start()
    rec.stop()
    c = rec.snapshot()
    assert (c['triggered'], c['rate_limited'], c['queue_full'], c['no_image'], c['written'],
            c['reason_cloud_deadline_miss']) == (6, 1, 2, 1, 2, 6)
    snippets = [read_snippet(e.path) for e in rec.store.entries()]
    assert [(s.winner, s.late) for s in snippets] == [('local', False)] * 2
    assert snippets[0].cloud is not None and snippets[1].cloud is None


def test_a_failing_write_is_counted_and_the_writer_goes_on(tmp_path):
    clock = FakeClock()
    rec = recorder(tmp_path, clock, max_per_minute=600.0)
    failures = iter([OSError('disk full')])
    real_add = rec.store.add

    def flaky_add(s):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_add(s)
    rec.store.add = flaky_add  # type: ignore[method-assign]
    rec.start()
    frame = record(dets(), dets(CAR_BOX))
    for _ in range(2):
        rec.offer('front', 5, 'cam', RGB, frame, ['cloud'], 'm')
    rec.stop()
    assert (rec.counters['write_errors'], rec.counters['written']) == (1, 1)
    assert not rec.fatal
