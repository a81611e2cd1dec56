"""
Triggers in the real node: triggered frames land on disk as snippets, on /diagnostics too.

With upload on, they reach a real collector process while the detection calls go on.
"""
import hashlib
import json

from ros_harness import python_module, running, wait_until
from speculation_rig import camera_command, cloud_server, detector, free_port, observer
from speculative_av.core.image_decoding import decode_rgb
from speculative_av.fleet.snippets import read_snippet
from speculative_av.fleet.triggers import CLOUD_ONLY_OBJECT, LOCAL_ONLY_OBJECT
from vision_msgs.msg import Detection2DArray


def _stamp_ns(msg: Detection2DArray) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def _kept_and_seen(store, observed) -> bool:
    """Return whether a kept frame's local and cloud results were both seen published."""
    index = store / 'index.jsonl'
    if not index.exists():
        return False
    kept = {json.loads(line)['stamp_ns'] for line in index.read_text().splitlines()}
    seen = ({_stamp_ns(m) for m, _ in observed.local}
            & {_stamp_ns(m) for m, _ in observed.cloud})
    return bool(kept & seen)


def test_disagreeing_frames_are_kept_with_image_results_decision_and_reason(tmp_path):
    port = free_port()
    store = tmp_path / 'snippets'
    # Random weights answer ~300 low-scoring boxes per synthetic frame; the cloud gets a
    # quality-30 jpeg, so its boxes differ from the local ones on every frame.
    params = {'deadline_ms': 1000.0, 'cloud.endpoints': f'["127.0.0.1:{port}"]',
              'cloud.jpeg_quality': 30, 'triggers.enabled': True,
              'triggers.directory': str(store), 'triggers.min_score': 0.05,
              'triggers.max_per_minute': 6.0, 'triggers.burst': 2}
    with observer() as observed, cloud_server(port), detector(**params):
        with running(camera_command(rate_hz=3.0)):
            # The first frames may come before the observer matched detections/local and
            # /cloud: wait until one kept frame's results were also seen on both topics.
            wait_until(lambda: observed.diagnostics and 'triggers' in observed.diagnostics[-1]
                       and int(observed.diagnostics[-1]['triggers']['written']) >= 2
                       and int(observed.diagnostics[-1]['triggers']['rate_limited']) >= 1
                       and _kept_and_seen(store, observed), 90,
                       'two snippets written, a triggered frame rate limited, a kept frame seen')
        # The camera stopped: wait until /diagnostics counts every snippet on disk.
        wait_until(lambda: int(observed.diagnostics[-1]['triggers']['written']) == len(
            (store / 'index.jsonl').read_text().splitlines()), 30, 'the counters to settle')
    counters = observed.diagnostics[-1]['triggers']
    print({k: counters[k] for k in ('triggered', 'rate_limited', 'written', 'bytes_on_disk',
                                    'queue_full', 'write_errors')})
    assert int(counters['triggered']) >= 3 and counters['write_errors'] == '0'
    index = [json.loads(line) for line in (store / 'index.jsonl').read_text().splitlines()]
    assert len(index) == int(counters['written'])
    assert sorted(p.name for p in store.iterdir()) == sorted(
        [x['file'] for x in index] + ['index.jsonl'])
    assert sum(x['bytes'] for x in index) == int(counters['bytes_on_disk'])
    local_published = {_stamp_ns(m): m for m, _ in observed.local}
    cloud_published = {_stamp_ns(m): m for m, _ in observed.cloud}
    compared = 0
    for entry in index:
        snippet = read_snippet(store / entry['file'])
        assert snippet.frame_id == 'cam_front' and snippet.stamp_ns == entry['stamp_ns']
        assert decode_rgb(snippet.jpeg, 'jpeg').shape == (480, 640, 3)
        assert snippet.cloud is not None and snippet.winner == 'cloud' and not snippet.late
        assert set(snippet.reasons) & {CLOUD_ONLY_OBJECT, LOCAL_ONLY_OBJECT}
        assert snippet.local_model == 'ssdlite320_mobilenet_v3_large:random'
        assert snippet.cloud_model == 'cloud ssdlite320_mobilenet_v3_large:random'
        assert snippet.categories[1] == 'person'
        local, cloud = (local_published.get(snippet.stamp_ns),
                        cloud_published.get(snippet.stamp_ns))
        if local is not None and cloud is not None:  # both topics matched by then
            assert len(local.detections) == len(snippet.local)
            assert len(cloud.detections) == len(snippet.cloud)
            compared += 1
    assert compared >= 1


def test_triggered_snippets_are_uploaded_to_a_collector_while_frames_stream(tmp_path):
    port, collector_port = free_port(), free_port()
    store, root = tmp_path / 'snippets', tmp_path / 'collector'
    params = {'deadline_ms': 1000.0, 'cloud.endpoints': f'["127.0.0.1:{port}"]',
              'cloud.jpeg_quality': 30, 'triggers.enabled': True,
              'triggers.directory': str(store), 'triggers.min_score': 0.05,
              'triggers.max_per_minute': 60.0, 'triggers.burst': 3, 'upload.enabled': True,
              'upload.target': f'127.0.0.1:{collector_port}', 'upload.insecure': True,
              'upload.chunk_kb': 16}
    collector = python_module('speculative_av.cloud.collector', '--root', str(root), '--host',
                              '127.0.0.1', '--port', str(collector_port), '--insecure',
                              '--min-free-mb', '16')
    with observer() as observed, cloud_server(port), running(collector), \
            detector(**params), running(camera_command(rate_hz=3.0)):
        wait_until(lambda: observed.diagnostics and 'upload' in observed.diagnostics[-1]
                   and int(observed.diagnostics[-1]['upload']['uploaded']) >= 3, 90,
                   'three snippets uploaded')
        uploaded = observed.diagnostics[-1]['upload']
        frames = observed.diagnostics[-1]['speculation']
    print({k: uploaded[k] for k in ('uploaded', 'chunks', 'bytes_sent', 'pauses', 'failures')})
    assert uploaded['failures'] == '0' and uploaded['rejected'] == '0'
    assert int(uploaded['chunks']) > int(uploaded['uploaded'])  # 16 KiB chunks: several each
    assert int(frames['frame_errors']) == 0
    index = {json.loads(line)['sha256']: json.loads(line)
             for line in (store / 'index.jsonl').read_text().splitlines()}
    stored = sorted((root / 'snippets').glob('*.mcap'))
    assert len(stored) >= int(uploaded['uploaded'])
    for path in stored:  # each collected file is a vehicle snippet, intact, under its hash
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == path.stem and digest in index
        assert read_snippet(path).stamp_ns == index[digest]['stamp_ns']
