"""drtool recover against the real lab: the old site returns (split brain), reprotect sends only what differs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from drtool.errors import ExitCode
from drtool.lab.vm import qmp_execute

from .replication_helpers import (
    drtool,
    drtool_ok,
    images_identical,
    replica_has,
    status_json,
    wait_in_sync,
)

pytestmark = pytest.mark.lab
MiB = 1 << 20
DISK = 64 * MiB


def dr_vm_socket(lab, vm) -> Path:
    return lab.replica_dir(vm.name) / "vm" / "drtool.qmp"


def dr_guest_write(lab, vm, offset: int, length: int, pattern: int) -> None:
    """A write as the DR copy's guest makes it: qemu-io on the device's backend, through the DR VM's monitor."""
    reply = qmp_execute(dr_vm_socket(lab, vm), "human-monitor-command", {
        "command-line": f'qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x{pattern:02x} {offset} {length}"',
    }, 30)
    assert not str(reply).strip(), reply


def dr_mirrors_drained(lab, vm, timeout: float = 60) -> None:
    """With the DR copy paused: wait until its reverse mirrors have copied everything."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in qmp_execute(dr_vm_socket(lab, vm), "query-block-jobs", {}, 30)
                if str(j["device"]).startswith("drtool-")]
        if jobs and all(j["ready"] and j["len"] == j["offset"] for j in jobs):
            time.sleep(0.5)  # a copy the last poll missed lands within the mirror's 100 ms slice
            return
        time.sleep(0.2)
    raise AssertionError(f"reverse mirrors of {vm.name} did not drain: {jobs}")


def kill_pidfile(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(path.read_text()), signal.SIGKILL)


@pytest.fixture
def cleanup(lab, lab_vm):
    yield
    lab.restore_site_link("site-a", "site-b")
    kill_pidfile(lab.replica_dir(lab_vm.name) / "vm" / "qemu.pid")
    kill_pidfile(lab.host_dir("site-a") / "drtool" / lab_vm.name / "reverse" / "target.pid")
    kill_pidfile(lab.host_dir("site-b") / "drtool" / "rev" / f"{lab_vm.name}.link.pid")


def test_unplanned_failover_from_a_point_then_reprotect_overwrites_the_old_primarys_newer_writes(
        lab, lab_vm, lab_config, cleanup):
    vm = lab_vm
    drtool_ok(lab_config, "protect", vm.name)
    vm.guest_write("vd0", 0, MiB, 0x11)
    wait_in_sync(vm)
    drtool_ok(lab_config, "checkpoint", vm.name)
    point = json.loads((lab.replica_dir(vm.name) / "manifest.json").read_text())["points"][-1]["id"]
    # newer writes on the old primary that never reach the DR side: the link is cut first
    lab.cut_site_link("site-a", "site-b")
    vm.guest_write("vd0", 10 * MiB, MiB, 0x22)
    vm.guest_write("vd0", 0, 4096, 0x23)
    vm.kill()
    lab.restore_site_link("site-a", "site-b")
    drtool_ok(lab_config, "failover", vm.name, "--force", "--point", point, "--yes")
    dr_guest_write(lab, vm, 20 * MiB, MiB, 0x33)  # the DR copy's guest writes after the failover

    # the old site returns with its VM started again (paused: nothing written): a split brain
    vm.relaunch(start=False)
    try:
        status = drtool(lab_config, "status", vm.name)
        assert status.returncode == ExitCode.FAILED, status.stdout + status.stderr
        assert "split brain: VM runs on both sites" in status.stdout + status.stderr
        refused = drtool(lab_config, "recover", vm.name, "--reprotect")
        assert refused.returncode == ExitCode.REFUSED, refused.stderr
        assert "split brain" in refused.stderr and f"pid {vm.pid}" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        resync = drtool(lab_config, "resync", vm.name)
        assert resync.returncode == ExitCode.REFUSED and "split brain" in resync.stderr, resync.stderr
    finally:
        vm.kill()
    assert Path(str(vm.disks["vd0"]) + ".drtool-failed-over").exists(), "the old image carries drtool's marker"

    result = json.loads(drtool_ok(lab_config, "recover", vm.name, "--reprotect", "--json").stdout)
    assert result["rewound_bytes"] == 2 * MiB, result  # the two 1 MiB chunks the old primary wrote after the point
    assert 0 < result["sent_bytes"] < DISK // 10, result  # about the 1 MiB the DR copy wrote
    assert result["hashed_bytes"] < MiB, result
    assert status_json(lab_config, vm.name)["state"] == "reprotected"

    dr_guest_write(lab, vm, 30 * MiB, MiB, 0x44)  # replicated home as it happens
    qmp_execute(dr_vm_socket(lab, vm), "stop", {}, 30)
    dr_mirrors_drained(lab, vm)
    same, detail = images_identical(lab.replica_dir(vm.name) / "failover" / "vd0.qcow2", vm.disks["vd0"])
    assert same, detail
    assert replica_has(vm.disks["vd0"], 10 * MiB, MiB, 0x00), "the old primary's newer write is gone"
    assert replica_has(vm.disks["vd0"], 30 * MiB, MiB, 0x44)
    qmp_execute(dr_vm_socket(lab, vm), "cont", {}, 30)

    again = json.loads(drtool_ok(lab_config, "recover", vm.name, "--reprotect", "--json").stdout)
    assert again["already"] is True


def test_recover_refuses_a_vm_that_has_not_failed_over(lab, lab_vm, lab_config, cleanup):
    drtool_ok(lab_config, "protect", lab_vm.name)
    refused = drtool(lab_config, "recover", lab_vm.name, "--reprotect")
    assert refused.returncode == ExitCode.REFUSED and "has not failed over" in refused.stderr
    unknown = drtool(lab_config, "recover", "nosuchvm", "--reprotect")
    assert unknown.returncode == ExitCode.USAGE and len(unknown.stderr.strip().splitlines()) == 1
    nothing = drtool(lab_config, "recover", lab_vm.name)
    assert nothing.returncode == ExitCode.USAGE


def home_qemu_pids(vm) -> list[int]:
    """QEMU processes whose command line names the VM's monitor (drtool's failback starts one, daemonized)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv and b"qemu-system" in argv[0] and any(str(vm.qmp_socket).encode() in a for a in argv):
                    pids.append(int(entry.name))
    return pids


