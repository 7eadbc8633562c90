"""The link relay's Connection with real sockets: a dead client's unsent writes never reach the target."""

from __future__ import annotations

import socket
import threading
import time

from drtool.mechanics.link_relay import Connection


def _relayed(stall: float = 60.0) -> tuple[socket.socket, socket.socket, threading.Thread]:
    """(the client's end, the target's accepted socket, the relay's thread); the target reads nothing yet."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the relay's sends block
    relay_to_target = socket.create_connection(listener.getsockname())
    target, _ = listener.accept()
    listener.close()
    client, relay_to_client = socket.socketpair()
    relay = threading.Thread(target=Connection(relay_to_client, relay_to_target, stall).run, daemon=True)
    relay.start()
    return client, target, relay


def test_a_client_that_dies_with_writes_in_flight_resets_the_target_connection() -> None:
    client, target, relay = _relayed()
    client.setblocking(False)
    sent = 0
    chunk = b"w" * 65536
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the client's socket, the relay and the TCP buffers are full
        try:
            sent += client.send(chunk)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                sent += client.send(chunk)
            except BlockingIOError:
                break
    client.close()  # the source QEMU dies, its writes still in the relay and its buffers
    died = time.monotonic()
    relay.join(5)
    assert not relay.is_alive(), "the relay kept the connection of a dead client"
    assert time.monotonic() - died < 2
    received, reset = 0, False
    target.settimeout(5)
    try:
        while data := target.recv(1 << 20):
            received += len(data)
    except ConnectionResetError:
        reset = True
    assert reset, "the target saw an orderly end: it would take the dead client's last writes for whole"
    assert received < sent, (received, sent)


def test_a_target_that_goes_away_ends_the_client_side() -> None:
    client, target, relay = _relayed()
    client.sendall(b"hello")
    assert target.recv(5) == b"hello"
    target.close()
    client.settimeout(5)
    assert client.recv(10) == b""  # the client sees EOF: QEMU's NBD client reconnects
    relay.join(5)
    assert not relay.is_alive()
