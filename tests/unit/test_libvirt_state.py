"""What libvirt says of a domain (virsh output as libvirt 9 prints it), and what status and hosts check make of it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import PurePosixPath

import pytest

from drtool.domain import Vm
from drtool.errors import VmUnreachable
from drtool.mechanics.blockinfo import parse_query_block
from drtool.mechanics.libvirt_access import APPARMOR_LOCAL, apparmor_rules, parse_access
from drtool.mechanics.libvirt_state import SNAPSHOT_NOTE, parse_libvirt_domain, source_notes
from drtool.services.libvirt_status import LibvirtCopyView, with_libvirt
from drtool.services.status import DiskStatus, VmStatus
from drtool.state.protection import Health

from .fakes import FakeShell

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)

INFO = """== info
Id:             3
Name:           db
UUID:           5a1c2f0e-8d2b-4b43-9a55-0c1a8e2d6f10
OS Type:        hvm
State:          {state}
CPU(s):         1
Max memory:     65536 KiB
Used memory:    65536 KiB
Persistent:     yes
Autostart:      enable
Managed save:   {saved}
Security model: none
Security DOI:   0

== state
{state} ({reason})

== status
<domstatus state='{state}' reason='{reason}' pid='4242'>
  <taint flag='custom-monitor'/>
  <monitor path='/var/lib/libvirt/qemu/domain-3-db/monitor.sock' type='unix'/>
  <domain type='qemu' id='3'><name>db</name></domain>
</domstatus>
== elapsed
    120
