"""QMP through one long-lived virsh shell (transport/virsh_shell.py), against a fake of virsh reading a pipe.

The fake answers as virsh 9.0 does on a pipe (seen on the lab): it prompts
"virsh # ", echoes each line it reads, prints a command's output and writes
errors to stderr.
"""

from __future__ import annotations

import json
import shlex

import pytest

from drtool.errors import QmpError, VmUnreachable
from drtool.transport.virsh_shell import VirshShellQmp

from .test_virsh_qmp import FakeVirsh


class FakeVirshShell:
    """A channel to `virsh -q -c URI` reading commands from its stdin."""

    def __init__(self, virsh: FakeVirsh) -> None:
        self.virsh = virsh
        self.lines: list[str] = []
        self.out = b"virsh # "
        self.err = b""
        self.closed = False

    def sendall(self, data: bytes) -> None:
        for line in data.decode().splitlines():
            self.lines.append(line)
            words = shlex.split(line)
            self.out += line.encode() + b"\n"  # the echo of what it read
            if words[0] == "echo":
                self.out += " ".join(words[1:]).encode()
            else:
                result = self.virsh.run(["virsh", "-q", "-c", "qemu:///system", *words])
                self.out += result.out.encode()
                self.err += result.err.encode()
            self.out += b"virsh # "

    def recv(self, size: int) -> bytes:
        data, self.out = self.out[:size], self.out[size:]
        return data

    def recv_stderr_ready(self) -> bool:
        return bool(self.err)

    def recv_stderr(self, size: int) -> bytes:
        data, self.err = self.err[:size], self.err[size:]
        return data

    def shutdown_write(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def shell_session(virsh: FakeVirsh) -> tuple[VirshShellQmp, list[FakeVirshShell]]:
    opened: list[FakeVirshShell] = []

    def open_stream(argv: list[str]) -> FakeVirshShell:
        assert argv == ["virsh", "-q", "-c", "qemu:///system"]
        opened.append(FakeVirshShell(virsh))
        return opened[-1]

    return VirshShellQmp("web", virsh, "web", open_stream=open_stream), opened  # type: ignore[arg-type]


def test_commands_go_through_one_shell_and_replies_are_read_up_to_the_end_mark() -> None:
    virsh = FakeVirsh()
    virsh.replies["query-migrate"] = {"return": {"status": "pre-switchover"}}
    session, opened = shell_session(virsh)
    with session as qmp:
        assert qmp.execute("query-status") == {"status": "running"}
        assert qmp.execute("query-migrate")["status"] == "pre-switchover"
        assert qmp.execute_many([("query-status", None), ("query-migrate", None)])[1] == {"status": "pre-switchover"}
        with pytest.raises(QmpError, match="no migrate-continue"):
            qmp.execute("migrate-continue", {"state": "pre-switchover"})
        assert qmp.execute("query-status") == {"status": "running"}  # an error left nothing behind
    [shell] = opened
    assert shell.closed
    assert sum(1 for line in shell.lines if line.startswith("qemu-monitor-command")) == 6
    # only the state check at connect ran as a virsh process of its own
    assert [c[4] for c in virsh.calls if len(c) > 4 and c[4] == "domstate"] == ["domstate"]


def test_cont_is_libvirts_resume_and_its_error_is_raised() -> None:
    virsh = FakeVirsh(state="paused (user)")
    session, opened = shell_session(virsh)
    with session as qmp:
        assert qmp.execute("cont") == {}
        assert virsh.state == "running (unpaused)"
        with pytest.raises(VmUnreachable, match="virsh resume web: Requested operation is not valid"):
            qmp.execute("cont")  # libvirt refuses: it runs already
    assert "resume 'web'" in opened[0].lines


def test_a_command_libvirt_cannot_pass_says_so() -> None:
    virsh = FakeVirsh()
    session, _ = shell_session(virsh)
    with session as qmp:
        virsh.state = "shut off (destroyed)"
        with pytest.raises(VmUnreachable, match="domain is not running"):
            qmp.execute("query-status")


def test_without_streams_each_command_is_a_virsh_process() -> None:
    virsh = FakeVirsh()
    with VirshShellQmp("web", virsh, "web") as qmp:  # type: ignore[arg-type]
        assert qmp.execute("query-status") == {"status": "running"}
    assert any(c[4] == "qemu-monitor-command" and json.loads(c[6])["execute"] == "query-status" for c in virsh.calls)
