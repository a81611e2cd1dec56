"""fleet_load: outcome classification, metric parsing, a short real run against cloud_server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from speculation_rig import cloud_server, free_port
from speculative_av.cloud.reply import CloudReply
from speculative_av.tools import fleet_load


@pytest.mark.parametrize('reply, outcome', [
    (CloudReply('c', True, round_trip_ms=120.0), 'in_time'),
    (CloudReply('c', True, round_trip_ms=300.5), 'late'),
    (CloudReply('c', False, error='DEADLINE_EXCEEDED: predicted completion 410 ms after '
                'the deadline'), 'rejected'),
    (CloudReply('c', False, error='DEADLINE_EXCEEDED: Deadline Exceeded'), 'expired'),
    (CloudReply('c', False, error='DEADLINE_EXCEEDED: expired in the server queue '
                '(UNAVAILABLE: Request timeout expired)'), 'expired'),
    (CloudReply('c', False, error='RESOURCE_EXHAUSTED: queue full'), 'refused'),
    (CloudReply('c', False, error='UNAVAILABLE: Connection refused'), 'error'),
])
def test_replies_are_classified_from_the_vehicles_point_of_view(
        reply: CloudReply, outcome: str) -> None:
    assert fleet_load.classify(reply, deadline_ms=300.0) == outcome


def test_batch_sizes_come_from_the_native_histogram_or_tritons_counters() -> None:
    before = {'speculative_av_batch_size_count': 10.0, 'speculative_av_batch_size_sum': 10.0,
              'speculative_av_batch_size_bucket{le="1.0"}': 10.0,
              'speculative_av_batch_size_bucket{le="2.0"}': 10.0,
              'speculative_av_batch_size_bucket{le="4.0"}': 10.0,
              'speculative_av_batch_size_bucket{le="+Inf"}': 10.0}
    after = {'speculative_av_batch_size_count': 20.0, 'speculative_av_batch_size_sum': 34.0,
             'speculative_av_batch_size_bucket{le="1.0"}': 14.0,
             'speculative_av_batch_size_bucket{le="2.0"}': 16.0,
             'speculative_av_batch_size_bucket{le="4.0"}': 20.0,
             'speculative_av_batch_size_bucket{le="+Inf"}': 20.0}
    assert fleet_load.batch_sizes(before, after) == {'batches': 10.0, 'mean': 2.4,
                                                     '<=1': 4.0, '<=2': 2.0, '<=4': 4.0}
    triton = {'nv_inference_exec_count{model="m",version="1"}': 5.0,
              'nv_inference_count{model="m",version="1"}': 12.0}
    assert fleet_load.batch_sizes({}, triton) == {'batches': 5.0, 'mean': 2.4}
    assert fleet_load.batch_sizes({}, {}) is None


@pytest.mark.parametrize('argv', [['--vehicles', '0'], ['--vehicles', 'two'], ['--rate', '0'],
                                  ['--endpoint', 'not an endpoint'], ['--deadline-ms', '-5']])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fleet_load.parse_args(['--endpoint', '127.0.0.1:1', *argv])
    assert exit_info.value.code == 2


def test_a_short_sweep_against_a_real_server_accounts_for_every_frame(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    report_path = tmp_path / 'fleet.json'
    with cloud_server(port, extra_args=('--metrics-port', str(metrics_port),
                                        '--max-batch-size', '4')):
        code = fleet_load.main([
            '--endpoint', f'127.0.0.1:{port}', '--insecure', '--vehicles', '1,3',
            '--duration', '3', '--warmup', '1', '--capacity', '2',
            '--metrics-url', f'http://127.0.0.1:{metrics_port}/metrics',
            '--json', str(report_path), '--plot', str(tmp_path / 'fleet.png')])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report['capacity_per_s'] > 0
    for point, vehicles in zip(report['points'], (1, 3)):
        assert point['vehicles'] == vehicles and len(point['per_vehicle']) == vehicles
        for vehicle in point['per_vehicle']:
            # 5 frames/s for 3 s, each counted once whatever became of it.
            assert 14 <= vehicle['frames'] <= 16
            assert sum(vehicle['outcomes'].values()) == vehicle['frames']
        assert point['goodput_per_s'] > 0 and point['batch_sizes']['batches'] > 0
    assert report['points'][0]['share_in_time'] >= 0.8  # one vehicle is well inside capacity
    assert (tmp_path / 'fleet.png').stat().st_size > 10_000
