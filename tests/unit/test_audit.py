"""Audit lines: to the system log (a real UNIX datagram socket here) and to the DR host's history (real sh)."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from drtool.cli import audit
from drtool.cli.audit import Audit, lines, record
from drtool.domain import Host, Inventory, Vm
from drtool.errors import HostUnreachable, Refused
from drtool.state.history import history_path, read_history

from .local_shell import LocalShell


class LocalReach:
    def __init__(self) -> None:
        self.locked: list[str] = []

    def shell(self, host_name: str) -> LocalShell:
        return LocalShell()

    @contextlib.contextmanager
    def lock(self, vm: Vm) -> Iterator[None]:
        self.locked.append(vm.name)
        yield


@pytest.fixture
def syslog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    logger = logging.getLogger("drtool.audit")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log"))
    sock.settimeout(2)
    monkeypatch.setattr(audit, "SYSLOG_ADDRESS", str(tmp_path / "log"))
    yield sock
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    sock.close()


def inventory(tmp_path: Path) -> Inventory:
    hosts = {"kvm1": Host("kvm1", "kvm1.example.net"),
             "kvm2": Host("kvm2", "kvm2.example.net", drtool_dir=PurePosixPath(tmp_path / "drtool"))}
    vm = Vm("web", "kvm1", PurePosixPath("/run/web.qmp"), "kvm2", PurePosixPath(tmp_path / "replicas"))
    return Inventory(tmp_path / "drtool.toml", hosts, {"web": vm})


def test_a_change_goes_to_syslog_and_the_dr_history(tmp_path: Path, syslog: socket.socket) -> None:
    inv, reach, warnings = inventory(tmp_path), LocalReach(), []
    spec = Audit("checkpoint", ["web"], lambda _: [])
    record(inv, reach, spec, lines([("web", "point p1")]), warnings.append)
    record(inv, reach, spec, spec.failed(HostUnreachable("kvm1 did not answer")), warnings.append)
    assert warnings == [] and reach.locked == ["web", "web"]
    logged = syslog.recv(4096).decode()
    assert "drtool[" in logged and "command='checkpoint' vm=web result=ok: point p1" in logged
    assert "result=exit 3: failed: kvm1 did not answer" in syslog.recv(4096).decode()
    path = history_path(inv.hosts["kvm2"], "web")
    assert Path(path).stat().st_mode & 0o777 == 0o600
    first, second = read_history(LocalShell(), path)
    assert (first["command"], first["vm"], first["result"], first["what"]) == ("checkpoint", "web", "ok", "point p1")
    assert first["user"] and first["from"] and first["time"].endswith("+00:00")
    assert (second["result"], second["exit_code"]) == ("exit 3", 3)


def test_refusals_and_usage_errors_changed_nothing_and_are_not_recorded() -> None:
    spec = Audit("failover", ["web"], lambda _: [])
    assert spec.failed(Refused("already failed over")) == []


def test_no_syslog_socket_still_writes_the_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("drtool.audit")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    monkeypatch.setattr(audit, "SYSLOG_ADDRESS", str(tmp_path / "no-such-socket"))
    inv, warnings = inventory(tmp_path), []
    record(inv, LocalReach(), Audit("protect", ["web"], lambda _: []), lines([("web", "protected")]), warnings.append)
    assert warnings == [] and read_history(LocalShell(), history_path(inv.hosts["kvm2"], "web"))[0]["what"] == "protected"


def test_a_history_that_cannot_be_written_is_a_warning(tmp_path: Path, syslog: socket.socket) -> None:
    inv, warnings = inventory(tmp_path), []
    (tmp_path / "drtool").write_text("a file where the directory should be")
    record(inv, LocalReach(), Audit("protect", ["web"], lambda _: []), lines([("web", "protected")]), warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("web: the audit history on kvm2 was not written")


def test_a_command_over_several_vms_records_what_each_changed_and_each_failure() -> None:
    from drtool.errors import ExitCode
    from drtool.services.concurrent import FleetReport, VmOutcome

    report = FleetReport((VmOutcome("web", "r-web"),
                          VmOutcome("db", None, "db: QMP monitor gone", ExitCode.UNREACHABLE),
                          VmOutcome("mail", None, "refused", ExitCode.REFUSED), VmOutcome("old", skipped="skipped")))
    entries = audit.fleet_entries(report, lambda r: [(r.removeprefix("r-"), "resynced")])
    assert entries == [("web", "resynced", 0), ("db", "failed: db: QMP monitor gone", int(ExitCode.UNREACHABLE))]
