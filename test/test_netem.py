"""
The emulated network: profiles, traces, the seeded model, the delay line, and the relay process.

Relay tests run ``python -m speculative_av.netem.relay`` on 127.0.0.1 in front of servers in this
process (a TCP echo server, a gRPC health server), measure through it, and stop it with a signal
(exit code 0 and a summary line every time).
"""
from __future__ import annotations

from concurrent import futures
from pathlib import Path
import re
import select
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from typing import Iterator

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
import pytest
from speculative_av.netem import relay
from speculative_av.netem.delay_line import DelayLine, Link, TRANSFER_GAP_S
from speculative_av.netem.profiles import (
    load_profiles, load_trace, NetworkModel, NetworkProfile, TraceRow)
from speculative_av.package_files import config_path

LISTEN_TIMEOUT_S = 20.0
# What the relay may add to the emulated delay on a loaded 2-core machine (loopback, event loop).
SLACK_S = 0.06


# --- profiles and traces ------------------------------------------------------------------


def test_packaged_profiles_are_valid_and_cover_the_named_conditions():
    profiles = load_profiles()
    assert {'lan', 'good-lte', 'poor-lte', 'outage', 'lte-drive'} <= set(profiles)
    for name, profile in profiles.items():
        assert profile.name == name
        model = NetworkModel(profile, seed=1)
        delays = [model.request_delay_s(t / 10, 100_000, 2_000) for t in range(600)]
        assert all(d is None or 0 <= d < 10 for d in delays), name
    assert profiles['lan'].rtt_ms == 1.0 and profiles['lan'].bandwidth_mbps == 1000.0
    assert 20 <= profiles['good-lte'].bandwidth_mbps <= 30
    assert profiles['poor-lte'].stall_probability == pytest.approx(0.03)
    assert profiles['poor-lte'].outages
    outage = NetworkModel(profiles['outage'])
    assert outage.down_time_s(0, 600) >= 10 * 2  # multi-second, every period
    assert len(profiles['lte-drive'].trace) >= 120  # a few minutes at 1 s
    assert config_path('network_profiles.yaml').is_file()


def test_profiles_file_errors_name_the_profile_and_field(tmp_path):
    path = tmp_path / 'profiles.yaml'
    path.write_text('profiles:\n  bad:\n    rtt_ms: 10\n    latency_ms: 5\n')
    with pytest.raises(ValueError, match=r"'bad'.*latency_ms"):
        load_profiles(path)
    path.write_text('profiles:\n  bad:\n    stall_probability: 1.5\n')
    with pytest.raises(ValueError, match=r"'bad'.*stall_probability"):
        load_profiles(path)
    path.write_text('profiles:\n  bad:\n    outages: [[50, 20]]\n    outage_period_s: 60\n')
    with pytest.raises(ValueError, match='does not fit'):
        load_profiles(path)
    path.write_text('lan: {}\n')
    with pytest.raises(ValueError, match='profiles:'):
        load_profiles(path)


def test_trace_file_is_parsed_and_referenced_relative_to_the_profiles_file(tmp_path):
    (tmp_path / 'traces').mkdir()
    (tmp_path / 'traces' / 'drive.csv').write_text(
        '# a comment\n\nt_s, rtt_ms, bandwidth_mbps\n0,50,10\n# mid-file comment\n1.5,80,2.5\n')
    assert load_trace(tmp_path / 'traces' / 'drive.csv') == (
        TraceRow(0.0, 50.0, 10.0), TraceRow(1.5, 80.0, 2.5))
    (tmp_path / 'profiles.yaml').write_text(
        'profiles:\n  drive:\n    trace: traces/drive.csv\n    jitter_ms: 5\n')
    assert len(load_profiles(tmp_path / 'profiles.yaml')['drive'].trace) == 2


@pytest.mark.parametrize('content, message', [
    ('time,rtt,bw\n0,50,10\n', r'bad.csv:1: the header must be t_s,rtt_ms,bandwidth_mbps'),
    ('t_s,rtt_ms,bandwidth_mbps\n0,50,10\n2,50,10\n1,50,10\n', r'bad.csv:4: t_s must increase'),
    ('t_s,rtt_ms,bandwidth_mbps\n0,50,10\n0,60,10\n', r'bad.csv:3: t_s must increase'),
    ('t_s,rtt_ms,bandwidth_mbps\n1,50,10\n', r'bad.csv:2: the first row must be at t_s 0'),
    ('t_s,rtt_ms,bandwidth_mbps\n0,50\n', r'bad.csv:2: expected 3 numbers'),
    ('t_s,rtt_ms,bandwidth_mbps\n0,fast,10\n', r'bad.csv:2: expected 3 numbers'),
    ('t_s,rtt_ms,bandwidth_mbps\n0,50,0\n', r'bad.csv:2: bandwidth_mbps must be > 0'),
    ('# only a comment\nt_s,rtt_ms,bandwidth_mbps\n', r'bad.csv: no trace rows'),
])
def test_bad_trace_files_raise_a_clear_value_error(tmp_path, content, message):
    path = tmp_path / 'bad.csv'
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_trace(path)


