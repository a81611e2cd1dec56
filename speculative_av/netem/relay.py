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

Faults can also be switched at run time through ``--control PATH``, a Unix stream socket taking
one command per line and answering one line (``ok mode=... connections=N ...`` or ``error ...``):

* ``hold``: an outage of unknown length: nothing flows, connections stay open, bytes are held
  and delivered (late) once the mode is ``pass`` again.
* ``blackhole``: packets are dropped and connections kept: bytes in flight or sent meanwhile
  vanish and nobody is told. Once the blackhole ends, every connection that lost bytes is reset
  (RST to both sides), as its stream cannot resume without them; connections that lost nothing
  carry on. New connections are accepted but carry nothing until it ends.
* ``pass``: back to the profile's network.
* ``half-open``: a one-shot event: the server side of every current connection is reset while
  the client side stays open, never answered and never closed by the relay (a peer that lost
  the connection's state, e.g. a rebooted server or a NAT that forgot the mapping); the client
  only notices through its own timeouts or keepalives. New connections are relayed normally.
* ``status``: report without changing anything.

Once listening it prints ``network_relay listening on HOST:PORT -> TARGET profile NAME`` to
stdout, its only output there. On SIGINT or SIGTERM, or after ``--duration-s``, it closes every
connection, writes a summary line to stderr and exits with 0.
"""
from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field, fields, replace
from functools import partial
import logging
from pathlib import Path
import signal
import socket
import struct
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
MODES = ('pass', 'hold', 'blackhole')
OVERRIDES = ('rtt_ms', 'jitter_ms', 'bandwidth_mbps', 'downlink_mbps', 'stall_probability',
             'stall_ms', 'outage_period_s')


@dataclass
class RelayStats:
    """What went through the relay."""

    connections: int = 0
    delivered: dict[str, int] = field(default_factory=lambda: {'up': 0, 'down': 0})
    stalls: int = 0
    dropped_bytes: int = 0  # lost in a blackhole or towards a half-open connection's gone side
    resets: int = 0  # connections reset after a blackhole
    half_open: int = 0  # connections made half-open


@dataclass(eq=False)
class _Connection:
    """One relayed connection's sockets and the faults it went through."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    lost_bytes: int = 0  # dropped in a blackhole: the stream is broken
    half_open: bool = False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with RST (linger 0) rather than FIN: the peer's next read fails."""
    sock = writer.get_extra_info('socket')
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    writer.transport.abort()


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
        self._open: set[_Connection] = set()
        self.mode = 'pass'
        self._mode_changed = asyncio.Event()

    def set_mode(self, mode: str) -> None:
        """Switch to ``mode`` (one of MODES); leaving a blackhole resets what lost bytes."""
        if mode not in MODES:
            raise ValueError(f'mode must be one of {", ".join(MODES)}, got {mode!r}')
        left_blackhole = self.mode == 'blackhole' and mode != 'blackhole'
        self.mode = mode
        self._mode_changed.set()
        self._mode_changed = asyncio.Event()
        if left_blackhole:
            for connection in [c for c in self._open if c.lost_bytes]:
                self.stats.resets += 1
                for writer in (connection.client, connection.server):
                    if writer is not None:
                        _reset(writer)
        _LOG.info('mode %s', mode)

    def half_open(self) -> int:
        """Reset the server side of every open connection, keep the client side; count them."""
        count = 0
        for connection in self._open:
            if connection.server is not None and not connection.half_open:
                connection.half_open = True
                _reset(connection.server)
                count += 1
        self.stats.half_open += count
        _LOG.info('%d connection(s) made half-open', count)
        return count

    def control(self, command: str) -> str:
        """Apply one control command (see the module docstring); return the reply line."""
        if command in MODES:
            self.set_mode(command)
        elif command == 'half-open':
            self.half_open()
        elif command != 'status':
            return f'error unknown command {command!r}; expected {", ".join(MODES)}, ' \
                'half-open or status'
        return (f'ok mode={self.mode} connections={len(self._open)} '
                f'half_open={sum(c.half_open for c in self._open)} '
                f'dropped_bytes={self.stats.dropped_bytes} resets={self.stats.resets}')

    async def _until_flowing(self) -> None:
        """Wait while the mode holds traffic (``hold`` or ``blackhole``)."""
        while self.mode != 'pass':
            await self._mode_changed.wait()

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
        connection = _Connection(client_writer)
        self._open.add(connection)
        try:
            await self._forward(connection, client_reader, peer)
        except asyncio.CancelledError:
            # close() is shutting the relay down. End quietly: on Python 3.11, asyncio's
            # start_server callback logs a cancelled handler task as an error.
            _LOG.debug('connection from %s dropped at shutdown', peer)
        finally:
            self._open.discard(connection)
            client_writer.close()
            if connection.server is not None:
                connection.server.close()
        _LOG.debug('connection from %s closed', peer)

    async def _forward(self, connection: _Connection, client_reader: asyncio.StreamReader,
                       peer: object) -> None:
        """Connect to the target (once traffic flows) and relay both directions."""
        await self._until_flowing()  # accepted in an outage or blackhole: nothing flows yet
        try:
            server_reader, connection.server = await asyncio.open_connection(*self.target)
        except OSError as exc:
            _LOG.warning('connection from %s: cannot reach %s:%d: %s', peer, *self.target, exc)
            return
        _LOG.debug('connection from %s relayed', peer)
        lines = {direction: DelayLine(self._links[direction]) for direction in DIRECTIONS}
        try:
            async with asyncio.TaskGroup() as group:
                for direction, reader, writer in zip(
                        DIRECTIONS, (client_reader, server_reader),
                        (connection.server, connection.client)):
                    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)
                    group.create_task(self._receive(reader, queue, lines[direction]))
                    group.create_task(self._deliver(queue, writer, direction, connection))
        except* OSError as errors:  # a reset or broken pipe on either side ends both
            _LOG.debug('connection from %s: %s', peer, errors.exceptions[0])
        finally:
            self.stats.stalls += sum(line.stalls for line in lines.values())

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
                f'outage_s={self.model.down_time_s(0.0, self.now_s()):.1f} '
                f'dropped_bytes={self.stats.dropped_bytes} resets={self.stats.resets} '
                f'half_open={self.stats.half_open}')

    async def _receive(self, reader: asyncio.StreamReader,
                       queue: asyncio.Queue[tuple[float, bytes]], line: DelayLine) -> None:
        """Read one direction of a connection, queueing each chunk with its release time."""
        while chunk := await reader.read(READ_BYTES):
            await queue.put((line.schedule(self.now_s(), len(chunk)), chunk))
        await queue.put((0.0, b''))  # end of stream, once everything before it is delivered

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter, direction: Direction,
                       connection: _Connection) -> None:
        """
        Write each queued chunk at its release time; pass the end of stream on.

        Held while the mode is ``hold``; dropped in a ``blackhole`` and once the connection is
        half-open (whose client side never hears anything again, not even the end of stream).
        """
        while True:
            release_s, chunk = await queue.get()
            wait_s = release_s - self.now_s()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            while self.mode == 'hold' and not connection.half_open:
                await self._mode_changed.wait()
            if connection.half_open:
                if not chunk:
                    return
                self.stats.dropped_bytes += len(chunk)
                continue
            if self.mode == 'blackhole' and chunk:
                connection.lost_bytes += len(chunk)
                self.stats.dropped_bytes += len(chunk)
                continue
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
    control = None
    if args.control:
        try:
            control = await asyncio.start_unix_server(partial(_control_session, relay),
                                                      path=str(args.control))
        except OSError as exc:
            _LOG.error('could not open the control socket %s: %s', args.control, exc)
            server.close()
            return 1
    print(f'network_relay listening on {_format(host, port)} -> {_format(*args.target)} '
          f'profile {args.network.name}', file=announce, flush=True)
    _LOG.info('emulating %s', _describe(args.network))
    try:
        await asyncio.wait_for(stop.wait(), args.duration_s or None)
        _LOG.info('signal received, shutting down')
    except TimeoutError:
        _LOG.info('ran for --duration-s %.1f, shutting down', args.duration_s)
    server.close()
    if control is not None:
        control.close()
        args.control.unlink(missing_ok=True)
    await relay.close()
    await server.wait_closed()
    print(relay.summary(), file=sys.stderr, flush=True)
    return 0


