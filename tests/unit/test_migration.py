"""mechanics/migration.py: the pieces of a live move that need no QEMU."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from drtool.mechanics import migration
from drtool.mechanics.migration import MigrationFailed, event_time, incoming_argv, migration_uri, wait_migration
from drtool.mechanics.remote import OwnProcess
from drtool.transport.qmp import EventSubscription


def test_uri_brackets_ipv6_and_leaves_names_and_ipv4() -> None:
    assert migration_uri("192.0.2.2", 10810) == "tcp:192.0.2.2:10810"
    assert migration_uri("2001:db8::2", 10810) == "tcp:[2001:db8::2]:10810"
    assert migration_uri("dr.example.net", 1) == "tcp:dr.example.net:1"


def test_destination_waits_for_a_stream_paused() -> None:
    assert incoming_argv(["qemu-system-x86_64", "-S", "-daemonize"])[-2:] == ["-incoming", "defer"]


def test_event_time_from_qemu_timestamps() -> None:
    assert event_time({"timestamp": {"seconds": 10, "microseconds": 250000}}) == 10.25
    assert event_time({}) is None


class Migrating:
    """query-migrate answering a sequence of statuses."""

    def __init__(self, *statuses: str) -> None:
        self.statuses = list(statuses)

    def execute(self, command: str, args: Any = None, **_: Any) -> Any:
        assert command == "query-migrate"
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"status": status} | ({"error-desc": "Unable to write to socket"} if status == "failed" else {})


def test_wait_returns_at_the_status_and_says_why_a_migration_failed() -> None:
    assert wait_migration(Migrating("setup", "active", "pre-switchover"), frozenset({"pre-switchover"}),
                          5)["status"] == "pre-switchover"  # type: ignore[arg-type]
    with pytest.raises(MigrationFailed, match="ended failed: Unable to write to socket"):
        wait_migration(Migrating("active", "failed"), frozenset({"pre-switchover"}), 5)  # type: ignore[arg-type]
    with pytest.raises(MigrationFailed, match="still active after 0.1 s"):
        wait_migration(Migrating("active"), frozenset({"completed"}), 0.1)  # type: ignore[arg-type]


def test_an_event_wakes_the_wait_at_once() -> None:
    events = EventSubscription()
    events._put({"event": "MIGRATION", "data": {"status": "pre-switchover"}})
    seen: list[dict] = []
    info = wait_migration(Migrating("active"), frozenset({"pre-switchover"}), 5, events, seen)  # type: ignore[arg-type]
    assert info["status"] == "pre-switchover" and seen[0]["event"] == "MIGRATION"


class Host:
    """Runs host_qemu's script with sh, its QEMU binary a script that prints the given version and machines."""

    def __init__(self, tmp: Path, version: str, machines: str, dh_params: bool = False) -> None:
        self.binary = tmp / "qemu"
        script = f"[ \"$1\" = --version ] && printf %s '{version}' || printf %s '{machines}'"
        self.binary.write_text(f"#!/bin/sh\n{script}\n")
        self.binary.chmod(0o755)
        self.tls = tmp / "tls"
        self.tls.mkdir()
        if dh_params:
            (self.tls / "dh-params.pem").write_text("params")

    def run(self, argv: list[str], **_: Any) -> Any:
        from drtool.transport.ssh import CommandResult

        done = subprocess.run(argv, capture_output=True, check=False)
        return CommandResult(tuple(argv), done.returncode, done.stdout, done.stderr)


class Source:
    def execute(self, command: str, args: Any = None, **_: Any) -> Any:
        if command == "query-version":
            return {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}
        return "pc-q35-7.2-machine"


@pytest.mark.parametrize(("version", "machines", "says"), [
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u17)\n",
     "Supported machines are:\npc-q35-7.2  Standard PC (Q35 + ICH9, 2009)\n", ""),
    ("QEMU emulator version 7.2.5\n", "", "QEMU versions differ: the VM runs QEMU 7.2.22 on kvm1, kvm2 has QEMU 7.2.5"),
    ("QEMU emulator version 7.2.22\n", "Supported machines are:\npc-q35-7.1  Standard PC\n",
     "machine types differ: the VM runs pc-q35-7.2 on kvm1"),
    ("bash: qemu: not found", "", "does not say its version"),
])
def test_what_keeps_the_dr_host_from_taking_the_stream(version: str, machines: str, says: str, tmp_path: Path) -> None:
    host = Host(tmp_path, version, machines)
    theirs = migration.host_qemu(host, str(host.binary), PurePosixPath(host.tls))  # type: ignore[arg-type]
    found = migration.destination_mismatch(Source(), theirs, "qemu-system-x86_64", "kvm2", "kvm1")  # type: ignore[arg-type]
    assert found == says if not says else says in found


@pytest.mark.parametrize("present", [True, False])
def test_host_qemu_says_whether_the_tls_directory_has_dh_parameters(present: bool, tmp_path: Path) -> None:
    host = Host(tmp_path, "QEMU emulator version 7.2.22\n", "Supported machines are:\npc  Standard PC\n", present)
    theirs = migration.host_qemu(host, str(host.binary), PurePosixPath(host.tls))  # type: ignore[arg-type]
    assert (theirs.version, theirs.machines, theirs.dh_params) == ("7.2.22", frozenset({"pc"}), present)
    assert not migration.host_qemu(host, str(host.binary)).dh_params  # type: ignore[arg-type]  # no directory asked


class LocalStreams:
    """A shell whose open_stream runs the command here, its stdin and stdout one end of a socketpair."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []

    def open_stream(self, argv: list[str]) -> socket.socket:
        ours, theirs = socket.socketpair()
        self.children.append(subprocess.Popen(argv, stdin=theirs, stdout=theirs))
        theirs.close()
        return ours

    def run(self, argv: list[str], **_: Any) -> Any:
        raise AssertionError("ArmedStop runs nothing else")


def test_the_armed_stop_finds_the_process_before_and_stops_it_with_one_message(tmp_path: Path) -> None:
    pidfile = tmp_path / "target.pid"
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(pidfile)])
    pidfile.write_text(f"{target.pid}\n")
    shell = LocalStreams()
    try:
        stopper = migration.ArmedStop(shell, OwnProcess(PurePosixPath(pidfile), "python", str(pidfile)),  # type: ignore[arg-type]
                                      fallback=None)
        assert stopper.pid == target.pid and target.poll() is None  # armed: nothing stopped yet
        stopper.fire()
        stopper.wait(10)
        assert target.wait(5) == -15  # SIGTERM
    finally:
        target.kill()
        for child in shell.children:
            child.wait(10)


def test_the_armed_stop_says_when_the_process_does_not_run(tmp_path: Path) -> None:
    pidfile = tmp_path / "target.pid"
    pidfile.write_text("999999999\n")
    shell = LocalStreams()
    stopper = migration.ArmedStop(shell, OwnProcess(PurePosixPath(pidfile), "python", str(pidfile)),  # type: ignore[arg-type]
                                  fallback=None)
    assert stopper.pid is None
    assert shell.children[0].wait(10) == 0
