"""status for monitoring: exit 1 on a problem, one 80-column row per VM, drills shown."""

from __future__ import annotations

import io
from dataclasses import replace

from rich.console import Console

from drtool.cli.render import status_table
from drtool.errors import ExitCode
from drtool.services.status import (
    DiskStatus,
    DrillStatus,
    StatusReport,
    VmStatus,
    problems,
)
from drtool.state.protection import Health, Protection

MiB = 1 << 20
LONG_IMAGE = "/var/lib/libvirt/images/a-rather-long-directory-name/and-a-long-image-name-too.qcow2"


def disk(device: str, health: Health, lag: int | None = 0, selected: bool = True, reason: str = "") -> DiskStatus:
    return DiskStatus(device, f"{device}-fmt", "qcow2", 20 << 30, LONG_IMAGE, selected, health, lag, reason,
                      health not in (Health.UNPROTECTED, Health.FAILED_OVER))


def vm(name: str, health: Health, *disks: DiskStatus, state: Protection | None = Protection.PROTECTED,
       reason: str = "", **kw: object) -> VmStatus:
    return VmStatus(name, "kvm1.example.net", "kvm2.example.net", "running", health, disks, mode="async",
                    transport="tls-psk", reason=reason, state=state, **kw)  # type: ignore[arg-type]


def healthy(name: str = "web") -> VmStatus:
    return vm(name, Health.IN_SYNC, disk("vd0", Health.IN_SYNC), disk("vd1", Health.IN_SYNC))


def test_all_well_is_no_problem():
    seeding = vm("db", Health.SEEDING, disk("vd0", Health.SEEDING, lag=10 << 30), state=Protection.SEEDING)
    failed_over = vm("mail", Health.FAILED_OVER, disk("vd0", Health.FAILED_OVER, lag=None),
                     state=Protection.FAILED_OVER)
    assert problems(StatusReport((healthy(), seeding, failed_over))) == []


def test_broken_lagging_and_unprotected_are_problems():
    broken = vm("web", Health.BROKEN, disk("vd0", Health.BROKEN, reason="job paused"),
                reason="the DR side did not answer; run drtool resync")
    lagging = vm("db", Health.LAGGING, disk("vd0", Health.LAGGING, lag=100 * MiB))
    slightly = vm("log", Health.LAGGING, disk("vd0", Health.LAGGING, lag=1 * MiB))
    bare = vm("mail", Health.UNPROTECTED, disk("vd0", Health.UNPROTECTED, lag=None), state=None)
    one_disk = vm("dns", Health.IN_SYNC, disk("vd0", Health.IN_SYNC), disk("vd1", Health.UNPROTECTED, lag=None))
    not_selected = vm("ok", Health.IN_SYNC, disk("vd0", Health.IN_SYNC),
                      disk("cd0", Health.UNPROTECTED, lag=None, selected=False))
    found = dict(problems(StatusReport((broken, lagging, slightly, bare, one_disk, not_selected))))
    assert set(found) == {"web", "db", "mail", "dns"}
    assert found["web"].startswith("broken: the DR side did not answer")
    assert "lagging past the bound" in found["db"]
    assert found["mail"] == "not protected: run drtool protect mail"
    assert found["dns"] == "disk(s) not replicated: vd1"
    assert dict(problems(StatusReport((slightly,)), max_lag_bytes=512 << 10)).keys() == {"log"}


def test_an_unreachable_vm_is_reported_once_as_its_error():
    gone = VmStatus("web", "kvm1", "kvm2", None, Health.UNKNOWN, error="cannot reach kvm1",
                    exit_code=ExitCode.UNREACHABLE, state=Protection.PROTECTED)
    assert problems(StatusReport((gone,))) == []


def render(table: object, width: int = 80) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=False).print(table)
    return out.getvalue().splitlines()