async def _control_session(relay: Relay, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    """Answer each command line of one control connection with one line."""
    try:
        while line := await reader.readline():
            writer.write((relay.control(line.decode(errors='replace').strip()) + '\n').encode())
            await writer.drain()
    except OSError as exc:
        _LOG.debug('control connection: %s', exc)
    finally:
        writer.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``network`` holds the resulting profile."""
    parser = argparse.ArgumentParser(
        prog='network_relay',
        description='TCP relay emulating the mobile network between vehicle and cloud')
    parser.add_argument('--listen', type=_address, default='127.0.0.1:0',
                        help='HOST:PORT to accept connections on; port 0 picks a free one')
    parser.add_argument('--target', type=_address, required=True,
                        help='HOST:PORT to forward connections to (the cloud server)')
    parser.add_argument('--profile', help='named profile (default: no impairment)')
    parser.add_argument('--profiles', type=Path, default=None,
                        help="profiles YAML (default: the package's "
                             'config/network_profiles.yaml)')
    parser.add_argument('--rtt-ms', type=float, help='base round-trip time')
    parser.add_argument('--jitter-ms', type=float, help='std of the round-trip variation')
    parser.add_argument('--bandwidth-mbps', type=float, help='uplink bandwidth, 0 = unlimited')
    parser.add_argument('--downlink-mbps', type=float, help='downlink bandwidth, 0 = unlimited')
    parser.add_argument('--stall-probability', type=float, help='per-transfer stall probability')
    parser.add_argument('--stall-ms', type=float, help='stall duration')
    parser.add_argument('--outage', type=_window, action='append', metavar='START_S:DURATION_S',
                        help="outage window after the start (repeatable; replaces the profile's)")
    parser.add_argument('--outage-period-s', type=float, help='repeat the outages this often')
    parser.add_argument('--trace', type=Path, help='trace CSV (t_s,rtt_ms,bandwidth_mbps)')
    parser.add_argument('--seed', type=int, default=0, help='seed of jitter and stalls')
    parser.add_argument('--control', type=Path, metavar='PATH',
                        help='Unix socket taking run-time fault commands: pass, hold, '
                             'blackhole, half-open, status (one per line)')
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
