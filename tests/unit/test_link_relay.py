"""drtool's link relay as the source host runs it (python3 -c SOURCE), against small TCP servers on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drtool.mechanics.link import _RELAY_SOURCE

STALL = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A TCP server on loopback whose connections `handler` serves, each in a thread."""

    def __init__(self, port: int, handler: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.handler = handler
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handler, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def greet_then_echo(conn: socket.socket) -> None:
    """Like an NBD server: speaks first, then answers every request."""
    conn.sendall(b"HELLO")
    while data := conn.recv(65536):
        conn.sendall(data)


def greet_then_stick(conn: socket.socket) -> None:
    """Alive but stuck after the greeting: the kernel still takes every byte, nothing comes back."""
    conn.sendall(b"HELLO")
    time.sleep(60)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path, port = tmp_path / "link.sock", free_port()
    proc = subprocess.Popen([sys.executable, "-c", _RELAY_SOURCE, str(path), "127.0.0.1", str(port), "10", "1",
                             str(STALL), "30"])
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the relay did not start"
        time.sleep(0.02)
    yield path, port
    proc.terminate()
    proc.wait(10)


def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(10)
    client.connect(str(path))
    return client


def test_the_relay_carries_data_both_ways_and_keeps_an_idle_connection(relay):  # noqa: ANN001
    path, port = relay
    server = Server(port, greet_then_echo)
    try:
        client = connect(path)
        assert client.recv(5) == b"HELLO"
        time.sleep(3 * STALL)  # idle, nothing awaited: no reason to cut
        client.sendall(b"x" * 300_000)
        got = b""
        while len(got) < 300_000:
            got += client.recv(65536)
        assert got == b"x" * 300_000
        assert path.stat().st_mode & 0o077 == 0  # the owner (root, QEMU) only
    finally:
        server.close()


def test_a_stuck_target_is_cut_after_the_stall_timeout(relay):  # noqa: ANN001
    path, port = relay
    server = Server(port, greet_then_stick)
    try:
        client = connect(path)
        assert client.recv(5) == b"HELLO"
        client.sendall(b"request")
        sent = time.monotonic()
        assert client.recv(1) == b""  # EOF: QEMU's NBD client fails its requests instead of waiting for ever
        assert STALL <= time.monotonic() - sent < STALL + 2
    finally:
        server.close()


def test_a_connection_waits_for_the_target_to_come_back(relay):  # noqa: ANN001
    """A reconnect during an outage is held and completes as soon as the target listens again."""
    path, port = relay
    client = connect(path)
    time.sleep(1.5)  # the target is down: the relay retries every 0.5 s
    server = Server(port, greet_then_echo)
    back = time.monotonic()
    try:
        assert client.recv(5) == b"HELLO"
        assert time.monotonic() - back < 1.5
    finally:
        server.close()
