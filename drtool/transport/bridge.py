"""A byte stream to a UNIX socket on a remote host, over an SSH exec channel.

paramiko cannot forward UNIX sockets (it opens only direct-tcpip channels), so
drtool runs a tiny relay on the host: the host's python3, given this script
with `-c` and the socket path as argv[1]. The path travels as an argument, never
parsed by a shell or by a tool's address syntax (socat, for one, drops quotes
from `UNIX-CONNECT:` addresses). Locally, one end of a socketpair is pumped to
the channel by two threads; the other end is an ordinary socket that asyncio
code (qemu.qmp's QMPClient) can use.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Protocol

RELAY_SCRIPT = r"""
import os, select, socket, sys, time
path = sys.argv[1]
deadline = time.monotonic() + float(sys.argv[2])
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        break
    except OSError as e:
        s.close()
        if time.monotonic() >= deadline:
            sys.stderr.write("cannot connect to %s: %s\n" % (path, e.strerror or e))
            sys.exit(3)
        time.sleep(0.01)
while True:
    ready = select.select([0, s], [], [])[0]
    if 0 in ready:
        data = os.read(0, 65536)
        if not data:
            break
        s.sendall(data)
    if s in ready:
        data = s.recv(65536)
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
"""


def relay_argv(socket_path: PurePosixPath, wait_seconds: float = 0) -> list[str]:
    """The relay to a monitor; with wait_seconds, it waits that long for the socket to accept (a QEMU starting)."""
    # -I -S: no site module, no environment: about a third less start-up, paid by every QMP session
    return ["python3", "-I", "-S", "-c", RELAY_SCRIPT, str(socket_path), f"{wait_seconds:g}"]


class Stream(Protocol):
    """What the bridge needs of a remote byte stream (a paramiko Channel fits)."""

    def recv(self, nbytes: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...
    def shutdown_write(self) -> None: ...
    def close(self) -> None: ...
    def recv_stderr(self, nbytes: int) -> bytes: ...
    def recv_stderr_ready(self) -> bool: ...


class StreamBridge:
    """Joins a Stream to a local socket: `bridge.local` is what callers use."""

    def __init__(self, stream: Stream, name: str = "bridge") -> None:
        self.stream = stream
        self.local, self._inner = socket.socketpair()
        self._threads = [
            threading.Thread(target=self._to_local, name=f"{name}-in", daemon=True),
            threading.Thread(target=self._to_remote, name=f"{name}-out", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _to_local(self) -> None:
        try:
            while data := self.stream.recv(65536):
                self._inner.sendall(data)
        except OSError:
            pass
        finally:
            _quietly(self._inner.shutdown, socket.SHUT_WR)

    def _to_remote(self) -> None:
        try:
            while data := self._inner.recv(65536):
                self.stream.sendall(data)
        except OSError:
            pass
        finally:
            _quietly(self.stream.shutdown_write)

    def remote_error(self) -> str:
        """What the relay said on stderr (why it could not connect, say)."""
        chunks = []
        try:
            while self.stream.recv_stderr_ready():
                chunks.append(self.stream.recv_stderr(65536))
        except OSError:
            pass
        return b"".join(chunks).decode("utf-8", "replace").strip()

    def close(self, timeout: float = 2.0) -> None:
        _quietly(self.local.close)
        _quietly(self._inner.shutdown, socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout)
        _quietly(self.stream.close)
        _quietly(self._inner.close)


def _quietly(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except OSError:
        pass