== end
"""


def running(reason: str = "booted", saved: str = "no") -> str:
    return INFO.format(state="running", reason=reason, saved=saved)


def test_a_running_domain_as_libvirt_sees_it():
    domain = parse_libvirt_domain(running(), "db", "kvm1", NOW)
    assert (domain.state, domain.reason, domain.persistent, domain.autostart, domain.managed_save) == (
        "running", "booted", True, True, False)
    assert domain.tainted == ("custom-monitor",) and domain.qemu_pid == 4242
    assert domain.qemu_started == "2026-11-27T11:58:00+00:00"
    assert domain.describe() == "libvirt domain db on kvm1: running (booted); tainted: custom-monitor"


def test_a_domain_libvirt_does_not_know_is_undefined():
    out = "== info\nerror: failed to get domain 'db'\n== state\nerror: failed to get domain 'db'\n== status\n" \
          "== elapsed\n== end\n"
    domain = parse_libvirt_domain(out, "db", "kvm1", NOW)
    assert domain.state == "undefined" and domain.qemu_pid is None
    assert "does not know domain db" in source_notes(domain, True, True)[0]


def test_a_saved_domain_has_no_qemu_and_the_note_says_what_to_do():
    out = INFO.format(state="shut off", reason="saved", saved="yes").split("== status")[0] + "== status\n== end\n"
    domain = parse_libvirt_domain(out, "db", "kvm1", NOW)
    assert (domain.state, domain.reason, domain.managed_save, domain.qemu_pid) == ("shut off", "saved", True, None)
    [note] = source_notes(domain, True, True)
    assert "managedsave" in note and "virsh start db, then drtool resync" in note


def test_jobs_gone_under_a_restored_qemu_name_the_restart_and_the_resync():
    domain = parse_libvirt_domain(running("restored"), "db", "kvm1", NOW)
    notes = source_notes(domain, protected=True, jobs_missing=True)
    assert notes[0].startswith("the domain's QEMU (pid 4242) was restored from a managed save at "
                               "2026-11-27T11:58:00+00:00") and "drtool resync" in notes[0]
    assert SNAPSHOT_NOTE not in notes  # no mirror: libvirt's snapshot would work now
    migrated = source_notes(parse_libvirt_domain(running("migrated"), "db", "kvm1", NOW), True, True)
    assert "was migrated in" in migrated[0]


def test_a_replicated_domain_says_why_libvirts_snapshots_fail_and_what_the_taint_means():
    notes = source_notes(parse_libvirt_domain(running(), "db", "kvm1", NOW), protected=True, jobs_missing=False)
    assert notes[0] == SNAPSHOT_NOTE and "busy" in SNAPSHOT_NOTE and "drtool checkpoint" in SNAPSHOT_NOTE
    assert "tainted: custom-monitor" in notes[1]
    unprotected = source_notes(parse_libvirt_domain(running(), "db", "kvm1", NOW), False, False)
    assert SNAPSHOT_NOTE not in unprotected


def test_migrated_away_says_so_and_how_to_go_on():
    out = INFO.format(state="shut off", reason="migrated", saved="no").split("== status")[0] + "== end\n"
    [note] = source_notes(parse_libvirt_domain(out, "db", "kvm1", NOW), True, True)
    assert "migrated domain db away from kvm1" in note and "resync" in note


TLS, SOCK = PurePosixPath("/var/lib/drtool/db/tls/db"), PurePosixPath("/var/lib/drtool/db/db.nbd.sock")


def test_apparmor_rules_name_the_psk_directory_and_the_relay_socket():
    rules = apparmor_rules(TLS, SOCK)
    assert rules == {"tls": '  "/var/lib/drtool/db/tls/db/" r,\n  "/var/lib/drtool/db/tls/db/*" r,',
                     "socket": '  "/var/lib/drtool/db/db.nbd.sock" rw,'}


def test_enforcing_apparmor_without_drtools_rules_says_which_are_missing():
    out = "user libvirt-qemu\ntls ok\nsocket ok\napparmor enforcing\nrule tls\n"
    access = parse_access("db", TLS, SOCK, out)
    assert access.apparmor == "enforcing" and access.missing_rules == (apparmor_rules(TLS, SOCK)["socket"],)
    assert str(APPARMOR_LOCAL) in access.error and "db.nbd.sock" in access.error and "tls/db/*" not in access.error


def test_no_apparmor_and_a_denied_key_directory():
    access = parse_access("db", TLS, SOCK, "user libvirt-qemu\ntls denied\nsocket absent\napparmor absent\n")
    assert (access.apparmor, access.missing_rules) == ("absent", ())
    assert access.error == f"libvirt-qemu cannot read {TLS}"
    fine = parse_access("db", TLS, SOCK, "user libvirt-qemu\ntls ok\nsocket ok\napparmor not-enforcing\n")
    assert fine.error is None and fine.apparmor == "not enforcing"


def test_jobs_gone_under_a_booted_qemu_do_not_claim_more_than_libvirt_knows():
    [note, *_] = source_notes(parse_libvirt_domain(running("booted"), "db", "kvm1", NOW), True, True)
    assert note.startswith("the domain's QEMU (pid 4242, started at 2026-11-27T11:58:00+00:00, libvirt: booted) "
                           "has no drtool job: it was restarted, or the jobs were ended")


class OneShellReach:
    def __init__(self, shell: FakeShell) -> None:
        self.shells = {"kvm1": shell, "kvm2": shell}

    def shell(self, host_name: str) -> FakeShell:
        return self.shells[host_name]


def libvirt_vm() -> Vm:
    return Vm("db", "kvm1", None, "kvm2", PurePosixPath("/dr/db"), libvirt_domain="db")


def test_status_of_a_broken_domain_names_its_restored_qemu_as_the_reason():
    reach = OneShellReach(FakeShell(answers={"sh": (0, running("restored"), "")}))
    disk = DiskStatus("virtio-disk0", "libvirt-2-format", "qcow2", 1 << 20, "/img", True, Health.BROKEN, None,
                      "no replication job on the source", protected=True)
    broken = VmStatus("db", "kvm1", "kvm2", "running", Health.BROKEN, (disk,), reason="no replication job")
    seen = with_libvirt(reach, libvirt_vm(), broken)  # type: ignore[arg-type]
    assert seen.reason is not None and "restored from a managed save" in seen.reason
    assert seen.libvirt is not None and seen.libvirt.host == "kvm1" and seen.libvirt.tainted == ("custom-monitor",)


def test_status_after_a_failover_shows_the_dr_hosts_domain():
    dr = FakeShell(answers={"sh": (0, running(), "")})
    reach = OneShellReach(FakeShell())
    reach.shells["kvm2"] = dr
    failed_over = VmStatus("db", "kvm2", "kvm2", "running", Health.FAILED_OVER)
    seen = with_libvirt(reach, libvirt_vm(), failed_over)  # type: ignore[arg-type]
    assert seen.libvirt is not None and seen.libvirt.host == "kvm2" and dr.ran
    assert with_libvirt(reach, Vm("web", "kvm1", PurePosixPath("/q.sock"), "kvm2", PurePosixPath("/dr/web")),
                        failed_over) is failed_over  # type: ignore[arg-type]


DR_COPY = """running

drtool-reply-end<domain type='qemu' id='1'><name>db</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/dr/db/top-vda.qcow2' index='2'/><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
  <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><alias name='sata0-0-0'/></disk>
</devices></domain>
drtool-reply-end vda   33554432   196608   33554432
"""


def test_the_dr_copy_is_read_through_libvirts_api_without_passing_qmp():
    dr = FakeShell(answers={"virsh": (0, DR_COPY, "")})
    with LibvirtCopyView("db (failed over)", dr, "db") as view:
        assert view.execute("query-status") == {"status": "running"}
        [disk] = parse_query_block(view.execute("query-block"))
    assert (disk.device, disk.format, disk.image, disk.virtual_size) == ("virtio-disk0", "qcow2",
                                                                          "/dr/db/top-vda.qcow2", 33554432)
    [call] = dr.ran
    assert "qemu-monitor-command" not in call[-1] and call[-1].startswith("domstate 'db' ; echo drtool-reply-end")
    gone = FakeShell(answers={"virsh": (0, "", "error: failed to get domain 'db'\n")})
    with pytest.raises(VmUnreachable, match="not known: error: failed to get domain"):
        LibvirtCopyView("db (failed over)", gone, "db").connect()
