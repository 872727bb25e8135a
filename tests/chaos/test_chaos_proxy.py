"""The fault proxy itself, with plain sockets: pass, black hole, resets, latency, and
which process opened a connection (this test process plays node 1)."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from proxy import Mode, ProxyNet


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def net() -> Iterator[tuple[ProxyNet, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxies = ProxyNet(lambda: {os.getpid(): 1}, lifetime_s=60)
    port = proxies.add_node(2, server.server_address[1])
    yield proxies, port
    proxies.close()
    server.shutdown()
    server.server_close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


def _echo(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    return sock.recv(4096)


def test_pass_and_identify(net: tuple[ProxyNet, int]) -> None:
    proxies, port = net
    with _connect(port) as sock:
        assert _echo(sock) == b"ping"
    assert proxies.accepted == 1 and proxies.unidentified == 0


def test_hold_stalls_then_heal_delivers(net: tuple[ProxyNet, int]) -> None:
    proxies, port = net
    with _connect(port) as sock:
        assert _echo(sock) == b"ping"
        proxies.block(1, 2)
        sock.sendall(b"held")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        proxies.block(2, 1)  # the other direction's link does not concern this connection
        proxies.unblock(2, 1)
        proxies.heal()
        sock.settimeout(5)
        assert sock.recv(4096) == b"held"


def test_reset_breaks_live_and_new_connections(net: tuple[ProxyNet, int]) -> None:
    proxies, port = net
    with _connect(port) as sock:
        assert _echo(sock) == b"ping"
        proxies.block(1, 2, Mode.RESET)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            sock.sendall(b"x")
            if not sock.recv(4096):
                raise ConnectionResetError
    # A new connection is reset too: while connecting, or at its first use.
    with pytest.raises((ConnectionResetError, BrokenPipeError)), _connect(port) as sock:
        sock.sendall(b"x")
        if not sock.recv(4096):
            raise ConnectionResetError
    proxies.heal()
    with _connect(port) as sock:
        assert _echo(sock) == b"ping"


def test_delay_adds_latency_one_way(net: tuple[ProxyNet, int]) -> None:
    proxies, port = net
    proxies.set_delay(1, 2, 0.3)
    with _connect(port) as sock:
        started = time.monotonic()
        assert _echo(sock) == b"ping"
        assert time.monotonic() - started >= 0.3  # at least the delay (no upper bound: load)
    assert "1->2:pass+300ms" in proxies.describe()
