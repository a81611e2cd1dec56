"""
Fault injection around the speculation rig: relay control, fault servers, leak, timing checks.

The checks judge the node from outside, as a planning node would: a fused result counts as in
time when the observer (this pytest process, on the same machine clock as the camera's stamps)
received it by the frame's deadline, not because the node said so.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
import contextlib
from dataclasses import dataclass, field
from functools import partial
import os
from pathlib import Path
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Iterable, Iterator

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import rclpy.node
from ros_harness import frozen_heap, python_module, running, stop, wait_until
from sensor_msgs.msg import Image
from speculation_rig import detector_command
from speculative_av.ros.spinning import background_node
from speculative_av.tools.ros_isolation import fastdds_shm_files, files_in_use
from vision_msgs.msg import Detection2DArray

HELPERS = Path(__file__).parent / 'helpers'
# What receiving a fused result may take after the deadline when the node decides at the deadline
# (local in hand, the cloud still out): scheduler wake-up, publishing, DDS delivery to another
# process, on a shared 2-core machine. Measured figures are printed by every test.
RECEIVE_SLACK_MS = 50.0
# Thread and descriptor counts a node may differ by between two quiet moments (gRPC's and DDS's
# own pools grow and shrink a little); a leak per frame, call or cycle exceeds this quickly.
THREAD_SLACK = 4
FD_SLACK = 8


def cdr_stamp_ns(data: bytes) -> int:
    """Return the header stamp of a serialized message that starts with a std_msgs/Header."""
    sec, nanosec = struct.unpack_from('<iI', data, 4)  # after the CDR encapsulation header
    return sec * 1_000_000_000 + nanosec


@dataclass
class StampObserver:
    """
    Records when the node's outputs arrive, from a spinning thread, as a planning node would.

    Images and detections are taken serialized and only their header stamp is read: a Python
    subscriber that deserializes 30 Hz images or 300-box arrays falls behind on two busy cores,
    and its own backlog would be blamed on the node. Times are ROS (system) time in ns.
    """

    node: rclpy.node.Node
    images: list[tuple[int, int]] = field(default_factory=list)  # (stamp, received)
    fused: list[tuple[int, int]] = field(default_factory=list)
    local: list[tuple[int, int]] = field(default_factory=list)
    decisions: list[tuple[dict[str, str], int]] = field(default_factory=list)
    diagnostics: list[dict[str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Subscribe to everything; the image subscription makes the camera start."""
        for msg_type, topic, store in ((Image, 'image', self.images),
                                       (Detection2DArray, 'detections', self.fused),
                                       (Detection2DArray, 'detections/local', self.local)):
            self.node.create_subscription(msg_type, topic, partial(self._keep, store), 100,
                                          raw=True)
        self.node.create_subscription(DiagnosticStatus, 'speculation/decisions',
                                      self._on_decision, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)

    def _now(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def _keep(self, store: list[tuple[int, int]], data: bytes) -> None:
        store.append((cdr_stamp_ns(data), self._now()))

    def _on_decision(self, msg: DiagnosticStatus) -> None:
        values = {kv.key: kv.value for kv in msg.values}
        values['hardware_id'] = msg.hardware_id
        self.decisions.append((values, self._now()))

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        self.diagnostics.append(
            {s.name.split(': ')[-1]: {kv.key: kv.value for kv in s.values} for s in msg.status})

    def outcomes(self) -> list[str]:
        """Return one line per decided frame with every source's outcome, for failure output."""
        return [' '.join(f'{k}={v}' for k, v in d.items() if k.startswith(
            ('winner', 'source', 'cloud_lat', 'local_lat', 'late'))) for d, _ in self.decisions]

    def winners(self, since: int = 0) -> list[str]:
        """Return the fused winner kind of each decided frame after index ``since``."""
        return [d['winner'] for d, _ in self.decisions[since:]]

    def wait_for_node_outputs(self, timeout: float = 60.0) -> None:
        """
        Wait until this observer has discovered the node's fused and decision publishers.

        Start the frames only then: results published before the match are never delivered
        (volatile QoS), and would count as lost.
        """
        wait_until(lambda: all(self.node.count_publishers(topic) > 0 for topic in
                               ('detections', 'speculation/decisions')),
                   timeout, "the node's output topics")


@contextlib.contextmanager
def observer(name: str = 'fault_observer') -> Iterator[StampObserver]:
    """Spin a :class:`StampObserver` node in a background thread for the block's duration."""
    with frozen_heap(), background_node(name) as node:
        yield StampObserver(node)


def decision_stamp_ns(decision: dict[str, str]) -> int:
    """Return a decision's ``stamp`` ('sec.nanosec', exact decimal seconds) in ns."""
    seconds, _, fraction = decision['stamp'].partition('.')
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, '0')[:9])


