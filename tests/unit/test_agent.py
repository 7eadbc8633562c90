"""transport/agent.py: the host agent's script, run here by python3 as sshd would run it on a host."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from drtool.domain import Host
from drtool.errors import HostUnreachable, RemoteCommandError
from drtool.mechanics.remote import read_file, write_file
from drtool.transport.agent import AgentLock, AgentShell, AgentStream, HostAgent
from drtool.transport.bridge import StreamBridge
from drtool.transport.connections import AgentReach


class LocalChannel:
    """What HostAgent needs of a paramiko channel, over a local process's pipes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def recv(self, nbytes: int) -> bytes:
        assert self.proc.stdout is not None
        return os.read(self.proc.stdout.fileno(), nbytes)

    def sendall(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def shutdown_write(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def close(self) -> None:
        self.proc.wait(5)

    def recv_stderr_ready(self) -> bool:
        return False

    def recv_stderr(self, nbytes: int) -> bytes:
        return b""


class LocalConn:
    """An SshConnection stand-in: open_stream runs argv here."""

    def __init__(self) -> None:
        self.host = Host("here", "127.0.0.1", command_timeout=30)
        self.host_key = self.host_key_line = None
        self.endpoint = None
        self.held: list[Any] = []

    def open_stream(self, argv: list[str]) -> LocalChannel:
        return LocalChannel(argv)

    def hold_lock(self, chan: Any, held: bool) -> None:
        (self.held.append if held else self.held.remove)(chan)


@pytest.fixture
def agent() -> Iterator[HostAgent]:
    a = HostAgent(LocalConn())  # type: ignore[arg-type]  # the stand-in has what HostAgent uses
    yield a
    a.close()


def test_commands_run_as_argv_with_stdin_and_their_exit_status(agent: HostAgent) -> None:
    shell = AgentShell(agent)
    assert shell.run(["sh", "-c", "cat; echo err >&2; exit 3", "sh"], stdin=b"in", check=False).stdout == b"in"
    result = shell.run(["sh", "-c", "echo err >&2; exit 3"], check=False)
    assert (result.exit_status, result.err) == (3, "err\n")
    with pytest.raises(RemoteCommandError, match="here: sh exited 3: err"):
        shell.run(["sh", "-c", "echo err >&2; exit 3"])
    assert shell.run(["echo", "$HOME; a b"]).out == "$HOME; a b\n"  # an argument, never a shell's input


def test_many_commands_at_once_each_get_their_own_answer(agent: HostAgent) -> None:
    answers: dict[int, str] = {}

    def one(i: int) -> None:
        answers[i] = agent.run(["sh", "-c", 'sleep 0.2; echo "$1"', "sh", str(i)]).out

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {i: f"{i}\n" for i in range(20)}
    assert time.monotonic() - started < 3.0  # at once, not one after another (20 x 0.2 s)


def test_a_command_past_its_timeout_is_killed_and_said(agent: HostAgent) -> None:
    with pytest.raises(RemoteCommandError, match=r"sleep did not finish within 0\.3 s"):
        agent.run(["sleep", "5"], timeout=0.3)
    assert agent.run(["true"]).ok  # the agent goes on


def test_a_stream_carries_bytes_both_ways_and_a_missing_socket_is_said(agent: HostAgent, tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def echo() -> None:
        conn, _ = server.accept()
        while data := conn.recv(1024):
            conn.sendall(data.upper())
        conn.close()

    threading.Thread(target=echo, daemon=True).start()
    bridge = StreamBridge(AgentStream(agent, PurePosixPath(path), 5), name="echo")
    bridge.local.sendall(b"hello")
    assert bridge.local.recv(1024) == b"HELLO"
    bridge.close()
    with pytest.raises(OSError, match=r"cannot connect to .*nothing\.sock"):
        AgentStream(agent, PurePosixPath(tmp_path / "nothing.sock"), 5)


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")
def test_a_lock_excludes_flock_1_and_goes_with_the_agent(agent: HostAgent, tmp_path: Path) -> None:
    path = PurePosixPath(tmp_path / "vm.lock")
    lock = AgentLock(agent, path, wait=0)
    assert lock.acquire()
    assert subprocess.run(["flock", "--nonblock", str(path), "true"]).returncode != 0  # the way locks.py takes it
    assert not AgentLock(agent, path, wait=0.3).acquire()  # busy, after waiting
    lock.release()
    agent.run(["true"])  # the unlock is ordered before this answer
    assert subprocess.run(["flock", "--nonblock", str(path), "true"]).returncode == 0
    assert AgentLock(agent, path, wait=0).acquire()
    agent.close()  # the agent exits: its locks go with it
    assert subprocess.run(["flock", "--wait", "5", str(path), "true"]).returncode == 0


def test_a_lost_agent_fails_its_callers_with_what_it_said() -> None:
    conn = LocalConn()
    conn.open_stream = lambda argv: LocalChannel(["sh", "-c", "exit 1"])  # type: ignore[method-assign]
    lost = HostAgent(conn)  # type: ignore[arg-type]
    with pytest.raises(HostUnreachable, match="lost drtool's agent on the host during true"):
        lost.run(["true"])
    lost.close()


def test_files_are_read_and_replaced_as_write_file_does(agent: HostAgent, tmp_path: Path) -> None:
    shell = AgentShell(agent)
    path = PurePosixPath(tmp_path / "manifest.json")
    assert read_file(shell, path) is None
    write_file(shell, path, b"one", mode=0o640)
    write_file(shell, path, b"two", keep_previous=True)
    assert (read_file(shell, path), Path(f"{path}.prev").read_bytes()) == (b"two", b"one")
    assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "manifest.json.prev"]  # no temp left
    with pytest.raises(RemoteCommandError, match=r"cannot write .*/nowhere/m\.json: No such file"):
        write_file(shell, PurePosixPath(tmp_path / "nowhere" / "m.json"), b"x")
    Path(path).chmod(0o000)
    if os.geteuid() != 0:  # root reads it all the same
        with pytest.raises(RemoteCommandError, match="cannot read"):
            read_file(shell, path)


def test_a_command_is_done_when_it_exits_though_a_daemon_it_started_keeps_its_output(agent: HostAgent) -> None:
    started = time.monotonic()
    result = agent.run(["sh", "-c", "sleep 5 & echo started"], timeout=4)
    assert (result.out, time.monotonic() - started < 3) == ("started\n", True)


def test_a_host_the_agent_cannot_reach_fails_every_caller_of_the_run_at_once() -> None:
    tries: list[str] = []

    class DownConn(LocalConn):
        def open_stream(self, argv: list[str]) -> LocalChannel:
            tries.append(argv[0])
            raise HostUnreachable("cannot reach here (127.0.0.1:22): timed out")

    class Pool:
        def get(self, host_name: str) -> DownConn:
            return DownConn()

    class Conns:
        pool = Pool()

    reach = AgentReach(Conns())  # type: ignore[arg-type]  # what AgentReach uses of Connections
    for _ in range(3):
        with pytest.raises(HostUnreachable, match="cannot reach here"):
            reach.shell("here")
    assert tries == ["python3"]  # one connection attempt (and its timeout) for the run, not one per VM