def test_shipped_trace_loads():
    rows = load_trace(config_path('traces/lte_drive.csv'))
    assert rows[0].t_s == 0 and rows[-1].t_s >= 120
    assert len({row.rtt_ms for row in rows}) > 10
    assert len({row.bandwidth_mbps for row in rows}) > 10


# --- the model ------------------------------------------------------------------------------


def test_model_is_deterministic_by_seed():
    profile = load_profiles()['poor-lte']

    def delays(seed: int) -> list[float | None]:
        model = NetworkModel(profile, seed)
        return [model.request_delay_s(t * 0.05, 50_000, 1_000) for t in range(400)]

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)


def test_delay_is_half_rtt_each_way_plus_serialization_at_the_bandwidth():
    model = NetworkModel(NetworkProfile('p', rtt_ms=40, bandwidth_mbps=8, downlink_mbps=16))
    assert model.one_way_delay_s(0, 0, 'up') == pytest.approx(0.020)
    assert model.one_way_delay_s(0, 1_000_000, 'up') == pytest.approx(1.020)
    up = [model.one_way_delay_s(0, n, 'up') for n in (1_000, 10_000, 100_000, 1_000_000)]
    assert up == sorted(up) and len(set(up)) == 4
    assert model.request_delay_s(0, 100_000, 200_000) == pytest.approx(0.020 + 0.1 + 0.020 + 0.1)
    unlimited = NetworkModel(NetworkProfile('p', rtt_ms=40))
    assert unlimited.one_way_delay_s(0, 10_000_000, 'down') == pytest.approx(0.020)


def test_outage_windows_blackhole_transfers_and_repeat_with_the_period():
    model = NetworkModel(NetworkProfile('p', rtt_ms=40, outages=[(10, 2)], outage_period_s=30))
    assert not model.is_down(9.99) and model.is_down(10.0) and model.is_down(11.9)
    assert not model.is_down(12.0) and model.is_down(40.5) and not model.is_down(45)
    assert model.request_delay_s(10.5, 100, 100) is None
    assert model.request_delay_s(9.99, 100, 100) is None  # the response would arrive in it
    assert model.request_delay_s(12.0, 100, 100) == pytest.approx(0.040)
    assert model.outage_end_s(10.5) == 12 and model.outage_end_s(5) == 5
    assert model.down_time_s(0, 60) == pytest.approx(4) and model.down_time_s(0, 11) == 1
    once = NetworkModel(NetworkProfile('p', outages=[(1, 1)]))
    assert once.is_down(1.5) and not once.is_down(31.5)


def test_stall_frequency_matches_the_probability():
    model = NetworkModel(NetworkProfile('p', rtt_ms=50, stall_probability=0.05, stall_ms=400),
                         seed=11)
    samples = [model.sample_latency(i * 0.01) for i in range(20_000)]
    stalled = [s for s in samples if s.stall_s > 0]
    assert len(stalled) / len(samples) == pytest.approx(0.05, abs=0.006)  # 4 sigma
    assert all(s.total_s == pytest.approx(0.425) for s in stalled)


def test_jitter_is_the_exchange_std_and_never_makes_delays_negative():
    model = NetworkModel(NetworkProfile('p', rtt_ms=100, jitter_ms=20), seed=5)
    delays = [model.request_delay_s(i * 0.01, 0, 0) for i in range(5_000)]
    assert statistics.fmean(delays) == pytest.approx(0.100, abs=0.002)
    assert statistics.stdev(delays) == pytest.approx(0.020, rel=0.1)
    tiny = NetworkModel(NetworkProfile('p', rtt_ms=2, jitter_ms=100), seed=5)
    assert min(tiny.one_way_delay_s(i * 0.01, 0, 'up') for i in range(2_000)) >= 0


def test_trace_sets_rtt_and_uplink_piecewise_and_loops():
    model = NetworkModel(NetworkProfile(
        'p', rtt_ms=999, bandwidth_mbps=999, downlink_mbps=7,
        trace=[(0, 50, 10), (1, 100, 5), (2, 200, 1)]))
    assert [model.rtt_ms(t) for t in (0, 0.5, 1.5, 2.5, 3.2, 4.0)] == [50, 50, 100, 200, 50, 100]
    assert model.bandwidth_mbps(2.5, 'up') == 1 and model.bandwidth_mbps(2.5, 'down') == 7
    assert model.one_way_delay_s(2.5, 125_000, 'up') == pytest.approx(0.100 + 1.0)


# --- the delay line -------------------------------------------------------------------------