def by_decision(observed: StampObserver) -> dict[int, dict[str, str]]:
    """Return the decisions keyed by the stamp (ns) of the image they decided."""
    return {decision_stamp_ns(decision): decision for decision, _ in observed.decisions}


def _read_line(stream: object, timeout: float, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f'{what} printed nothing within {timeout:.0f} s'
    return stream.readline()  # type: ignore[attr-defined]


class RelayControl:
    """Talks to a ``network_relay --control PATH`` socket."""

    def __init__(self, path: Path) -> None:
        """Use the control socket at ``path``."""
        self.path = path

    def send(self, command: str) -> dict[str, str]:
        """Send one command, expect ``ok``, return the reply's key=value pairs."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.path))
            sock.sendall(f'{command}\n'.encode())
            reply = sock.makefile().readline().strip()
        assert reply.startswith('ok '), f'relay answered {command!r} with {reply!r}'
        return dict(pair.split('=', 1) for pair in reply.split()[1:])


@contextlib.contextmanager
def relay(target: str, control: Path, *args: str,
          port: int = 0) -> Iterator[tuple[subprocess.Popen[str], str, RelayControl]]:
    """Run ``network_relay`` to ``target`` with a control socket: yield it, address, control."""
    command = python_module('speculative_av.netem.relay', '--listen', f'127.0.0.1:{port}',
                            '--target', target, '--control', str(control), *args)
    with running(command, stdout=subprocess.PIPE) as process:
        line = _read_line(process.stdout, 30, 'network_relay')
        match = re.match(r'network_relay listening on (\S+) ', line)
        assert match, f'network_relay did not start: {line!r}'
        yield process, match.group(1), RelayControl(control)


@contextlib.contextmanager
def fault_server(kind: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """Run ``test/helpers/fault_server.py`` (``silent-tcp``, ``silent-grpc``, ``oversized``)."""
    command = [sys.executable, str(HELPERS / 'fault_server.py'), kind, '--port', str(port)]
    with running(command, stdout=subprocess.PIPE) as server:
        line = _read_line(server.stdout, 30, f'fault server {kind}')
        assert 'listening on' in line, f'fault server did not start: {line!r}'
        yield server


@dataclass(frozen=True)
class ProcessFootprint:
    """What a process holds at one moment: threads, descriptors, resident memory."""

    threads: int
    fds: int
    rss_kb: int

    @classmethod
    def of(cls, pid: int) -> ProcessFootprint:
        """Read ``/proc/PID``."""
        status = Path(f'/proc/{pid}/status').read_text()
        rss = re.search(r'^VmRSS:\s+(\d+) kB', status, re.MULTILINE)
        return cls(len(os.listdir(f'/proc/{pid}/task')), len(os.listdir(f'/proc/{pid}/fd')),
                   int(rss.group(1)) if rss else 0)

    def __str__(self) -> str:
        """Return e.g. ``threads=31 fds=58 rss=612 MB``."""
        return f'threads={self.threads} fds={self.fds} rss={self.rss_kb / 1024:.0f} MB'


def settled_footprint(pid: int, seconds: float = 1.0) -> ProcessFootprint:
    """Return the smallest counts over ``seconds``: transient gRPC/DDS threads come and go."""
    samples = []
    end = time.monotonic() + seconds
    while True:
        samples.append(ProcessFootprint.of(pid))
        if time.monotonic() >= end:
            break
        time.sleep(0.1)
    return ProcessFootprint(min(s.threads for s in samples), min(s.fds for s in samples),
                            samples[-1].rss_kb)


def assert_no_growth(before: ProcessFootprint, after: ProcessFootprint, what: str) -> None:
    """Fail when threads or descriptors grew by more than the allowed slack."""
    assert after.threads <= before.threads + THREAD_SLACK, f'{what}: threads {before} -> {after}'
    assert after.fds <= before.fds + FD_SLACK, f'{what}: descriptors {before} -> {after}'


def _ours(name: str, domain_id: int) -> bool:
    """
    Return whether a FastDDS shm file left behind is a leak of this run.

    Data segments (``fastdds_<id>``, 64 MB each with our profile) always count. A bare port
    file (``fastdds_port<N>``) does not: FastDDS leaves it when a participant that sent to the
    port outlives its listener, even when every process exits cleanly, and reuses it. A port's
    lock files (``_el``, ``sem.*_mutex``) count when the port is of our domain: they outlive
    only a listener that did not close.
    """
    port = re.search(r'fastdds_port(\d+)', name)
    if port is None:
        return True
    first = 7400 + 250 * domain_id  # RTPS well-known ports of the domain (participant gain 250)
    return (name.endswith(('_el', '_mutex'))
            and first <= int(port.group(1)) < first + 250)


def leaked_shm(before: frozenset[str]) -> set[str]:
    """
    Return FastDDS shm files created since ``before`` that no live process maps or holds.

    Port files of other domains are other test runs' (this machine is shared); segments cannot
    be told apart, so another run's crash at the same moment would be reported here too.
    """
    domain_id = int(os.environ['ROS_DOMAIN_ID'])
    in_use = files_in_use()
    return {name for name in fastdds_shm_files() - before
            if f'/dev/shm/{name}' not in in_use and _ours(name, domain_id)}


@dataclass
class Timing:
    """Per fused result, measured at the observer: how long after its deadline it arrived."""

    after_deadline_ms: np.ndarray
    late: int  # frames the node marked late (nothing, local included, by the deadline)
    image_delay_ms: np.ndarray  # camera stamp to the observer: how loaded the machine was
    problems: list[str]  # fused results later than allowed
    stalled: int  # late results excused: camera images reaching the observer were late too

    def assert_in_time(self) -> None:
        """Fail with the first offending frames if any fused result came later than allowed."""
        assert not self.problems, (
            f'{len(self.problems)} of {len(self.after_deadline_ms)} fused results late at the '
            f'observer (camera images took {figures(self.image_delay_ms)} to reach it):\n'
            + '\n'.join(self.problems[:5]))


class StallWitness:
    """
    Tells when the delivery path itself stalled, from the camera images the observer received.

    The images never pass through the node. When one received around the same moment as a late
    fused result was itself late (more than ``RECEIVE_SLACK_MS`` after its stamp), the machine
    or the observer stalled (a shared 2-core machine), and the fused result's lateness says
    nothing about the node. Such results are counted, not failed.
    """

    WINDOW_NS = 100_000_000

    def __init__(self, images: Iterable[tuple[int, int]]) -> None:
        """Index camera images, given as (stamp, received) in ns, by when they were received."""
        pairs = sorted((received, received - stamp) for stamp, received in images)
        self._received = [received for received, _ in pairs]
        self._delays = [delay for _, delay in pairs]

    def stalled(self, received_ns: int) -> bool:
        """Return whether an image received within the window around ``received_ns`` was late."""
        low = bisect_left(self._received, received_ns - self.WINDOW_NS)
        high = bisect_right(self._received, received_ns + self.WINDOW_NS)
        return any(delay > RECEIVE_SLACK_MS * 1e6 for delay in self._delays[low:high])


def image_delays_ms(observed: StampObserver) -> np.ndarray:
    """Return how long after its stamp each camera image reached the observer."""
    return np.array([(received - stamp) / 1e6 for stamp, received in observed.images])


def figures(values: np.ndarray) -> str:
    """Return 'p50 / p99 / max' of ``values`` in ms."""
    if not len(values):
        return 'n/a'
    return (f'p50 {np.median(values):.1f} / p99 {np.percentile(values, 99):.1f} / '
            f'max {values.max():.1f} ms')


def check_fused_in_time(observed: StampObserver, deadline_ms: float) -> Timing:
    """
    Check exactly one fused result per decided frame; time each against its deadline.

    A result may come later than the deadline (plus ``RECEIVE_SLACK_MS``) only if the node
    marked the frame late and the local result itself reached the observer after the deadline
    (the local detector was late; nothing to wait for). Those that do not qualify are the
    returned timing's ``problems`` (see :meth:`Timing.assert_in_time`), unless the
    :class:`StallWitness` saw the delivery path stalled at that moment.
    """
    fused = dict(observed.fused)
    local = dict(observed.local)
    decisions = by_decision(observed)
    assert len(fused) == len(observed.fused), 'a frame was fused twice'
    assert len(decisions) == len(observed.decisions), 'a frame was decided twice'
    missing = sorted(set(decisions) - set(fused))
    assert not missing, f'{len(missing)} decided frames have no fused result: {missing[:5]}'
    unexplained = sorted(set(fused) - set(decisions))
    assert not unexplained, f'fused results without a decision: {unexplained[:5]}'
    witness = StallWitness(observed.images)
    after, late, problems, stalled = [], 0, [], 0
    for stamp, received in fused.items():
        deadline = stamp + round(deadline_ms * 1e6)
        after_ms = (received - deadline) / 1e6
        after.append(after_ms)
        decision = decisions[stamp]
        late += decision['late'] == 'true'
        if after_ms <= RECEIVE_SLACK_MS:
            continue
        local_after_ms = (local[stamp] - deadline) / 1e6 if stamp in local else None
        if decision['late'] == 'true' and (local_after_ms is None or local_after_ms > 0):
            continue
        if witness.stalled(received):
            stalled += 1
        else:
            problems.append(f'stamp {stamp}: received {after_ms:.1f} ms after the deadline, '
                            f"late={decision['late']}, local received "
                            f'{local_after_ms} ms after it; {decision}')
    return Timing(np.array(after), late, image_delays_ms(observed), problems, stalled)


@dataclass
class LoggedProcess:
    """A process whose stderr (where ROS logs) is echoed and kept, line by line."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.process.pid

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            sys.stderr.write(line)

    def logged(self, pattern: str, since: int = 0) -> list[str]:
        """Return the lines after line ``since`` that match the regular expression."""
        return [line for line in self.lines[since:] if re.search(pattern, line)]


@contextlib.contextmanager
def logged_detector(**parameters: object) -> Iterator[LoggedProcess]:
    """Run the node as ``speculation_rig.detector`` does, keeping its log lines."""
    process = subprocess.Popen(detector_command(**parameters), text=True, stderr=subprocess.PIPE)
    node = LoggedProcess(process)
    pump = threading.Thread(target=node._pump, daemon=True)
    pump.start()
    try:
        yield node
        assert process.poll() is None, f'detector exited early with {process.returncode}'
    finally:
        code = stop(process, timeout=20)
        pump.join(5)
    assert code == 0, f'detector exited with {code}'


def summary_counters(observed: StampObserver) -> dict[str, str]:
    """Return the node's last counters on /diagnostics (the summary status)."""
    assert observed.diagnostics, 'no /diagnostics received'
    return observed.diagnostics[-1]['speculation']


def lost_frames_report(observed: StampObserver, counters: dict[str, str]) -> str:
    """Describe what went missing, for the failure output: counters, gaps, unmatched frames."""
    fused = {stamp for stamp, _ in observed.fused}
    decided = by_decision(observed)
    first = min((received for _, received in observed.images), default=0)

    def at(received: int) -> str:
        return f'{(received - first) / 1e9:.1f} s'

    no_fused = [f'{stamp} (decided at {at(received)}): {decision}'
                for (decision, received), stamp in zip(observed.decisions, decided)
                if stamp not in fused]
    no_decision = [f'{stamp} (fused at {at(received)})' for stamp, received in observed.fused
                   if stamp not in decided]
    # Frames the camera sent that the node processed but never decided leave no stamp at the
    # node's outputs; the longest silences of the decisions show when they went missing.
    times = sorted(received for _, received in observed.decisions)
    gaps = sorted(((b - a, a) for a, b in zip(times, times[1:])), reverse=True)[:3]
    return (f'counters: {counters}\ndecided, never fused: {no_fused[:5]}\n'
            f'fused, never decided: {no_decision[:5]}\nlongest pauses between decisions: '
            + ', '.join(f'{gap / 1e6:.0f} ms after {at(start)}' for gap, start in gaps))


def wait_until_quiet(observed: StampObserver, timeout: float = 30.0) -> dict[str, str]:
    """
    Wait until every processed frame is decided and fused, with the input stopped.

    ``frames_processed`` on /diagnostics must come to equal the decisions and fused results the
    observer received; a frame the node processed but never fused keeps them apart and fails.
    Returns the final counters.
    """
    reports = len(observed.diagnostics)

    def settled() -> bool:
        # Two fresh 1 Hz reports: the last frame in flight when the input stopped is counted.
        if len(observed.diagnostics) < reports + 2:
            return False
        processed = int(summary_counters(observed)['frames_processed'])
        return processed == len(observed.decisions) == len(observed.fused)

    try:
        wait_until(settled, timeout, 'processed frames == decisions == fused results')
    finally:
        counters = summary_counters(observed) if observed.diagnostics else {}
        print(f"\nframes_processed={counters.get('frames_processed')} "
              f'decisions={len(observed.decisions)} fused={len(observed.fused)}')
        if not settled():
            print(lost_frames_report(observed, counters))
    return summary_counters(observed)


@dataclass(frozen=True)
class Namespace:
    """A network namespace joined to this one by a veth pair: a remote host on its own link."""

    name: str
    host_address: str  # this side of the link
    address: str  # the namespace's side

    def command(self, command: list[str]) -> list[str]:
        """Return ``command`` run inside the namespace."""
        return ['ip', 'netns', 'exec', self.name, *command]

    def blackhole(self, on: bool) -> None:
        """
        Drop (or stop dropping) everything the namespace sends back to this side.

        Requests still arrive, but no reply, ACK or SYN-ACK leaves: from this side the link
        silently eats packets while connections stay established.
        """
        action = 'add' if on else 'del'
        subprocess.run(self.command(['ip', 'route', action, 'blackhole',
                                     f'{self.host_address}/32']), check=True)


def _ip(*args: str) -> None:
    subprocess.run(['ip', *args], check=True, capture_output=True)


@contextlib.contextmanager
def network_namespace() -> Iterator[Namespace]:
    """Create a namespace with a veth link to this one (10.213.x.0/30); delete it after."""
    tag = os.getpid() % 16000
    name, host_if, ns_if = f'sav-fault-{tag}', f'savh{tag}', f'savn{tag}'
    base = f'10.213.{tag // 64}.{(tag % 64) * 4}'
    prefix = base.rsplit('.', 1)[0]
    last = int(base.rsplit('.', 1)[1])
    space = Namespace(name, f'{prefix}.{last + 1}', f'{prefix}.{last + 2}')
    _ip('netns', 'add', name)
    try:
        _ip('link', 'add', host_if, 'type', 'veth', 'peer', 'name', ns_if)
        _ip('link', 'set', ns_if, 'netns', name)
        _ip('addr', 'add', f'{space.host_address}/30', 'dev', host_if)
        _ip('link', 'set', host_if, 'up')
        for args in (('addr', 'add', f'{space.address}/30', 'dev', ns_if),
                     ('link', 'set', ns_if, 'up'), ('link', 'set', 'lo', 'up')):
            _ip('netns', 'exec', name, 'ip', *args)
        yield space
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip('link', 'del', host_if)  # also removes the peer inside the namespace
        _ip('netns', 'del', name)
