"""`drtool failover --live` against the lab, judged by the real guest writing numbered records.

The guest must not reboot (no new boot on the DR console, every record on disk
from one boot id), must lose no acknowledged record, and its own clock must
show only a short pause across the switch.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drtool.lab import Lab, LabVm
from drtool.lab.guest import build_guest
from drtool.services.failover import FAULT_ENV, HOOKS_ENV
from drtool.transport.qmp import local_qmp

from .guest_drills import manifest_of, protect_guest, run_drtool, start_guest_vm, stop_dr_copy
from .test_guest_round_trip import kill_home_qemu, kill_pidfile

pytestmark = pytest.mark.lab
_numbers = itertools.count(1)
GUEST_PAUSE_BOUND = 2.0  # s on the guest's clock between the last ACK at the source and the first at DR


@pytest.fixture(scope="module")
def guest():
    return build_guest()


@pytest.fixture
def live_vm(lab, guest, tmp_path):
    vm = start_guest_vm(lab, guest, f"lv{next(_numbers)}")
    config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"}})
    yield vm, config
    stop_dr_copy(lab, vm)


def records_on_disk(lab: Lab, vm: LabVm, tmp_path: Path, *, at_home: bool = False) -> dict[str, dict[int, str]]:
    """Per disk: record number -> boot id, read from the DR copy's images (at_home: the VM's own, back home)
    once its QEMU is paused (flushed)."""
    monitor = vm.qmp_socket if at_home else lab.replica_dir(vm.name) / "vm" / "drtool.qmp"
    with local_qmp("the VM", str(monitor)) as qmp:
        qmp.execute("stop")  # drains and flushes: the images hold what the guest was told
    found: dict[str, dict[int, str]] = {}
    for disk in manifest_of(lab, vm)["disks"]:
        raw = tmp_path / f"{disk['device']}.raw"
        image = disk["source_image" if at_home else "replica_image"]
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, str(raw)], check=True,
                       timeout=60)
        data = raw.read_bytes()
        records = {}
        for sector in range(len(data) // 512):
            fields = data[sector * 512:(sector + 1) * 512].decode(errors="replace").split()
            if len(fields) == 8 and fields[0] == "DRREC" and fields[7] == "CERD" and int(fields[1]) == sector:
                records[sector] = fields[2]
        found[disk["device"]] = records
    return found


def boot_ids(lines: list[str]) -> list[str]:
    return [word.split("=", 1)[1] for line in lines if line.startswith("GUEST up") for word in line.split()
            if word.startswith("boot=")]


def test_live_failover_moves_the_running_guest_without_a_reboot_or_a_lost_record(lab, live_vm, tmp_path):
    vm, config = live_vm
    protect_guest(lab, vm, config)
    # the TLS server ends (target, destination) load DH parameters instead of generating them (0.06-0.67 s)
    assert (lab.replica_dir(vm.name) / "tls" / "dh-params.pem").read_bytes().startswith(b"-----BEGIN DH PARAMETERS")
    [boot] = boot_ids(vm.console.lines())
    said = json.loads(run_drtool(config, "failover", vm.name, "--live", "--yes", "--json").stdout)
    vm.process.wait(30)  # the source quit after the switch
    last_at_source = vm.console.last_ack()
    dr = lab.dr_console(vm.name)
    acks = dr.wait_acks(10, timeout=120)
    live = said["live"]
    pause = acks[0].t - last_at_source.t
    print(f"\nlive failover: downtime {live['downtime_seconds']} s (QEMU {live['qemu_downtime_seconds']} s), "
          f"drtool's pause work {live['switchover_seconds']} s, move {live['move_seconds']} s, "
          f"{live['ram_bytes']} bytes of RAM; guest clock across the switch {pause:.2f} s; "
          f"RTO {said['rto_seconds']} s", flush=True)
    assert said["kind"] == "live" and said["run_state"] == "running" and live["encrypted"]
    assert boot_ids(dr.lines()) == [], "the guest booted again on the DR host"
    assert acks[0].n == last_at_source.n + 1, "the writer did not go on from the next record"
    assert 0 < pause < GUEST_PAUSE_BOUND
    assert live["downtime_seconds"] is not None and 0 < live["downtime_seconds"] < 2.0
    assert live["ram_bytes"] > 1 << 20
    on_disk = records_on_disk(lab, vm, tmp_path)
    last = dr.last_ack()
    for device, records in on_disk.items():
        missing = [n for n in range(1, last.n + 1) if n not in records]
        assert not missing, f"{device}: acknowledged records missing: {missing[:5]}"
        assert set(records.values()) == {boot}, f"{device}: records from another boot: {set(records.values())}"
    manifest = manifest_of(lab, vm)
    print(f"phases (s from the destination's start): {manifest['failover']['migration']['phases']}; "
          f"steps {manifest['failover']['step_seconds']}", flush=True)
    assert manifest["state"] == "failed-over" and manifest["failover"]["kind"] == "live"
    assert not (lab.replica_dir(vm.name) / "target.pid").exists() or "qemu-storage" not in _cmdline(
        lab.replica_dir(vm.name) / "target.pid")


def _cmdline(pidfile: Path) -> str:
    try:
        return Path(f"/proc/{pidfile.read_text().strip()}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return ""


@pytest.mark.parametrize("hook", ["pre-switchover", "target-stopped"])
def test_live_failover_killed_inside_the_pause_is_undone_by_a_rerun_and_then_moves(lab, live_vm, hook):
    """drtool SIGKILLed inside the guest's pause, at its start (the mirrors still running) or just before
    migrate-continue (the mirrors completed, the DR target stopped): the re-run cancels the migration, the
    source runs on with replication restored without a full copy, then the VM moves."""
    vm, config = live_vm
    protect_guest(lab, vm, config)
    env = {**os.environ, HOOKS_ENV: "1", FAULT_ENV: hook}
    killed = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), "failover", vm.name, "--live",
                             "--yes"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -9, killed.stderr
    assert manifest_of(lab, vm)["state"] == "failing-over"
    seen = len(vm.console.acks())
    said = json.loads(run_drtool(config, "failover", vm.name, "--live", "--yes", "--json").stdout)
    assert any("undone" in n for n in said["notes"]), said["notes"]
    [caught_up] = [n for n in said["notes"] if "caught up" in n]
    print(f"\n{hook}: {caught_up}", flush=True)
    assert ("(none:" in caught_up) == (hook == "pre-switchover") and "full" not in caught_up
    assert len(vm.console.acks()) > seen, "the source did not run on after the undo"
    vm.process.wait(30)
    last_at_source = vm.console.last_ack()
    acks = lab.dr_console(vm.name).wait_acks(5, timeout=120)
    assert acks[0].n == last_at_source.n + 1
    assert boot_ids(lab.dr_console(vm.name).lines()) == []


def test_live_failover_then_home_sending_only_what_the_dr_copy_wrote(lab, live_vm):
    """Live failover, reprotect from the reverse bitmap (no rewind, no hashing), cold failback: the guest
    at home finds every record it was promised at either site."""
    vm, config = live_vm
    protect_guest(lab, vm, config)
    run_drtool(config, "failover", vm.name, "--live", "--yes")
    vm.process.wait(30)
    dr = lab.dr_console(vm.name)
    dr.wait_acks(20, timeout=120)  # the writer goes on at the DR site, tracked by the reverse bitmap
    try:
        reprotected = json.loads(run_drtool(config, "recover", vm.name, "--reprotect", "--json").stdout)
        print(f"\nreprotect after live failover: {reprotected}", flush=True)
        assert reprotected["method"] == "bitmap" and reprotected["rewound_bytes"] == 0
        assert reprotected["hashed_bytes"] == 0 and 0 < reprotected["sent_bytes"] < reprotected["disk_bytes"]
        seen = len(dr.acks())
        dr.wait_acks(seen + 20, timeout=180)  # writing on, replicated home by the mirrors
        run_drtool(config, "recover", vm.name, "--failback")
        promised_dr = dr.last_ack()
        home = vm.console.wait_verify(timeout=180)
        assert home.problems() == [], home
        assert home.b.max >= promised_dr.n, f"acknowledged at the DR site up to {promised_dr.n}, home has {home.b.max}"
    finally:
        kill_home_qemu(vm)
        kill_pidfile(lab.host_dir("site-a") / "drtool" / vm.name / "reverse" / "target.pid")
        kill_pidfile(lab.host_dir("site-b") / "drtool" / "rev" / f"{vm.name}.link.pid")


# the uninterrupted way there and back is test_live_points.py's (and each kill's re-run in test_live_kills.py)
@pytest.mark.parametrize("killed_at", ["failback-pre-switchover"])
def test_live_failover_and_live_failback_never_reboot_the_guest(lab, live_vm, killed_at):
    """There and back again by live migration: the guest's writer goes on from the next record at each
    switch, never boots, and the VM ends protected at home. Killed inside the failback's pause, the
    re-run undoes it (the DR copy runs on, reverse replication catches up) and moves the VM home."""
    vm, config = live_vm
    protect_guest(lab, vm, config)
    [boot] = boot_ids(vm.console.lines())
    run_drtool(config, "failover", vm.name, "--live", "--yes")
    vm.process.wait(30)
    last_at_source = vm.console.last_ack()
    dr = lab.dr_console(vm.name)
    assert dr.wait_acks(20, timeout=120)[0].n == last_at_source.n + 1
    try:
        run_drtool(config, "recover", vm.name, "--reprotect")
        dr.wait_acks(len(dr.acks()) + 10, timeout=180)
        if killed_at:
            env = {**os.environ, HOOKS_ENV: "1", FAULT_ENV: killed_at}
            killed = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), "recover", vm.name,
                                     "--failback", "--live"], env=env, capture_output=True, text=True, timeout=600,
                                    check=False)
            assert killed.returncode == -9, killed.stderr
            assert manifest_of(lab, vm)["state"] == "failing-back"
        back = json.loads(run_drtool(config, "recover", vm.name, "--failback", "--live", "--json").stdout)
        print(f"\nlive failback: {back}", flush=True)
        last_at_dr = dr.last_ack()
        home = vm.console.wait_acks(10, timeout=120)  # the home QEMU's console file starts anew
        assert boot_ids(vm.console.lines()) == [] and vm.console.verify_report() is None, "it booted at home"
        assert home[0].n == last_at_dr.n + 1, f"home went on from {home[0].n}, the DR copy acked {last_at_dr.n}"
        status = json.loads(run_drtool(config, "status", vm.name, "--json").stdout)["vms"][0]
        assert (status["host"], status["state"]) == ("site-a", "protected"), status
        notes = [h.get("note", "") for h in manifest_of(lab, vm)["history"]]
        assert "resync: bitmap" in notes[-1], f"the forward direction was not caught up from the bitmap: {notes}"
        assert not (lab.replica_dir(vm.name) / "vm" / "qemu.pid").exists() or not _cmdline(
            lab.replica_dir(vm.name) / "vm" / "qemu.pid"), "the DR copy still runs"
        assert boot  # the boot id the guest has had all along (its records carry it)
    finally:
        kill_home_qemu(vm)
        kill_pidfile(lab.host_dir("site-a") / "drtool" / vm.name / "reverse" / "target.pid")
        kill_pidfile(lab.host_dir("site-b") / "drtool" / "rev" / f"{vm.name}.link.pid")
