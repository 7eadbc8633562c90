"""transport/batch.py's scripts, run by this machine's python3 as a host's would run them."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from drtool.errors import QmpError, VmUnreachable
from drtool.transport.batch import PidCheck, query_monitors, read_files
from tests.unit.local_shell import LocalShell, fake_process


def _serve_qmp(path: Path, name: str, greet: bool = True) -> threading.Thread:
    """A monitor that greets, accepts qmp_capabilities, answers query-status, refuses the rest."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            if not greet:
                f.readline()  # hold the connection silently until the client gives up
                return
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            while line := f.readline():
                command = json.loads(line)["execute"]
                f.write(b'{"event": "NOISE", "data": {}}\n')  # events between replies are skipped
                if command == "qmp_capabilities":
                    reply: dict[str, object] = {"return": {}}
                elif command == "query-status":
                    reply = {"return": {"status": name}}
                else:
                    reply = {"error": {"class": "CommandNotFound", "desc": f"no {command} here"}}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def monitors(tmp_path: Path) -> Iterator[dict[PurePosixPath, str]]:
    sockets = {}
    for i in range(5):
        path = tmp_path / f"vm{i}.qmp"
        _serve_qmp(path, f"state{i}", greet=i != 4)
        sockets[PurePosixPath(path)] = f"vm{i}"
    sockets[PurePosixPath(tmp_path / "gone.qmp")] = "gone"
    yield sockets


def test_many_monitors_answer_in_one_remote_command(monitors: dict[PurePosixPath, str]) -> None:
    shell = LocalShell()
    ran = []
    original = shell.run

    def counting(argv: list[str], **kw: object) -> object:
        ran.append(argv)
        return original(argv, **kw)  # type: ignore[arg-type]  # the same keywords, passed through

    shell.run = counting  # type: ignore[method-assign]  # count the remote commands
    answers = query_monitors(shell, "kvm1", monitors, ["query-status", "query-block"], timeout=2)
    assert len(ran) == 1 and ran[0][0] == "python3"
    paths = list(monitors)
    for i in range(4):
        assert answers[paths[i]].result("query-status") == {"status": f"state{i}"}
        with pytest.raises(QmpError, match="no query-block here"):
            answers[paths[i]].result("query-block")
    # the silent monitor (another client holds it) and the missing one say which VM and what happened
    with pytest.raises(VmUnreachable, match=r"vm4 on kvm1: the QMP monitor did not greet within 2 s"):
        answers[paths[4]].result("query-status")
    with pytest.raises(VmUnreachable, match=r"gone on kvm1: cannot reach the QMP monitor: No such file"):
        answers[paths[5]].result("query-status")


def test_files_and_pids_in_one_remote_command(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b'{"x": 1}')
    pidfile = tmp_path / "target.pid"
    proc = fake_process("qemu-storage-daemon", "--pidfile", str(pidfile))
    try:
        pidfile.write_text(f"{proc.pid}\n")
        stale = tmp_path / "stale.pid"
        stale.write_text(f"{proc.pid}\n")  # the same pid, but not this pid file's process
        reads = read_files(LocalShell(), "kvm2", [PurePosixPath(tmp_path / "a.json"), PurePosixPath(tmp_path / "b")],
                           [PidCheck(PurePosixPath(pidfile), "qemu-storage", str(pidfile)),
                            PidCheck(PurePosixPath(stale), "qemu-storage", str(stale)),
                            PidCheck(PurePosixPath(tmp_path / "none.pid"), "qemu-storage", "x")])
    finally:
        proc.kill()
        proc.wait()
    assert reads.files[PurePosixPath(tmp_path / "a.json")] == b'{"x": 1}'
    assert reads.files[PurePosixPath(tmp_path / "b")] is None
    assert reads.pids == (proc.pid, None, None)


def test_nbd_ports_are_not_handed_out_twice_nor_taken_from_a_stopped_target() -> None:
    from drtool.mechanics.dr_target import FIRST_NBD_PORT, free_nbd_port
    from tests.unit.fakes import FakeShell

    listening = f"LISTEN 0 4096 0.0.0.0:{FIRST_NBD_PORT} 0.0.0.0:*\n"
    kept = f'  "nbd_port": {FIRST_NBD_PORT + 1},\n'  # a VM of the index whose target is stopped
    shell = FakeShell(answers={"sh": (0, listening + kept, "")})
    host = "dr-port-test"  # a host name of its own: the reservations last for the process
    ports = [free_nbd_port(shell, host, PurePosixPath("/var/lib/drtool/index")) for _ in range(3)]
    assert ports == [FIRST_NBD_PORT + 2, FIRST_NBD_PORT + 3, FIRST_NBD_PORT + 4]
    assert shell.ran[0][-1] == "/var/lib/drtool/index"  # the index travels as an argument
