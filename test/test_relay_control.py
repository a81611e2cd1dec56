"""
``network_relay --control``: faults switched at run time (hold, blackhole, half-open).

Each test runs the relay process on 127.0.0.1 in front of a TCP echo server in this process
that counts the connections it saw end, and drives it through its control socket.
"""
from __future__ import annotations

from pathlib import Path
import select
import socket
import socketserver
import threading
from typing import Iterator

from fault_rig import relay, RelayControl
import pytest
from ros_harness import wait_until

PAYLOAD = b'p' * 1000


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass
        finally:
            self.server.ended += 1  # type: ignore[attr-defined]


@pytest.fixture
def echo_server() -> Iterator[socketserver.ThreadingTCPServer]:
    """Echo every byte back on 127.0.0.1; ``ended`` counts connections that closed."""
    server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), _Echo)
    server.daemon_threads = True
    server.ended = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def controlled(echo_server: socketserver.ThreadingTCPServer,
               tmp_path: Path) -> Iterator[tuple[tuple[str, int], RelayControl]]:
    """Put a relay in front of the echo server; yield its address and its control."""
    target = '127.0.0.1:%d' % echo_server.server_address[1]
    with relay(target, tmp_path / 'relay.sock') as (process, address, control):
        host, _, port = address.rpartition(':')
        yield (host, int(port)), control
    assert process.returncode == 0
    assert not (tmp_path / 'relay.sock').exists(), 'the control socket was left behind'


def _connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _echoed(sock: socket.socket, payload: bytes = PAYLOAD) -> bool:
    sock.sendall(payload)
    data = b''
    while len(data) < len(payload):
        chunk = sock.recv(len(payload) - len(data))
        if not chunk:
            return False
        data += chunk
    return data == payload


def _silent_for(sock: socket.socket, seconds: float) -> bool:
    """Return whether nothing (no byte, no end of stream, no reset) arrived for ``seconds``."""
    readable, _, _ = select.select([sock], [], [], seconds)
    return not readable


def test_hold_keeps_bytes_until_it_ends_on_the_same_connection(controlled):
    address, control = controlled
    with _connect(address) as sock:
        assert _echoed(sock)
        assert control.send('hold')['mode'] == 'hold'
        sock.sendall(PAYLOAD)
        assert _silent_for(sock, 0.5)
        with _connect(address) as during:  # accepted, but nothing flows yet
            during.sendall(PAYLOAD)
            assert _silent_for(during, 0.3)
            control.send('pass')
            assert during.recv(len(PAYLOAD), socket.MSG_WAITALL) == PAYLOAD
        assert sock.recv(len(PAYLOAD), socket.MSG_WAITALL) == PAYLOAD
        assert _echoed(sock)
    assert control.send('status')['dropped_bytes'] == '0'


def test_blackhole_drops_bytes_keeps_connections_and_resets_the_broken_ones(controlled):
    address, control = controlled
    with _connect(address) as broken, _connect(address) as idle:
        assert _echoed(broken) and _echoed(idle)
        control.send('blackhole')
        broken.sendall(PAYLOAD)
        assert _silent_for(broken, 0.5), 'a blackhole neither answers nor closes'
        with _connect(address) as new:
            new.sendall(PAYLOAD)
            assert _silent_for(new, 0.3)
            status = control.send('pass')
            assert int(status['dropped_bytes']) == len(PAYLOAD) and status['resets'] == '1'
            # The connection that lost bytes is reset; the idle one and the new one carry on.
            with pytest.raises(ConnectionResetError):
                broken.recv(1)
            assert new.recv(len(PAYLOAD), socket.MSG_WAITALL) == PAYLOAD
        assert _echoed(idle)


def test_half_open_resets_the_server_side_and_leaves_the_client_unanswered(controlled,
                                                                           echo_server):
    address, control = controlled
    with _connect(address) as sock:
        assert _echoed(sock)
        assert control.send('half-open')['half_open'] == '1'
        wait_until(lambda: echo_server.ended == 1, 5, 'the server side to end')
        sock.sendall(PAYLOAD)  # the client still believes in the connection
        assert _silent_for(sock, 0.5), 'a half-open connection is neither answered nor closed'
        with _connect(address) as new:
            assert _echoed(new)
        status = control.send('status')
        assert status['half_open'] == '1' and int(status['dropped_bytes']) == len(PAYLOAD)


def test_unknown_control_command_is_refused_and_changes_nothing(controlled):
    address, control = controlled
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(control.path))
        sock.sendall(b'explode\nstatus\n')
        lines = sock.makefile()
        replies = lines.readline(), lines.readline()
    assert replies[0].startswith("error unknown command 'explode'")
    assert replies[1].startswith('ok mode=pass ')
    with _connect(address) as sock:
        assert _echoed(sock)