def home_write(vm, offset: int, length: int, pattern: int) -> None:
    reply = qmp_execute(vm.lab_qmp_socket, "human-monitor-command", {
        "command-line": f'qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x{pattern:02x} {offset} {length}"',
    }, 30)
    assert not str(reply).strip(), reply


def killed_run(config: Path, step: str, *args: str) -> None:
    env = {**os.environ, "DRTOOL_TEST_HOOKS": "1", "DRTOOL_FAULT_AFTER_STEP": step}
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL, (step, result.returncode, result.stderr)


def test_round_trip_planned_failover_reprotect_failback_killed_half_way_each(lab, lab_vm, lab_config, cleanup):
    vm = lab_vm
    drtool_ok(lab_config, "protect", vm.name)
    vm.guest_write("vd0", 0, 2 * MiB, 0x11)
    wait_in_sync(vm)
    drtool_ok(lab_config, "failover", vm.name, "--yes")
    dr_guest_write(lab, vm, 8 * MiB, 2 * MiB, 0x55)  # 2 MiB of 64: about 3% changed at the DR site

    killed_run(lab_config, "mirrors-started", "recover", vm.name, "--reprotect")
    assert status_json(lab_config, vm.name)["state"] == "reprotecting"
    result = json.loads(drtool_ok(lab_config, "recover", vm.name, "--reprotect", "--json").stdout)
    assert result["resumed"] is True and result["rewound_bytes"] == 0, result  # a planned failover: nothing newer
    assert 0 < result["sent_bytes"] < DISK // 10, result

    dr_guest_write(lab, vm, 12 * MiB, MiB, 0x66)  # written while reprotected: must come home too
    killed_run(lab_config, "reverse-stopped", "recover", vm.name, "--failback")
    assert status_json(lab_config, vm.name)["state"] == "failing-back"
    try:
        back = json.loads(drtool_ok(lab_config, "recover", vm.name, "--failback", "--json").stdout)
        assert back["resumed"] is True and back["host"] == "site-a"
        assert not (lab.replica_dir(vm.name) / "vm" / "qemu.pid").exists() or not any(
            Path(f"/proc/{p}").exists() for p in [int((lab.replica_dir(vm.name) / "vm" / "qemu.pid").read_text())])
        entry = status_json(lab_config, vm.name)
        assert (entry["host"], entry["state"], entry["run_state"]) == ("site-a", "protected", "running"), entry
        for offset, length, pattern in ((0, 2 * MiB, 0x11), (8 * MiB, 2 * MiB, 0x55), (12 * MiB, MiB, 0x66)):
            assert replica_has(vm.disks["vd0"], offset, length, pattern), f"0x{pattern:02x} did not come home"
        home_write(vm, 20 * MiB, MiB, 0x77)  # protected in the original direction again
        deadline = time.monotonic() + 60
        top = Path(json.loads((lab.replica_dir(vm.name) / "manifest.json").read_text())["disks"][0]["replica_image"])
        while not replica_has(top, 20 * MiB, MiB, 0x77):
            assert time.monotonic() < deadline, "the write at home did not reach the DR replica"
            time.sleep(0.5)
        drtool_ok(lab_config, "resync", vm.name)
        drtool_ok(lab_config, "checkpoint", vm.name)
    finally:
        for pid in home_qemu_pids(vm):
            os.kill(pid, signal.SIGKILL)


