"""
Fault injection around the speculation rig: relay control, fault servers, leak, timing checks.

The checks judge the node from outside, as a planning node would: a fused result counts as in
time when the observer (this pytest process, on the same machine clock as the camera's stamps)
received it by the frame's deadline, not because the node said so.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
import os
from pathlib import Path
import re
import select
import socket
import subprocess
import sys
import time
from typing import Iterator

import numpy as np
from ros_harness import python_module, running, wait_until
from speculation_rig import Observer

from speculative_av.tools.ros_isolation import fastdds_shm_files

HELPERS = Path(__file__).parent / 'helpers'
# What receiving a fused result may take after the deadline when the node decides at the deadline
# (local in hand, the cloud still out): scheduler wake-up, publishing, DDS delivery to another
# process, on a shared 2-core machine. Measured figures are printed by every test.
RECEIVE_SLACK_MS = 50.0
# Thread and descriptor counts a node may differ by between two quiet moments (gRPC's and DDS's
# own pools grow and shrink a little); a leak per frame, call or cycle exceeds this quickly.
THREAD_SLACK = 4
FD_SLACK = 8


def _stamp_ns(msg: object) -> int:
    stamp = msg.header.stamp  # type: ignore[attr-defined]
    return stamp.sec * 1_000_000_000 + stamp.nanosec


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


def leaked_shm(before: frozenset[str]) -> set[str]:
    """Return FastDDS shm files created since ``before`` that no live process maps or holds."""
    in_use: set[str] = set()
    for proc in Path('/proc').iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / 'fd').iterdir():
                with contextlib.suppress(OSError):
                    in_use.add(os.readlink(fd))
            with open(proc / 'maps') as maps:
                in_use.update(line.split(None, 5)[-1].strip() for line in maps
                              if '/dev/shm' in line)
    return {name for name in fastdds_shm_files() - before if f'/dev/shm/{name}' not in in_use}


@dataclass
class Timing:
    """Per fused result, measured at the observer: how long after its deadline it arrived."""

    after_deadline_ms: np.ndarray
    late: int  # frames the node marked late (nothing, local included, by the deadline)

    def line(self) -> str:
        """Return the figures for a report line."""
        values = self.after_deadline_ms
        if not len(values):
            return 'no fused results'
        return (f'{len(values)} fused; received after deadline p50 {np.median(values):.1f} '
                f'p99 {np.percentile(values, 99):.1f} max {values.max():.1f} ms; '
                f'late {self.late}')


def check_fused_in_time(observed: Observer, deadline_ms: float,
                        deadline_of: dict[int, int] | None = None) -> Timing:
    """
    Check exactly one fused result per decided frame, each received by its deadline.

    A result may come later only if the node marked the frame late and the local result itself
    reached the observer after the deadline (the local detector was late; nothing to wait
    for). ``deadline_of`` maps a stamp to its deadline (ns) when that is not stamp + budget
    (``deadline_reference: arrival``). Returns the receive-side timing.
    """
    fused = {_stamp_ns(m): t for m, t in observed.fused}
    local = {_stamp_ns(m): t for m, t in observed.local}
    decisions = {round(float(d['stamp']) * 1e9): d for d, _ in observed.decisions}
    assert len(fused) == len(observed.fused), 'a frame was fused twice'
    missing = sorted(set(decisions) - set(fused))
    assert not missing, f'{len(missing)} decided frames have no fused result: {missing[:5]}'
    unexplained = sorted(set(fused) - set(decisions))
    assert not unexplained, f'fused results without a decision: {unexplained[:5]}'
    after, late, problems = [], 0, []
    for stamp, received in fused.items():
        deadline = (deadline_of or {}).get(stamp, stamp + round(deadline_ms * 1e6))
        after_ms = (received - deadline) / 1e6
        after.append(after_ms)
        decision = decisions[stamp]
        late += decision['late'] == 'true'
        if after_ms <= RECEIVE_SLACK_MS:
            continue
        local_after_ms = (local[stamp] - deadline) / 1e6 if stamp in local else None
        if decision['late'] != 'true' or (local_after_ms is not None and local_after_ms <= 0):
            problems.append(f'stamp {stamp}: received {after_ms:.1f} ms after the deadline, '
                            f"late={decision['late']}, local received "
                            f'{local_after_ms} ms after it; {decision}')
    assert not problems, f'{len(problems)} fused results late:\n' + '\n'.join(problems[:5])
    return Timing(np.array(after), late)


def summary_counters(observed: Observer) -> dict[str, str]:
    """Return the node's last counters on /diagnostics (the summary status)."""
    assert observed.diagnostics, 'no /diagnostics received'
    return observed.diagnostics[-1]['speculation']


def wait_until_quiet(observed: Observer, timeout: float = 30.0) -> dict[str, str]:
    """
    Wait until every processed frame is decided and fused, with the camera stopped.

    ``frames_processed`` on /diagnostics must come to equal the decisions and fused results the
    observer received; a frame the node processed but never fused keeps them apart and fails.
    Returns the final counters.
    """
    def settled() -> bool:
        if not observed.diagnostics:
            return False
        processed = int(summary_counters(observed)['frames_processed'])
        return processed == len(observed.decisions) == len(observed.fused)

    try:
        wait_until(settled, timeout, 'processed frames == decisions == fused results')
    finally:
        counters = summary_counters(observed) if observed.diagnostics else {}
        print(f"\nframes_processed={counters.get('frames_processed')} "
              f'decisions={len(observed.decisions)} fused={len(observed.fused)}')
    return summary_counters(observed)
