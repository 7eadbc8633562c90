"""drtool failover against the real lab: planned, unplanned, killed half-way, rolled back, drills."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from drtool.errors import ExitCode
from drtool.services.failover import FAULT_ENV, HOOKS_ENV, PLANNED_STEPS

from .replication_helpers import (
    assert_replicas_identical,
    drtool,
    drtool_jobs,
    drtool_ok,
    images_identical,
    replica_has,
    status_json,
    wait_in_sync,
)

pytestmark = pytest.mark.lab
MiB = 1 << 20


def replica_dir(lab, vm) -> Path:
    return lab.host_dir("site-b") / "replicas" / vm.name


def manifest_of(lab, vm) -> dict:
    return json.loads((replica_dir(lab, vm) / "manifest.json").read_text())


def stop_started_vms(lab, vm) -> None:
    """End the QEMUs drtool started on the DR host for this VM (failed over, drill)."""
    for sub in ("vm", "test"):
        pidfile = replica_dir(lab, vm) / sub / "qemu.pid"
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture
def protected(lab, lab_vm, lab_config):
    drtool_ok(lab_config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 0, MiB, 0x11)
    lab_vm.guest_write("vd0", 63 * MiB, MiB, 0x12)
    wait_in_sync(lab_vm)
    yield lab_vm
    stop_started_vms(lab, lab_vm)


def dr_tops(lab, vm) -> dict[str, str]:
    return {d["device"]: d["replica_image"] for d in manifest_of(lab, vm)["disks"]}


def test_planned_failover_runs_the_vm_on_the_dr_host_with_every_write(lab, protected, lab_config):
    vm = protected
    vm.guest_write("vd0", 30 * MiB, 2 * MiB, 0x13)  # the last writes before the failover
    result = drtool_ok(lab_config, "failover", vm.name, "--yes", "--json")
    report = json.loads(result.stdout)
    assert report["kind"] == "planned" and report["run_state"] == "running" and report["rpo_seconds"] == 0
    assert report["rto_seconds"] > 0
    assert not vm.alive, "the source QEMU still runs after a planned failover"
    entry = status_json(lab_config, vm.name)
    assert (entry["host"], entry["run_state"]) == ("site-b", "running")
    assert entry["protection"] == "failed-over"
    # exactly what the source held when it stopped
    same, detail = images_identical(vm.disks["vd0"], Path(dr_tops(lab, vm)["vd0"]))
    assert same, detail
    again = drtool(lab_config, "failover", vm.name, "--yes")
    assert again.returncode == ExitCode.REFUSED and "already failed over" in again.stderr
    protect = drtool(lab_config, "protect", vm.name)
    assert protect.returncode == ExitCode.REFUSED and "failed over" in protect.stderr


def test_unplanned_failover_needs_force_and_starts_from_the_newest_point(lab, protected, lab_config):
    vm = protected
    vm.guest_write("vd0", 8 * MiB, MiB, 0x21)
    drtool_ok(lab_config, "checkpoint", vm.name)
    point = manifest_of(lab, vm)["points"][-1]
    lab.isolate("site-a")
    try:
        refused = drtool(lab_config, "failover", vm.name, "--yes")
        assert refused.returncode == ExitCode.REFUSED and "--force" in refused.stderr
        assert manifest_of(lab, vm)["state"] == "protected"
        report = json.loads(drtool_ok(lab_config, "failover", vm.name, "--force", "--yes", "--json").stdout)
        assert report["kind"] == "unplanned" and report["point"] == point["id"]
        assert report["run_state"] == "running"
        # site-a was cut off with its VM running: the DR host never saw it go, so how much it wrote on is unknown
        assert (report["rpo_bound"], report["rpo_seconds"]) == ("unknown", None)
        assert report["rpo_reason"].startswith("at least ") and "never saw the source go away" in report["rpo_reason"]
        overlay = replica_dir(lab, vm) / "failover" / "vd0.qcow2"
        # the DR VM starts with the point's data (written before the checkpoint), on an overlay
        assert replica_has(overlay, 8 * MiB, MiB, 0x21) and replica_has(overlay, 63 * MiB, MiB, 0x12)
        assert json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                         capture_output=True, text=True).stdout)["backing-filename"] == \
            point["images"]["vd0"]  # ... that keeps the point itself as it is
        second = drtool(lab_config, "failover", vm.name, "--force", "--yes")
        assert second.returncode == ExitCode.REFUSED and "already failed over" in second.stderr
        assert "site-a unreachable: not checked for a split brain" in status_json(lab_config, vm.name)["reason"]
    finally:
        lab.unisolate("site-a")
    lab.freeze_sshd("site-a")  # the old host accepts TCP and never answers: a whole connect timeout (10 s)
    try:
        started = time.monotonic()
        shown = status_json(lab_config, vm.name)
        elapsed = time.monotonic() - started
    finally:
        lab.thaw_sshd("site-a")
    assert shown["run_state"] == "running" and shown["protection"] == "failed-over"
    assert "site-a not checked for a split brain (no answer within 3 s)" in shown["reason"]
    assert elapsed < 9, elapsed  # 3 s for the old host, not its 10 s connect timeout (start-up and load count)


@pytest.mark.parametrize("step", PLANNED_STEPS)
def test_failover_killed_after_each_step_finishes_when_run_again(lab, protected, lab_config, step):
    vm = protected
    vm.guest_write("vd0", 20 * MiB, MiB, 0x31)
    killed = subprocess.run(
        [*_drtool_argv(lab_config), "failover", vm.name, "--yes"], env=os.environ | {FAULT_ENV: step, HOOKS_ENV: "1"},
        capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert step in manifest_of(lab, vm)["failover"]["steps"]  # (steps recorded in one write are killed together)
    drtool_ok(lab_config, "failover", vm.name, "--yes")
    entry = status_json(lab_config, vm.name)
    assert (entry["host"], entry["run_state"]) == ("site-b", "running")
    same, detail = images_identical(vm.disks["vd0"], Path(dr_tops(lab, vm)["vd0"]))
    assert same, detail


@pytest.mark.parametrize("step", PLANNED_STEPS)
def test_rollback_after_each_step_leaves_the_source_running_and_protected(lab, protected, lab_config, step):
    vm = protected
    killed = subprocess.run(
        [*_drtool_argv(lab_config), "failover", vm.name, "--yes"], env=os.environ | {FAULT_ENV: step, HOOKS_ENV: "1"},
        capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    drtool_ok(lab_config, "failover", vm.name, "--rollback", "--yes")
    entry = status_json(lab_config, vm.name)
    assert (entry["host"], entry["run_state"], entry["protection"]) == ("site-a", "running", "in-sync"), entry
    assert not (replica_dir(lab, vm) / "vm" / "qemu.pid").exists() or not _pid_alive(replica_dir(lab, vm))
    # replication works again after the rollback. If drtool relaunched the source QEMU (daemonized,
    # stdout gone), the lab cannot read qemu-io's report: write through the device all the same and
    # check the data on both sides.
    vm.hmp(f'qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x32 {40 * MiB} {MiB}"')
    assert replica_has(vm.disks["vd0"], 40 * MiB, MiB, 0x32), "the guest write did not reach the source disk"
    assert_replicas_identical(lab, vm)


def _pid_alive(rdir: Path) -> bool:
    try:
        os.kill(int((rdir / "vm" / "qemu.pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def _drtool_argv(config: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "drtool", "--config", str(config)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_test_failover_changes_nothing_and_cleans_up(lab, protected, lab_config):
    vm = protected
    drtool_ok(lab_config, "checkpoint", vm.name)
    point = manifest_of(lab, vm)["points"][-1]
    point_image = Path(point["images"]["vd0"])
    before = _digest(point_image)
    report = json.loads(drtool_ok(lab_config, "failover", vm.name, "--test", "--json").stdout)
    assert report["came_up"] and report["run_state"] == "running" and report["point"] == point["id"]
    assert report["point_chosen"] == "newest"
    shown = status_json(lab_config, vm.name)["drill"]  # status shows the running drill
    assert (shown["point"], shown["running"]) == (point["id"], True), shown
    test_dir = replica_dir(lab, vm) / "test"
    # no network: the test VM's command line has no NIC and -nic none
    cmdline = Path(f"/proc/{(test_dir / 'qemu.pid').read_text().strip()}/cmdline").read_bytes().split(b"\0")
    assert b"-nic" in cmdline and b"none" in cmdline and not any(b"netdev" in a for a in cmdline)
    # replication goes on while the drill runs
    vm.guest_write("vd0", 12 * MiB, MiB, 0x41)
    assert_replicas_identical(lab, vm)
    assert len(drtool_jobs(vm)) == 1
    assert _digest(point_image) == before, "the drill changed the point"
    points = json.loads(drtool_ok(lab_config, "points", vm.name, "--json").stdout)["points"]
    tested = {p["id"]: p["tested_at"] for p in points}
    assert tested[point["id"]] is not None, points  # the drilled point carries its tag
    busy = drtool(lab_config, "failover", vm.name, "--test")
    assert busy.returncode == ExitCode.REFUSED and "--cleanup" in busy.stderr
    drtool_ok(lab_config, "failover", vm.name, "--test", "--cleanup")
    assert not test_dir.exists() and status_json(lab_config, vm.name)["drill"] is None
    assert _digest(point_image) == before


def test_dry_run_changes_nothing(lab, protected, lab_config):
    vm = protected
    before = manifest_of(lab, vm)
    dry = json.loads(drtool_ok(lab_config, "failover", vm.name, "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["rto_seconds"] is None and dry["run_state"] == "not started"
    result = drtool_ok(lab_config, "failover", vm.name, "--dry-run")
    for step in PLANNED_STEPS:
        assert step in result.stdout
    assert "QMP stop" in result.stdout and "blockdev-snapshot-sync" in result.stdout
    assert manifest_of(lab, vm) == before
    assert vm.status() == "running"


def test_failover_bad_input(lab, protected, lab_config, tmp_path):
    vm = protected
    unknown = drtool(lab_config, "failover", vm.name, "--point", "p-nope", "--yes")
    assert unknown.returncode == ExitCode.USAGE and "no point" in unknown.stderr
    no_confirm = subprocess.run([*_drtool_argv(lab_config), "failover", vm.name], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=120)
    assert no_confirm.returncode == ExitCode.USAGE and "--yes" in no_confirm.stderr
    assert vm.status() == "running" and manifest_of(lab, vm)["state"] == "protected"
    lab.isolate("site-b")
    try:
        unreachable = drtool(lab_config, "failover", vm.name, "--yes")
        assert unreachable.returncode == ExitCode.UNREACHABLE
    finally:
        lab.unisolate("site-b")
    assert vm.status() == "running"


def test_failover_of_an_unprotected_vm_is_refused(lab, lab_vm, lab_config):
    result = drtool(lab_config, "failover", lab_vm.name, "--yes")
    assert result.returncode == ExitCode.REFUSED and "not protected" in result.stderr
    assert lab_vm.status() == "running"


def test_unplanned_failover_in_sync_mode_keeps_every_acknowledged_write(lab, lab_vm, tmp_path):
    """No checkpoint at all: a sync-mode replica holds every acknowledged write, in order."""
    config = lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b", "mode": "sync"}})
    drtool_ok(config, "protect", lab_vm.name)
    try:
        lab_vm.guest_write("vd0", 17 * MiB, MiB, 0x51)  # acknowledged: on the replica when it returns
        lab.isolate("site-a")
        try:
            report = json.loads(drtool_ok(config, "failover", lab_vm.name, "--force", "--yes", "--json").stdout)
        finally:
            lab.unisolate("site-a")
        assert report["kind"] == "unplanned" and report["point"].startswith("latest-"), report
        assert replica_has(replica_dir(lab, lab_vm) / "failover" / "vd0.qcow2", 17 * MiB, MiB, 0x51)
    finally:
        stop_started_vms(lab, lab_vm)


def test_after_a_failover_nothing_touches_the_replicas(lab, protected, lab_config):
    vm = protected
    drtool_ok(lab_config, "failover", vm.name, "--yes")
    # (checkpoint is no longer refused: it takes the point on the DR copy's own chain, test_live_points.py)
    for args in (["resync", vm.name], ["unprotect", vm.name, "--delete-replicas"], ["failover", vm.name, "--test"]):
        result = drtool(lab_config, *args)
        assert result.returncode == ExitCode.REFUSED and "failed-over" in result.stderr, (args, result.stderr)
    assert Path(dr_tops(lab, vm)["vd0"]).exists()
    assert manifest_of(lab, vm)["state"] == "failed-over"
    dry = drtool(lab_config, "failover", vm.name, "--rollback", "--dry-run")
    assert dry.returncode == ExitCode.USAGE
    assert status_json(lab_config, vm.name)["run_state"] == "running"  # the DR copy still runs