def test_restore_a_point_before_a_bad_write_to_another_host_and_in_place(lab, lab_vm, lab_config, cleanup):
    vm = lab_vm
    drtool_ok(lab_config, "protect", vm.name)
    vm.guest_write("vd0", 4 * MiB, 2 * MiB, 0xAA)
    wait_in_sync(vm)
    drtool_ok(lab_config, "checkpoint", vm.name)
    manifest = json.loads((lab.replica_dir(vm.name) / "manifest.json").read_text())
    point, point_image = manifest["points"][-1]["id"], Path(manifest["points"][-1]["images"]["vd0"])
    vm.guest_write("vd0", 4 * MiB, MiB, 0xBB)  # the bad write
    wait_in_sync(vm)

    target = lab.host_dir("site-a") / "restored-vd0.qcow2"
    result = json.loads(drtool_ok(lab_config, "recover", vm.name, "--restore", "--point", point, "--disk", "vd0",
                                  "--to", f"site-a:{target}", "--json").stdout)
    [restored] = result["disks"]
    assert restored["verified"] is True and restored["sent_bytes"] == 2 * MiB, restored  # holes not sent
    same, detail = images_identical(point_image, target)
    assert same, detail
    assert replica_has(target, 4 * MiB, 2 * MiB, 0xAA)

    # bad input: one line, its exit code, nothing changed
    before = target.stat().st_mtime_ns
    for args, code in (
        (("--point", "nosuch", "--to", f"site-a:{target}.2"), ExitCode.USAGE),
        (("--point", point, "--disk", "vd9", "--to", f"site-a:{target}.2"), ExitCode.USAGE),
        (("--point", point, "--to", f"nohost:{target}.2"), ExitCode.USAGE),
        (("--point", point, "--to", "site-a:relative.qcow2"), ExitCode.USAGE),
        (("--point", point, "--to", f"site-a:{target}"), ExitCode.REFUSED),  # exists, no --overwrite
        (("--point", point, "--in-place"), ExitCode.REFUSED),  # the VM runs
    ):
        bad = drtool(lab_config, "recover", vm.name, "--restore", *args)
        assert bad.returncode == code, (args, bad.returncode, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert target.stat().st_mtime_ns == before and not Path(f"{target}.2").exists()
    assert replica_has(vm.disks["vd0"], 4 * MiB, MiB, 0xBB), "a refused --in-place changed the disk"

    vm.stop()
    result = json.loads(drtool_ok(lab_config, "recover", vm.name, "--restore", "--point", point, "--in-place",
                                  "--json").stdout)
    assert result["disks"][0]["sent_bytes"] == MiB, result  # only the chunk the bad write changed
    same, detail = images_identical(point_image, vm.disks["vd0"])
    assert same, detail