def test_delay_line_keeps_order_and_jitters_a_transfer_once():
    model = NetworkModel(NetworkProfile('p', rtt_ms=100, jitter_ms=200), seed=2)
    line = DelayLine(Link(model, 'up'))
    arrivals = [i * 0.004 for i in range(500)]  # bursts: gaps alternate around TRANSFER_GAP_S
    arrivals = [t + (i // 3) * TRANSFER_GAP_S for i, t in enumerate(arrivals)]
    releases = [line.schedule(t, 1_000) for t in arrivals]
    assert releases == sorted(releases)
    assert all(r >= t for r, t in zip(releases, arrivals))
    stalling = NetworkModel(NetworkProfile('p', rtt_ms=100, jitter_ms=20, stall_probability=1,
                                           stall_ms=300))
    burst = DelayLine(Link(stalling, 'up'))
    burst_arrivals = [10 + i * 1e-3 for i in range(4)]
    delays = {round(burst.schedule(t, 1_000) - t, 9) for t in burst_arrivals}
    assert len(delays) == 1 and delays.pop() > 0.3 and burst.stalls == 1
    spaced = DelayLine(Link(stalling, 'up'))
    for i in range(4):
        spaced.schedule(20 + i * 2 * TRANSFER_GAP_S, 1_000)
    assert spaced.stalls == 4


def test_link_serializes_chunks_of_all_connections_at_the_bandwidth():
    link = Link(NetworkModel(NetworkProfile('p', bandwidth_mbps=8)), 'up')
    first, second = DelayLine(link), DelayLine(link)
    assert first.schedule(0, 100_000) == pytest.approx(0.1)
    assert second.schedule(0, 100_000) == pytest.approx(0.2)  # waits for the first on the link


def test_command_line_overrides_a_named_profile():
    args = relay.parse_args(['--target', '127.0.0.1:1', '--profile', 'good-lte', '--rtt-ms',
                             '10', '--outage', '5:1.5'])
    assert args.network.name == 'good-lte+overrides'
    assert args.network.rtt_ms == 10 and args.network.outages == ((5.0, 1.5),)
    assert args.network.bandwidth_mbps == load_profiles()['good-lte'].bandwidth_mbps
    assert relay.parse_args(['--target', 'localhost:1']).network == NetworkProfile('custom')
    for bad in (['--profile', 'nope'], ['--stall-probability', '2'], ['--outage', 'x']):
        with pytest.raises(SystemExit):
            relay.parse_args(['--target', '127.0.0.1:1', *bad])


# --- the relay process ----------------------------------------------------------------------


class RelayProcess:
    """``network_relay`` on 127.0.0.1 in its own process, logging to a file."""

    def __init__(self, log_path: Path, target: str, *args: str) -> None:
        """Start the relay and wait for its listening line."""
        self.log_path = log_path
        with log_path.open('w') as log:
            self.process = subprocess.Popen(
                [sys.executable, '-m', 'speculative_av.netem.relay', '--listen', '127.0.0.1:0',
                 '--target', target, *args], stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], LISTEN_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ''
        self.listening_at = time.perf_counter()
        match = re.fullmatch(r'network_relay listening on (127\.0\.0\.1):(\d+) -> '
                             rf'{re.escape(target)} profile (\S+)\n', line)
        assert match, f'no listening line ({line!r}); log:\n{log_path.read_text()}'
        self.address = (match.group(1), int(match.group(2)))

    def stop(self, signum: int = signal.SIGTERM) -> dict[str, float]:
        """Signal the relay, expect exit code 0, return the numbers of its summary line."""
        self.process.send_signal(signum)
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        log = self.log_path.read_text()
        assert code == 0, log
        return self.summary(log)

    @staticmethod
    def summary(log: str) -> dict[str, float]:
        """Return the key=value pairs of the summary line in ``log``."""
        match = re.search(r'^network_relay summary: (.*)$', log, re.MULTILINE)
        assert match, log
        return {key: float(value) for key, value in
                (pair.split('=') for pair in match.group(1).split())}


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator:
    """Start relays for one test; kill whatever the test did not stop."""
    started: list[RelayProcess] = []

    def start(target: str, *args: str) -> RelayProcess:
        started.append(RelayProcess(tmp_path / f'relay{len(started)}.log', target, *args))
        return started[-1]

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture(scope='module')
def echo_server() -> Iterator[str]:
    """Echo every byte back, on 127.0.0.1."""
    server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def _connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _receive(sock: socket.socket, nbytes: int) -> bytes:
    data = bytearray()
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        assert chunk, 'connection closed early'
        data += chunk
    return bytes(data)


def _round_trip(sock: socket.socket, payload: bytes = b'p' * 100) -> float:
    start = time.perf_counter()
    sock.sendall(payload)
    assert _receive(sock, len(payload)) == payload
    return time.perf_counter() - start


def test_relay_adds_the_rtt_to_every_round_trip(start_relay, echo_server):
    proxy = start_relay(echo_server, '--rtt-ms', '100')
    with _connect(proxy.address) as sock:
        rtts = [_round_trip(sock) for _ in range(8)]
    print(f'\nrelay --rtt-ms 100 round trips (ms): {[round(r * 1e3, 1) for r in rtts]}')
    assert all(0.100 <= r < 0.100 + SLACK_S for r in rtts), rtts
    summary = proxy.stop(signal.SIGINT)
    assert summary['connections'] == 1
    assert summary['bytes_up'] == summary['bytes_down'] == 800


def test_relay_bandwidth_limit_slows_a_1_mb_transfer(start_relay, echo_server):
    payload = bytes(range(256)) * 3907  # 1,000,192 bytes
    proxy = start_relay(echo_server, '--bandwidth-mbps', '20')  # 0.4 s for 1 MB, downlink free
    with _connect(proxy.address) as sock:
        start = time.perf_counter()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert _receive(sock, len(payload)) == payload
        elapsed = time.perf_counter() - start
        sender.join()
    ideal = len(payload) * 8 / 20e6
    print(f'\n1 MB through 20 Mbit/s: {elapsed * 1e3:.0f} ms (ideal {ideal * 1e3:.0f} ms), '
          f'{len(payload) * 8 / elapsed / 1e6:.1f} Mbit/s')
    assert ideal <= elapsed < ideal + 0.3
    assert proxy.stop()['bytes_up'] == len(payload)


def test_relay_outage_holds_traffic_then_releases_it(start_relay, echo_server):
    proxy = start_relay(echo_server, '--outage', '0:1.5')  # from the relay's start on
    with _connect(proxy.address) as sock:  # accepted during the outage
        held = _round_trip(sock)
        released_after = time.perf_counter() - proxy.listening_at
        after = [_round_trip(sock) for _ in range(3)]
    print(f'\noutage 0-1.5 s: first echo {released_after:.3f} s after the listening line, '
          f'then {[round(r * 1e3, 1) for r in after]} ms')
    # The relay's clock starts just before it prints the listening line.
    assert 1.3 < released_after < 1.5 + 0.5 and held > 1.0
    assert max(after) < SLACK_S
    assert proxy.stop()['outage_s'] == 1.5


@pytest.fixture(scope='module')
def grpc_health_server() -> Iterator[str]:
    """Serve the standard gRPC health service only, on 127.0.0.1."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set('', health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port('127.0.0.1:0')
    server.start()
    yield f'127.0.0.1:{port}'
    server.stop(None)


def _timed_check(stub: health_pb2_grpc.HealthStub, timeout: float) -> float:
    start = time.perf_counter()
    response = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    return time.perf_counter() - start


def test_grpc_unary_call_through_the_relay_is_delayed_by_the_rtt(
        start_relay, grpc_health_server):
    proxy = start_relay(grpc_health_server, '--rtt-ms', '100')
    target = '%s:%d' % proxy.address
    with grpc.insecure_channel(target, options=[('grpc.enable_http_proxy', 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        connect = _timed_check(stub, 10)
        calls = [_timed_check(stub, 5) for _ in range(5)]
    print(f'\ngRPC Check via relay --rtt-ms 100: first (connecting) {connect * 1e3:.0f} ms, '
          f'then {[round(c * 1e3, 1) for c in calls]} ms')
    assert all(0.100 <= c < 0.100 + SLACK_S for c in calls), calls
    assert proxy.stop()['connections'] == 1


def test_grpc_calls_time_out_during_an_outage_and_succeed_after_it(start_relay,
                                                                   grpc_health_server):
    proxy = start_relay(grpc_health_server, '--outage', '0:1.5', '--rtt-ms', '20')
    target = '%s:%d' % proxy.address
    with grpc.insecure_channel(target, options=[('grpc.enable_http_proxy', 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            _timed_check(stub, 0.3)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _timed_check(stub, 5)  # waits for the end of the outage on the same connection
        assert time.perf_counter() - proxy.listening_at > 1.3
        assert _timed_check(stub, 5) < 0.020 + SLACK_S
    assert proxy.stop()['connections'] >= 1


def test_relay_stops_by_itself_after_its_duration(echo_server):
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, '-m', 'speculative_av.netem.relay', '--listen', '127.0.0.1:0',
         '--target', echo_server, '--profile', 'good-lte', '--duration-s', '0.5'],
        capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert 0.5 <= time.perf_counter() - start < 10
    assert run.stdout.startswith('network_relay listening on 127.0.0.1:')
    assert run.stdout.count('\n') == 1 and run.stdout.endswith('profile good-lte\n')
    assert RelayProcess.summary(run.stderr)['connections'] == 0
