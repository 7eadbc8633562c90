"""drtool SIGKILLed right after each recorded step of `failover --live` and `recover --failback --live`.

One guest goes there and back several times (a VM per case would cost minutes of CI each): in round k
the failover is killed after its k-th step and run again, then the failback after its k-th step and run
again (its fourth kill is inside the guest's pause, the reverse mirrors completed and the reverse target
stopped: the undo's catch-up from the pause's bitmap). After every re-run exactly one QEMU of the VM exists
on the two sites, the guest never boots again (its writer goes on from the next record), and at the end
the disks at home hold every record it acknowledged, all from its first boot. A kill before the switch is also rolled back with `failover --rollback`: the
source runs on and replication catches up without a full copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drtool.lab import Lab, LabVm
from drtool.lab.guest import GuestConsole, build_guest, kernel_args
from drtool.services.failover import FAULT_ENV, HOOKS_ENV

from .guest_drills import manifest_of, protect_guest, run_drtool, stop_dr_copy
from .test_guest_round_trip import kill_home_qemu, kill_pidfile
from .test_live_failover import boot_ids, records_on_disk

pytestmark = pytest.mark.lab
# 16 MiB disks: 32768 records, enough for the writer to go on through the whole chain (4 MiB last ~3 min)
CHAIN_DISKS = {"vd0": "16M", "vd1": "16M"}
# Steps recorded in one manifest write are one kill point: destination-started is written with
# migration-started, replication-stopped/switchover/dr-started with source-stopped, live-home-started with
# live-migrating (live.py, failback_live.py); the unit tests kill after every step name. Each write is
# killed after here once, and the failback's in-pause hook once.
FAILOVER_KILLS = ("migration-started", "dr-started", "source-stopped")
FAILBACK_KILLS = ("live-migrating", "dr-stopped", "failback-target-stopped")


def qemu_pids(lab: Lab, vm: LabVm) -> dict[str, list[int]]:
    """The live QEMU processes of this VM: at home (its own monitor path) and on the DR host (its run dir)."""
    dr_dir = str(lab.replica_dir(vm.name)).encode()
    found: dict[str, list[int]] = {"home": [], "dr": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not argv or b"qemu-system" not in argv[0]:
                continue
            if any(dr_dir in a for a in argv):
                found["dr"].append(int(entry.name))
            elif any(str(vm.qmp_socket).encode() in a for a in argv):
                found["home"].append(int(entry.name))
    return found


def assert_one_copy(lab: Lab, vm: LabVm, where: str, after: str) -> None:
    pids = qemu_pids(lab, vm)
    deadline = time.monotonic() + 10  # a quit QEMU may take a moment to go
    while len(pids["home"]) + len(pids["dr"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = qemu_pids(lab, vm)
    assert len(pids[where]) == 1 and len(pids["home"]) + len(pids["dr"]) == 1, f"after {after}: QEMUs {pids}"


def killed(config: Path, *args: str, step: str) -> None:
    """drtool run with the test hook armed: SIGKILLed right after `step` is recorded."""
    env = {**os.environ, HOOKS_ENV: "1", FAULT_ENV: step}
    done = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == -9, f"drtool {' '.join(args)} was not killed after {step}: {done.stderr}"


def went_on(before: GuestConsole, after: GuestConsole, what: str) -> None:
    """The writer goes on at the new site from the record after the last one acknowledged at the old."""
    last = before.last_ack()
    first = after.wait_acks(5, timeout=120)[0]
    assert last is not None and first.n == last.n + 1, f"{what}: {first.n} after {last.n if last else None}"
    assert boot_ids(after.lines()) == [], f"{what}: the guest booted again"


def test_killed_after_each_live_step_a_rerun_leaves_one_copy_and_every_acknowledged_record(lab, tmp_path):
    started = time.monotonic()
    vm = lab.add_vm("lvkill", "site-a", CHAIN_DISKS, guest=build_guest(),
                    guest_args=kernel_args("write", interval_ms=20))
    config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"}})
    dr = lab.dr_console(vm.name)
    try:
        vm.console.wait_acks(1, timeout=120)
        protect_guest(lab, vm, config)
        [boot] = boot_ids(vm.console.lines())

        # killed after a step before the switch, rolled back: the source runs on, caught up from a bitmap
        killed(config, "failover", vm.name, "--live", "--yes", step="migration-started")
        seen = len(vm.console.acks())
        back = json.loads(run_drtool(config, "failover", vm.name, "--rollback", "--yes", "--json").stdout)
        print(f"\nrollback after migration-started: {back}", flush=True)
        assert back["rollback"]["source_state"] == "running" and back["resync"]["action"] in ("none", "resumed",
                                                                                                "bitmap"), back
        assert manifest_of(lab, vm)["state"] == "protected"
        assert_one_copy(lab, vm, "home", "the rollback")
        vm.console.wait_acks(seen + 5, timeout=120)
        assert boot_ids(vm.console.lines()) == [boot]

        home = vm.console
        for k, there in enumerate(FAILOVER_KILLS):
            round_started = time.monotonic()
            killed(config, "failover", vm.name, "--live", "--yes", step=there)
            run_drtool(config, "failover", vm.name, "--live", "--yes")
            assert manifest_of(lab, vm)["state"] == "failed-over"
            assert_one_copy(lab, vm, "dr", f"failover killed after {there}")
            went_on(home, dr, f"failover killed after {there}")
            back_step = FAILBACK_KILLS[k]
            run_drtool(config, "recover", vm.name, "--reprotect")
            killed(config, "recover", vm.name, "--failback", "--live", step=back_step)
            assert manifest_of(lab, vm)["state"] == "failing-back"
            run_drtool(config, "recover", vm.name, "--failback", "--live")
            assert manifest_of(lab, vm)["state"] == "protected"
            assert_one_copy(lab, vm, "home", f"failback killed after {back_step}")
            went_on(dr, home, f"failback killed after {back_step}")
            if back_step == "failback-target-stopped":
                notes = [h.get("note", "") for h in manifest_of(lab, vm)["history"]]
                assert "live failback undone" in notes, notes
            print(f"round {k + 1} ({there}, {back_step}): {time.monotonic() - round_started:.1f} s", flush=True)

        last = home.last_ack()
        assert last is not None
        for device, records in records_on_disk(lab, vm, tmp_path, at_home=True).items():
            missing = [n for n in range(1, last.n + 1) if n not in records]
            assert not missing, f"{device}: acknowledged records missing: {missing[:5]}"
            assert set(records.values()) == {boot}, f"{device}: records from another boot: {set(records.values())}"
        print(f"chain of kills: {time.monotonic() - started:.1f} s, {last.n} records", flush=True)
    finally:
        kill_home_qemu(vm)
        kill_pidfile(lab.host_dir("site-a") / "drtool" / vm.name / "reverse" / "target.pid")
        kill_pidfile(lab.host_dir("site-b") / "drtool" / "rev" / f"{vm.name}.link.pid")
        stop_dr_copy(lab, vm)
