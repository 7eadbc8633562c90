"""The replication link's relay, run on the source host as `python3 -c SOURCE ARGS...`.

It listens on a UNIX socket (owner only) for the source QEMU's NBD client and
relays each connection over TCP to the DR target. It stands between QEMU and
every way a link can fail without failing QEMU's socket:

- a dead path (cut cable, dead site): the TCP socket has TCP_USER_TIMEOUT and
  keepalives, so it fails in LINK_TIMEOUT seconds instead of ~15 minutes;
- a target that is alive but stuck (its storage stalls, its process is
  stopped): the kernel still acknowledges every byte, so no TCP timeout ever
  fires. NBD answers every request, so bytes sent towards the target with no
  byte back for STALL seconds mean it is stuck: the relay closes both sides.
  QEMU's NBD client then fails its requests after reconnect-delay, the mirror
  pauses (on-target-error=stop) and tracks the guest's writes: "broken", for
  drtool resync, and a sync-mode guest's writes go on;
- a short outage: a new connection from QEMU is held while the relay retries
  the target every RETRY_INTERVAL seconds, so QEMU's client reconnects as soon
  as the path is back instead of after its own back-off (up to 16 s).

TLS stays end to end, QEMU to the DR target: the relay sees only ciphertext.
Only the standard library: the source host's python3 runs it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time

BUFFER = 1 << 20
RETRY_INTERVAL = 0.5
WATCH_INTERVAL = 0.5


def tcp_options(sock: socket.socket, link_timeout: float) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(link_timeout * 1000))


def client_gone(client: socket.socket, wait: float) -> bool:
    """Whether the client hung up (waiting up to `wait` seconds to see it)."""
    readable, _, _ = select.select([client], [], [], wait)
    if not readable:
        return False
    try:
        return client.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def connect_target(client: socket.socket, host: str, port: int, connect_timeout: float, retry_for: float,
                   link_timeout: float) -> socket.socket | None:
    deadline = time.monotonic() + retry_for
    while True:
        try:
            target = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError:
            if time.monotonic() > deadline or client_gone(client, RETRY_INTERVAL):
                return None
            continue
        target.settimeout(None)
        tcp_options(target, link_timeout)
        return target


class Connection:
    """One relayed connection and its watchdog."""

    def __init__(self, client: socket.socket, target: socket.socket, stall: float) -> None:
        self.client, self.target, self.stall = client, target, stall
        # since when bytes went to the target with none back (the NBD greeting counts as awaited)
        self.waiting_since: float | None = time.monotonic()
        self.closed = threading.Event()

    def pump(self, src: socket.socket, dst: socket.socket, towards_target: bool) -> None:
        try:
            while True:
                data = src.recv(BUFFER)
                if not data:
                    break
                if towards_target:
                    if self.waiting_since is None:
                        self.waiting_since = time.monotonic()
                else:
                    self.waiting_since = None
                dst.sendall(data)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.target):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # also wakes the other pump, blocked in recv or sendall
            except OSError:
                pass

    def run(self) -> None:
        for args in ((self.client, self.target, True), (self.target, self.client, False)):
            threading.Thread(target=self.pump, args=args, daemon=True).start()
        while not self.closed.wait(WATCH_INTERVAL):
            since = self.waiting_since
            if since is not None and time.monotonic() - since > self.stall:
                self.close()
        self.client.close()
        self.target.close()


def serve(client: socket.socket, host: str, port: int, connect_timeout: float, retry_for: float,
          link_timeout: float, stall: float) -> None:
    target = connect_target(client, host, port, connect_timeout, retry_for, link_timeout)
    if target is None:
        client.close()
        return
    Connection(client, target, stall).run()


def main(argv: list[str]) -> None:
    path, host, port, link_timeout, connect_timeout, stall, retry_for = argv
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    os.umask(0o077)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket file appears at bind(), but connecting before listen() is refused: bind a
    # temporary name and rename it once listening, so whoever sees the path can connect.
    pending = os.path.join(os.path.dirname(path), f".{os.getpid()}")  # no longer than path: sun_path is short
    listener.bind(pending)
    listener.listen(64)
    os.rename(pending, path)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, daemon=True, args=(
            client, host.strip("[]"), int(port), float(connect_timeout), float(retry_for), float(link_timeout),
            float(stall))).start()


if __name__ == "__main__":
    main(sys.argv[1:])
