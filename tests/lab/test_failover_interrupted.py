"""Issue 7's defects 1, 2 and 3 against real QEMU: failovers and checkpoints that fail or die half-way."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drtool.lab import Lab, LabError, LabVm


from .replication_helpers import drtool, drtool_ok, replica_has, status_json, wait_broken, wait_in_sync

pytestmark = pytest.mark.lab
MiB = 1 << 20


def replica_dir(lab: Lab, vm: LabVm) -> Path:
    return lab.host_dir("site-b") / "replicas" / vm.name


def manifest_of(lab: Lab, vm: LabVm) -> dict:
    return json.loads((replica_dir(lab, vm) / "manifest.json").read_text())


def stop_started_vms(lab: Lab, vm: LabVm) -> None:
    pidfile = replica_dir(lab, vm) / "vm" / "qemu.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def drtool_popen(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "drtool", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_defect1_a_planned_failover_that_failed_at_the_dr_target_runs_again_without_losing_writes(
        lab: Lab, lab_vm: LabVm, lab_config: Path) -> None:
    """The DR target's monitor is gone while the source is paused; the guest goes on; the re-run keeps every write.

    (Stalling the target's process instead would hang the source's own QMP
    stop: QEMU flushes every node, the NBD one included, when it pauses.)
    """
    drtool_ok(lab_config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 0, MiB, 0x11)
    wait_in_sync(lab_vm)
    monitor = replica_dir(lab, lab_vm) / "target.qmp"
    away = monitor.with_name("target.qmp.away")
    monitor.rename(away)  # the final point's transaction cannot reach the DR target
    try:
        failed = drtool(lab_config, "failover", lab_vm.name, "--yes", timeout=300)
        assert failed.returncode != 0, failed.stdout
        assert lab_vm.status() == "running", f"a failed failover left the source paused: {failed.stderr}"
        record = manifest_of(lab, lab_vm)["failover"]
        assert "source-paused" not in record["steps"], f"the record says paused while the source runs: {record}"
        assert manifest_of(lab, lab_vm)["source_pause"] is None
        lab_vm.guest_write("vd0", 30 * MiB, MiB, 0x5A)  # the guest goes on: these are the last writes
    finally:
        away.rename(monitor)
    try:
        report = json.loads(drtool_ok(lab_config, "failover", lab_vm.name, "--yes", "--json").stdout)
        assert report["kind"] == "planned" and report["run_state"] == "running"
        assert not lab_vm.alive
        top = Path(next(d["replica_image"] for d in manifest_of(lab, lab_vm)["disks"] if d["device"] == "vd0"))
        assert replica_has(top, 30 * MiB, MiB, 0x5A), "the DR copy lacks the guest's last write"
        assert replica_has(top, 0, MiB, 0x11)
    finally:
        stop_started_vms(lab, lab_vm)


def test_defect2_unplanned_sync_failover_after_an_interrupted_resync_starts_from_the_newest_point(
        lab: Lab, lab_vm: LabVm, tmp_path: Path) -> None:
    config = lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b", "mode": "sync"}})
    drtool_ok(config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 0, MiB, 0x21)
    drtool_ok(config, "checkpoint", lab_vm.name)
    point = manifest_of(lab, lab_vm)["points"][-1]
    lab.cut_site_link("site-a", "site-b")
    resyncing = None
    try:
        with contextlib.suppress(LabError):  # waits out reconnect-delay, then the job breaks
            lab_vm.guest_write("vd0", 8 * MiB, MiB, 0x22)
        wait_broken(lab_vm, timeout=60)
        resyncing = drtool_popen(config, "resync", lab_vm.name)  # cannot get through: it waits, copying nothing
        deadline = time.monotonic() + 60
        while manifest_of(lab, lab_vm)["state"] != "resyncing":
            assert time.monotonic() < deadline and resyncing.poll() is None, "resync never recorded its copy"
            time.sleep(0.1)
        resyncing.kill()  # killed mid-copy: the replica is no consistent image now
        resyncing.wait(timeout=30)
    finally:
        if resyncing is not None and resyncing.poll() is None:
            resyncing.kill()
        lab.restore_site_link("site-a", "site-b")
    lab.isolate("site-a")
    try:
        result = drtool_ok(config, "failover", lab_vm.name, "--force", "--yes")
        assert f"from point {point['id']}" in result.stdout, result.stdout
        assert "resynced" in result.stdout and "newest point" in result.stdout, result.stdout  # said under --yes
        overlay = replica_dir(lab, lab_vm) / "failover" / "vd0.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["backing-filename"] == point["images"]["vd0"]
    finally:
        lab.unisolate("site-a")
        stop_started_vms(lab, lab_vm)


def test_defect3_a_checkpoint_killed_while_the_source_is_paused_is_resumed_by_the_next_command(
        lab: Lab, lab_vm: LabVm, lab_config: Path) -> None:
    drtool_ok(lab_config, "protect", lab_vm.name)
    wait_in_sync(lab_vm)
    for attempt in range(5):
        running = drtool_popen(lab_config, "checkpoint", lab_vm.name)
        deadline = time.monotonic() + 60
        while lab_vm.status() != "paused" and running.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if running.poll() is None and lab_vm.status() == "paused":
            running.send_signal(signal.SIGKILL)  # drtool dies with the source paused
            running.wait(timeout=30)
            if lab_vm.status() == "paused":
                break
            continue  # it resumed between the look and the kill: try again
        running.wait(timeout=60)
    else:
        pytest.fail("never caught the checkpoint's pause")
    assert lab_vm.status() == "paused"
    assert manifest_of(lab, lab_vm)["source_pause"]["by"] == "checkpoint"
    [result] = json.loads(drtool_ok(lab_config, "checkpoint", lab_vm.name, "--json").stdout)["results"]
    assert lab_vm.status() == "running", "the next checkpoint left the source paused"
    assert any(f"resumed {lab_vm.name}" in note for note in result["notes"]), result
    assert manifest_of(lab, lab_vm)["source_pause"] is None
    assert status_json(lab_config, lab_vm.name)["protection"] == "in-sync"


def test_defect1_with_a_real_guest_writing_records_no_acknowledged_record_is_lost(
        lab: Lab, tmp_path: Path) -> None:
    """The issue's reproduction: the first run fails at the DR target, the guest writes on, the re-run finishes."""
    from drtool.lab.guest import build_guest

    from .guest_drills import fail_over_and_verify, protect_guest, start_guest_vm, stop_dr_copy

    vm = start_guest_vm(lab, build_guest(), "g-defect1")
    try:
        config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"}})
        protect_guest(lab, vm, config)
        monitor = lab.replica_dir(vm.name) / "target.qmp"
        away = monitor.with_name("target.qmp.away")
        monitor.rename(away)
        try:
            failed = drtool(config, "failover", vm.name, "--yes", timeout=300)
            assert failed.returncode != 0, failed.stdout
        finally:
            away.rename(monitor)
        acked = vm.console.last_ack()
        assert acked is not None
        vm.console.wait_acks(acked.n + 50, timeout=120)  # the guest goes on: 50 more acknowledged records
        outcome = fail_over_and_verify(lab, vm, config, "planned-rerun", vm.name, disaster=False)
        assert outcome.report.problems() == []
        assert outcome.lost_acknowledged() == [], outcome.line()
        assert outcome.drtool_report["rpo_seconds"] == 0
    finally:
        stop_dr_copy(lab, vm)
