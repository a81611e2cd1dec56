"""
Relay TCP connections through an emulated mobile network, e.g. gRPC from vehicle to cloud.

    network_relay --listen 127.0.0.1:50052 --target 10.0.0.5:50051 --profile poor-lte

Point the vehicle's cloud endpoint at the listening address. Every connection is forwarded to the
target: bytes from the client travel the uplink, bytes back the downlink, delayed, throttled and
stalled chunk by chunk as :mod:`speculative_av.netem.delay_line` schedules them from the profile's
:class:`~speculative_av.netem.profiles.NetworkModel`. During an outage connections stay open but
nothing flows, and new ones are accepted but carry nothing until it ends: what gRPC meets in a
radio dead zone (calls run into their deadlines, then traffic resumes on the same connection).
The model's clock starts when the relay does.

Once listening it prints ``network_relay listening on HOST:PORT -> TARGET profile NAME`` to
stdout, its only output there. On SIGINT or SIGTERM, or after ``--duration-s``, it closes every
connection, writes a summary line to stderr and exits with 0.
"""
from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field, fields, replace
import logging
from pathlib import Path
import signal
import sys
from typing import TextIO

from speculative_av.netem.delay_line import DelayLine, Link
from speculative_av.netem.profiles import (
    Direction, load_profiles, load_trace, NetworkModel, NetworkProfile)

_LOG = logging.getLogger('network_relay')

READ_BYTES = 64 * 1024
# Chunks a stream may have in the emulated network before its sender is pushed back (TCP flow
# control): up to 2 MiB, a deep cellular buffer.
QUEUED_CHUNKS = 32
DIRECTIONS: tuple[Direction, Direction] = ('up', 'down')
OVERRIDES = ('rtt_ms', 'jitter_ms', 'bandwidth_mbps', 'downlink_mbps', 'stall_probability',
             'stall_ms', 'outage_period_s')


@dataclass
class RelayStats:
    """What went through the relay."""

    connections: int = 0
    delivered: dict[str, int] = field(default_factory=lambda: {'up': 0, 'down': 0})
    stalls: int = 0


