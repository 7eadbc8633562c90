"""Services against fakes of SSH and QMP: the logic, without the lab."""

from pathlib import Path, PurePosixPath

import pytest

from drtool.domain import Host, Inventory, Vm
from drtool.errors import ExitCode, QmpError, UsageError
from drtool.services.hosts import check_hosts
from drtool.services.status import vm_status

from .fakes import FakeQmp, FakeReach, FakeShell
from .test_blockinfo import VD0

DF = "/var/lib\nwritable-dir\n/dev/vda 1000 400 600 40% /\n"
TOOLS = {
    "qemu-system-x86_64": (0, "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\n", ""),
    "qemu-img": (0, "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\n", ""),
    "qemu-storage-daemon": (0, "qemu-storage-daemon version 7.2.22\n", ""),
    "qemu-nbd": (0, "qemu-nbd 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\n", ""),
    "python3": (0, "Python 3.11.2\n", ""),
    "/usr/bin/python3": (0, "version 1.14.2\n", ""),
    "socat": (0, "socat by Gerhard Rieger and contributors - see www.dest-unreach.org\nsocat version 1.7.4.4 on 06 Nov 2022\n", ""),
    "sh": (0, DF, ""),
}

NO_MANIFEST = FakeShell(answers={"sh": (44, "", "")})  # read_file's "no such file"


def inventory() -> Inventory:
    hosts = {n: Host(n, f"{n}.example.net") for n in ("kvm1", "kvm2")}
    vm = Vm("web", "kvm1", PurePosixPath("/run/web.qmp"), "kvm2", PurePosixPath("/var/lib/drtool/web"))
    return Inventory(Path("drtool.toml"), hosts, {"web": vm})


def test_hosts_check_reports_versions_and_replica_space():
    reach = FakeReach(shells={"kvm1": FakeShell(answers=TOOLS), "kvm2": FakeShell(answers=TOOLS)})
    report = check_hosts(inventory(), reach)
    kvm1, kvm2 = report.hosts
    assert report.exit_code == ExitCode.OK
    assert [t.version for t in kvm1.tools] == ["7.2.22", "7.2.22", "7.2.22", "7.2.22", "3.11.2", "1.14.2"]
    assert kvm1.replica_space == ()  # kvm1 is no VM's DR host
    [space] = kvm2.replica_space
    assert (space.vm, space.measured_on, space.available_bytes) == ("web", "/var/lib", 600)
    # the replica dir travels as an argument of sh, never inside the script
    assert reach.shells["kvm2"].ran[-1][-1] == "/var/lib/drtool/web"


def test_a_missing_tool_fails_the_host_but_not_the_others():
    partial = {k: v for k, v in TOOLS.items() if k != "qemu-storage-daemon"}
    reach = FakeReach(shells={"kvm1": FakeShell(answers=partial), "kvm2": FakeShell(answers=TOOLS)})
    kvm1, kvm2 = check_hosts(inventory(), reach).hosts
    assert kvm1.exit_code == ExitCode.FAILED and "qemu-storage-daemon" in kvm1.error
    assert kvm2.ok


def test_an_unreachable_host_gives_exit_3():
    reach = FakeReach(shells={"kvm2": FakeShell(answers=TOOLS)}, down={"kvm1"})
    report = check_hosts(inventory(), reach)
    assert report.exit_code == ExitCode.UNREACHABLE
    assert not report.hosts[0].reachable and "did not answer" in report.hosts[0].error


def test_unknown_names_are_refused_before_any_contact():
    reach = FakeReach()
    with pytest.raises(UsageError, match="kvm9"):
        check_hosts(inventory(), reach, ["kvm9"])
    with pytest.raises(UsageError, match="db"):
        vm_status(inventory(), reach, ["db"])


def test_status_lists_disks_and_run_state():
    qmp = FakeQmp({"query-status": {"status": "running", "running": True}, "query-block": [VD0], "query-block-jobs": []})
    reach = FakeReach(shells={"kvm2": NO_MANIFEST}, monitors={("kvm1", "/run/web.qmp"): qmp})
    [web] = vm_status(inventory(), reach).vms
    assert (web.run_state, web.protection, web.exit_code) == ("running", "unprotected", ExitCode.OK)
    assert [(d.device, d.format, d.virtual_size) for d in web.disks] == [("vd0", "qcow2", 67108864)]


def test_status_keeps_qemus_own_error_text():
    err = QmpError("query-block", "GenericError", "something QEMU said")
    qmp = FakeQmp({"query-status": {"status": "running"}, "query-block": err, "query-block-jobs": []})
    reach = FakeReach(shells={"kvm2": NO_MANIFEST}, monitors={("kvm1", "/run/web.qmp"): qmp})
    [web] = vm_status(inventory(), reach).vms
    assert "something QEMU said" in web.error and web.exit_code == ExitCode.FAILED
