"""transport/bridge.py's QMP relay, run as drtool runs it on a host (python3 with its argv), on a real socket."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path, PurePosixPath

from drtool.transport.bridge import relay_argv


def serve_once(path: Path, after: float, greeting: bytes) -> threading.Thread:
    """A UNIX socket that appears after `after` s, greets its one client and echoes a line back."""

    def run() -> None:
        time.sleep(after)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            server.listen(1)
            conn, _ = server.accept()
            with conn:
                conn.sendall(greeting)
                conn.sendall(conn.recv(64))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_waiting_relay_reaches_a_monitor_that_appears_after_it_started(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    server = serve_once(path, 0.4, b"hello\n")
    relay = subprocess.Popen(relay_argv(PurePosixPath(path), wait_seconds=10), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert relay.stdin is not None and relay.stdout is not None
    try:
        assert relay.stdout.readline() == b"hello\n"  # the greeting, once the socket is there
        relay.stdin.write(b"ping\n")
        relay.stdin.flush()
        assert relay.stdout.readline() == b"ping\n"
        relay.stdin.close()
        assert relay.wait(10) == 0
    finally:
        relay.kill()
        relay.wait()
    server.join(5)


def test_a_relay_without_wait_says_at_once_that_the_monitor_is_not_there(tmp_path: Path) -> None:
    started = time.monotonic()
    relay = subprocess.run(relay_argv(PurePosixPath(tmp_path / "absent.sock")), capture_output=True, timeout=30,
                           check=False)
    assert relay.returncode == 3 and b"cannot connect to" in relay.stderr
    assert time.monotonic() - started < 5


def test_a_waiting_relay_gives_up_after_its_wait(tmp_path: Path) -> None:
    started = time.monotonic()
    relay = subprocess.run(relay_argv(PurePosixPath(tmp_path / "absent.sock"), wait_seconds=0.3),
                           capture_output=True, timeout=30, check=False)
    assert relay.returncode == 3 and b"No such file" in relay.stderr
    assert 0.3 <= time.monotonic() - started < 5