def test_status_fits_80_columns_one_row_per_vm():
    drilled = vm("db-with-a-long-name", Health.BROKEN, disk("vd0", Health.BROKEN),
                 reason="the DR side did not answer (job paused, io-status nospace); run drtool resync",
                 drill=DrillStatus("p20261127T141107123", "2026-11-27T14:11:07Z", True))
    # drawn on a wider console, so that a table wider than 80 columns would show (not be cropped)
    lines = render(status_table(StatusReport((healthy(), drilled)), width=80), width=200)
    assert all(len(line.rstrip()) <= 80 for line in lines), "\n".join(lines)
    body = [line for line in lines if "kvm1.exampl" in line]
    assert len(body) == 2, "\n".join(lines)  # one line per VM
    assert "vd0" not in "\n".join(lines) and LONG_IMAGE not in "\n".join(lines)
    assert "broken" in body[1] and "in sync" in body[0]


def test_wide_status_has_a_row_per_disk_and_shows_the_drill():
    drilled = vm("web", Health.IN_SYNC, disk("vd0", Health.IN_SYNC), disk("vd1", Health.IN_SYNC),
                 drill=DrillStatus("p20261127T141107123", "2026-11-27T14:11:07Z", True))
    text = "\n".join(render(status_table(StatusReport((drilled,)), wide=True), width=250))
    assert "vd0" in text and "vd1" in text and LONG_IMAGE in text
    assert "drill of p20261127T141107123 running" in text
    narrow = "\n".join(render(status_table(StatusReport((drilled,)), width=200), width=200))
    assert "drill of p20261127T141107123 running" in narrow


def test_hosts_check_fits_80_columns_with_one_line_fingerprints():
    from drtool.cli.render import hosts_table
    from drtool.services.hosts import HostCheck, HostsReport, SpaceCheck, ToolCheck

    key = "ssh-ed25519 SHA256:Qk5bXyU2m8o0bJ3Gz6wJ1o5o8lX0d9aYVq2b3c4d5e6"
    tools = tuple(ToolCheck(t, "7.2.19") for t in ("qemu-system-x86_64", "qemu-img", "qemu-storage-daemon"))
    hosts = (HostCheck("kvm1", "kvm1.example.net", True, key, (*tools, ToolCheck("python3", "3.11.2"))),
             HostCheck("kvm2", "kvm2.example.net", True, key, tools + (ToolCheck("python3", None),),
                       (SpaceCheck("web", "/var/lib/drtool/web", "/var/lib/drtool", 40 << 30),),
                       error="python3 not found", exit_code=ExitCode.FAILED))
    lines = render(hosts_table(HostsReport(hosts)), width=200)
    assert all(len(line.rstrip()) <= 80 for line in lines), "\n".join(lines)
    rows = [line for line in lines if "kvm" in line]
    assert len(rows) == 2, "\n".join(lines)
    assert "ed25519 SHA256:Qk5bXyU2…" in rows[0] and "ok (qemu 7.2.19)" in rows[0]
    assert "missing: python3" in rows[1] and "python3 not found" in rows[1]  # in full on stderr too


def test_point_ids_are_never_wrapped_at_80_columns():
    from drtool.cli.render import points_table
    from drtool.services.checkpoint import PointsReport
    from drtool.state.records import RecoveryPoint

    points = tuple(RecoveryPoint(f"p20261127T14110{i}123", f"2026-11-27T14:11:0{i}+00:00", "unplanned-latest",
                                 0.512, {"vd0": "/x"}, "2026-11-27T15:00:00+00:00" if i else None) for i in range(3))
    normal = render(points_table(PointsReport("web", (replace(points[0], quiesce="paused"),), {})), width=200)
    assert "paused 0.51 s" in "\n".join(normal)
    lines = render(points_table(PointsReport("web", points, {p.id: 1023 << 20 for p in points})), width=200)
    assert all(len(line.rstrip()) <= 80 for line in lines), "\n".join(lines)
    for i, p in enumerate(points):
        [row] = [line for line in lines if p.id in line]
        assert "11-27 14:11 " in row  # whole, on the id's line
        assert ("11-27 15:00" if i else " - ") in row