class Relay:
    """Forwards connections to ``target`` through ``model``, on the running event loop."""

    def __init__(self, model: NetworkModel, target: tuple[str, int]) -> None:
        """Start the model's clock now."""
        self.model = model
        self.target = target
        self.stats = RelayStats()
        self._links = {direction: Link(model, direction) for direction in DIRECTIONS}
        self._loop = asyncio.get_running_loop()
        self._origin_s = self._loop.time()
        self._connections: set[asyncio.Task[None]] = set()

    def now_s(self) -> float:
        """Return the model's time: seconds since the relay started."""
        return self._loop.time() - self._origin_s

    async def handle(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        """Forward one accepted connection until both sides closed it (asyncio's callback)."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        self.stats.connections += 1
        peer = client_writer.get_extra_info('peername')
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            _LOG.warning('connection from %s: cannot reach %s:%d: %s', peer, *self.target, exc)
            client_writer.close()
            return
        _LOG.debug('connection from %s relayed', peer)
        lines = {direction: DelayLine(self._links[direction]) for direction in DIRECTIONS}
        try:
            try:
                async with asyncio.TaskGroup() as group:
                    for direction, reader, writer in zip(
                            DIRECTIONS, (client_reader, server_reader),
                            (server_writer, client_writer)):
                        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)
                        group.create_task(self._receive(reader, queue, lines[direction]))
                        group.create_task(self._deliver(queue, writer, direction))
            except* OSError as errors:  # a reset or broken pipe on either side ends both
                _LOG.debug('connection from %s: %s', peer, errors.exceptions[0])
        except asyncio.CancelledError:
            # close() is shutting the relay down. End quietly: on Python 3.11, asyncio's
            # start_server callback logs a cancelled handler task as an error.
            _LOG.debug('connection from %s dropped at shutdown', peer)
        finally:
            client_writer.close()
            server_writer.close()
            self.stats.stalls += sum(line.stalls for line in lines.values())
        _LOG.debug('connection from %s closed', peer)

    async def close(self) -> None:
        """Drop every connection."""
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def summary(self) -> str:
        """Return a one-line account of the traffic so far."""
        return (f'network_relay summary: connections={self.stats.connections} '
                f"bytes_up={self.stats.delivered['up']} "
                f"bytes_down={self.stats.delivered['down']} stalls={self.stats.stalls} "
                f'outage_s={self.model.down_time_s(0.0, self.now_s()):.1f}')

    async def _receive(self, reader: asyncio.StreamReader,
                       queue: asyncio.Queue[tuple[float, bytes]], line: DelayLine) -> None:
        """Read one direction of a connection, queueing each chunk with its release time."""
        while chunk := await reader.read(READ_BYTES):
            await queue.put((line.schedule(self.now_s(), len(chunk)), chunk))
        await queue.put((0.0, b''))  # end of stream, once everything before it is delivered

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter, direction: Direction) -> None:
        """Write each queued chunk at its release time; pass the end of stream on."""
        while True:
            release_s, chunk = await queue.get()
            wait_s = release_s - self.now_s()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
            self.stats.delivered[direction] += len(chunk)


async def run(args: argparse.Namespace, announce: TextIO) -> int:
    """Relay until SIGINT/SIGTERM or ``args.duration_s``; return the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    relay = Relay(NetworkModel(args.network, args.seed), args.target)
    host, port = args.listen
    try:
        server = await asyncio.start_server(relay.handle, host, port)
    except OSError as exc:
        _LOG.error('could not listen on %s: %s', _format(host, port), exc)
        return 1
    port = server.sockets[0].getsockname()[1]
    print(f'network_relay listening on {_format(host, port)} -> {_format(*args.target)} '
          f'profile {args.network.name}', file=announce, flush=True)
    _LOG.info('emulating %s', _describe(args.network))
    try:
        await asyncio.wait_for(stop.wait(), args.duration_s or None)
        _LOG.info('signal received, shutting down')
    except TimeoutError:
        _LOG.info('ran for --duration-s %.1f, shutting down', args.duration_s)
    server.close()
    await relay.close()
    await server.wait_closed()
    print(relay.summary(), file=sys.stderr, flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``network`` holds the resulting profile."""
    parser = argparse.ArgumentParser(
        prog='network_relay', description='TCP relay emulating the mobile network between vehicle and cloud')
    parser.add_argument('--listen', type=_address, default='127.0.0.1:0',
                        help='HOST:PORT to accept connections on; port 0 picks a free one')
    parser.add_argument('--target', type=_address, required=True,
                        help='HOST:PORT to forward connections to (the cloud server)')
    parser.add_argument('--profile', help='named profile (default: no impairment)')
    parser.add_argument('--profiles', type=Path, default=None,
                        help='profiles YAML (default: the package\'s config/network_profiles.yaml)')
    parser.add_argument('--rtt-ms', type=float, help='base round-trip time')
    parser.add_argument('--jitter-ms', type=float, help='std of the round-trip variation')
    parser.add_argument('--bandwidth-mbps', type=float, help='uplink bandwidth, 0 = unlimited')
    parser.add_argument('--downlink-mbps', type=float, help='downlink bandwidth, 0 = unlimited')
    parser.add_argument('--stall-probability', type=float, help='per-transfer stall probability')
    parser.add_argument('--stall-ms', type=float, help='stall duration')
    parser.add_argument('--outage', type=_window, action='append', metavar='START_S:DURATION_S',
                        help='outage window after the start (repeatable; replaces the profile\'s)')
    parser.add_argument('--outage-period-s', type=float, help='repeat the outages this often')
    parser.add_argument('--trace', type=Path, help='trace CSV (t_s,rtt_ms,bandwidth_mbps)')
    parser.add_argument('--seed', type=int, default=0, help='seed of jitter and stalls')
    parser.add_argument('--duration-s', type=float, default=0.0,
                        help='stop after this many seconds; 0 = until SIGINT/SIGTERM')
    parser.add_argument('--log-level', default='INFO',
                        choices=('DEBUG', 'INFO', 'WARNING', 'ERROR'))
    args = parser.parse_args(argv)
    try:
        args.network = _network(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.duration_s < 0:
        parser.error(f'--duration-s must be >= 0, got {args.duration_s}')
    return args


def _network(args: argparse.Namespace) -> NetworkProfile:
    """Return the named profile (or an unimpaired one) with the command line's overrides."""
    if args.profile:
        profiles = load_profiles(args.profiles)
        if args.profile not in profiles:
            raise ValueError(f'--profile {args.profile!r} is not one of {", ".join(profiles)}')
        profile = profiles[args.profile]
    else:
        profile = NetworkProfile('custom')
    overrides: dict[str, object] = {
        key: getattr(args, key) for key in OVERRIDES if getattr(args, key) is not None}
    if args.outage:
        overrides['outages'] = tuple(args.outage)
    if args.trace:
        overrides['trace'] = load_trace(args.trace)
    if overrides and args.profile:
        overrides['name'] = f'{profile.name}+overrides'
    return replace(profile, **overrides)  # type: ignore[arg-type]


def _describe(profile: NetworkProfile) -> str:
    settings = ', '.join(f'{item.name}={getattr(profile, item.name)}' for item in fields(profile)
                         if item.name not in ('name', 'trace'))
    return f'{profile.name}: {settings}, trace rows={len(profile.trace)}'


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(':')
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f'expected HOST:PORT, got {text!r}')
    return host.strip('[]'), int(port)


def _window(text: str) -> tuple[float, float]:
    start, _, duration = text.partition(':')
    try:
        return float(start), float(duration)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected START_S:DURATION_S, got {text!r}') from None


def _format(host: str, port: int) -> str:
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def main(argv: list[str] | None = None) -> int:
    """Run the relay; see the module docstring."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    return asyncio.run(run(args, sys.stdout))


if __name__ == '__main__':
    sys.exit(main())
