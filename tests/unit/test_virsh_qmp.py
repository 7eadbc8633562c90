"""QMP through virsh to a libvirt domain (a fake virsh), and finding a libvirt domain's QEMU (real processes)."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest

from drtool.domain import Vm
from drtool.errors import QmpError, VmUnreachable
from drtool.mechanics.hardware import read_hardware, source_qemu_alive
from drtool.transport.ssh import CommandResult
from drtool.transport.virsh_qmp import VirshQmp, parse_event_line

from .local_shell import LocalShell, fake_process


class FakeVirsh:
    """virsh on a host: the domain's state, and QEMU's replies by command."""

    host_key = None

    def __init__(self, state: str = "running (booted)") -> None:
        self.state = state
        self.calls: list[list[str]] = []
        self.replies: dict[str, dict] = {"query-status": {"return": {"status": "running"}}}

    def run(self, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> CommandResult:
        self.calls.append(argv)
        assert argv[:4] == ["virsh", "-q", "-c", "qemu:///system"]
        if argv[4] == "domstate":
            state = self.state if argv[5] == "--reason" else self.state.split(" (")[0]
            return CommandResult(tuple(argv), 0, f"{state}\n\n".encode(), b"")
        if argv[4] in ("suspend", "resume"):
            wanted = "paused (user)" if argv[4] == "suspend" else "running (unpaused)"
            if self.state == wanted:
                return CommandResult(tuple(argv), 1, b"", b"error: Requested operation is not valid\n")
            self.state = wanted
            return CommandResult(tuple(argv), 0, b"", b"")
        if not self.state.startswith("running"):
            return CommandResult(tuple(argv), 1, b"", b"error: Requested operation is not valid: domain is not running\n")
        command = json.loads(argv[6])["execute"]
        reply = self.replies.get(command, {"error": {"class": "CommandNotFound", "desc": f"no {command}"}})
        return CommandResult(tuple(argv), 0, json.dumps(reply).encode(), b"")


def test_commands_pass_through_virsh_as_one_argument_each():
    virsh = FakeVirsh()
    with VirshQmp("web", virsh, "web-prod") as qmp:
        assert qmp.execute("query-status") == {"status": "running"}
        with pytest.raises(QmpError, match="no blockdev-mirror"):
            qmp.execute("blockdev-mirror", {"job-id": "drtool-vda", "device": "libvirt-2-format"})
    sent = virsh.calls[-1]
    assert sent[4:6] == ["qemu-monitor-command", "web-prod"]
    assert json.loads(sent[6]) == {"execute": "blockdev-mirror",
                                   "arguments": {"job-id": "drtool-vda", "device": "libvirt-2-format"}}


def test_a_domain_that_is_shut_off_is_unreachable_with_what_to_do():
    with pytest.raises(VmUnreachable, match=r"shut off \(destroyed\)") as info:
        VirshQmp("web", FakeVirsh("shut off (destroyed)"), "web-prod").connect()
    assert "virsh start web-prod" in info.value.hint


def test_pause_and_resume_go_through_libvirt_so_that_it_knows():
    virsh = FakeVirsh()
    with VirshQmp("web", virsh, "web-prod") as qmp:
        assert qmp.execute("stop") == {} and virsh.state == "paused (user)"
        assert qmp.execute("stop") == {}  # paused already: fine, as QMP's stop is
        assert qmp.execute("cont") == {} and virsh.state == "running (unpaused)"
    assert [c[4] for c in virsh.calls if c[4] != "domstate"] == ["suspend", "suspend", "resume"]
    assert not any(c[4] == "qemu-monitor-command" for c in virsh.calls)


def test_a_managed_save_says_replication_ended_and_how_to_resume():
    with pytest.raises(VmUnreachable, match="managedsave") as info:
        VirshQmp("web", FakeVirsh("shut off (saved)"), "web-prod").connect()
    assert "drtool resync web" in info.value.hint


def test_a_domain_that_stops_between_commands_is_unreachable():
    virsh = FakeVirsh()
    with VirshQmp("web", virsh, "web-prod") as qmp:
        virsh.state = "shut off (destroyed)"
        with pytest.raises(VmUnreachable, match="domain is not running"):
            qmp.execute("query-status")


def test_event_lines_of_virsh_become_qmp_events():
    line = ("event BLOCK_JOB_COMPLETED at 1764255600.123456 for domain 'web-prod': "
            '{"device":"drtool-catchup0","len":1048576,"offset":1048576,"speed":0,"type":"backup"}')
    assert parse_event_line(line) == {
        "event": "BLOCK_JOB_COMPLETED", "timestamp": {"seconds": 1764255600, "microseconds": 123456},
        "data": {"device": "drtool-catchup0", "len": 1048576, "offset": 1048576, "speed": 0, "type": "backup"}}
    assert parse_event_line("event STOP at 1764255600.000001 for domain 'web-prod': <null>")["data"] == {}
    assert parse_event_line("error: Disconnected from qemu:///system due to end of file") is None


def vm(**kw) -> Vm:
    return Vm("web", "kvm1", kw.pop("qmp_socket", None), "kvm2", PurePosixPath("/dr/web"), **kw)


def test_the_qemu_of_a_libvirt_domain_is_found_by_its_guest_name():
    other = fake_process("qemu-system-x86_64", "-name", "guest=web-prod-2,debug-threads=on")
    ours = fake_process("qemu-system-x86_64", "-name", "guest=web-prod,debug-threads=on", "-S")
    try:
        found = read_hardware(LocalShell(), vm(libvirt_domain="web-prod"))
        assert found["pid"] == ours.pid and found["argv"][-1] == "-S"
        assert not source_qemu_alive(LocalShell(), vm(libvirt_domain="web-prod-3"))
    finally:
        for proc in (other, ours):
            proc.kill()
            proc.wait()
