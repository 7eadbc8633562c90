"""A disk hot-added to a protected VM (defect 6): status says so, protect adds it, a drill shows its data.

The disk is added as an operator would, through QEMU's monitor (blockdev-add, device_add), and every
write goes through its device. protect replicates it without touching the first disk's mirror; a drill
of the newest point (taken before the add) would lack it, so the drill takes a point of its own, and a
drill of the old point is refused.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from drtool.errors import ExitCode
from drtool.lab.vm import qmp_execute

from .replication_helpers import drtool, drtool_jobs, drtool_ok, replica_has, status_json, wait_in_sync

pytestmark = pytest.mark.lab
MiB = 1 << 20


def hot_add_disk(vm, device: str, size: str) -> None:
    image = vm.vm_dir / f"{device}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), size], check=True)
    vm.qmp("blockdev-add", {"driver": "qcow2", "node-name": f"{device}-fmt",
                            "file": {"driver": "file", "filename": str(image)}})
    vm.qmp("device_add", {"driver": "virtio-blk-pci", "drive": f"{device}-fmt", "id": device})
    vm.disks[device] = image


def test_a_hot_added_disk_is_reported_then_added_by_protect_and_a_drill_shows_its_data(lab, lab_vm, lab_config):
    vm = lab_vm
    drtool_ok(lab_config, "protect", vm.name)
    vm.guest_write("vd0", 0, MiB, 0x11)
    wait_in_sync(vm)
    drtool_ok(lab_config, "checkpoint", vm.name)
    replicas = lab.host_dir("site-b") / "replicas" / vm.name
    old_point = json.loads((replicas / "manifest.json").read_text())["points"][-1]["id"]

    hot_add_disk(vm, "vd1", "32M")
    vm.guest_write("vd1", 0, MiB, 0x61)
    status = drtool(lab_config, "status", vm.name, "--json")
    assert status.returncode == 1, status.stdout + status.stderr
    [mirror0] = [j for j in drtool_jobs(vm) if j["device"] == "drtool-mirror0"]

    report = json.loads(drtool_ok(lab_config, "protect", vm.name, "--json").stdout)
    assert [d["device"] for d in report["disks"]] == ["vd0", "vd1"] and report["in_sync"]
    assert any("added vd1" in note for note in report["notes"]), report
    jobs = {j["device"]: j for j in drtool_jobs(vm)}
    # vd0's mirror went on as it was: the same job, not a new full copy
    assert jobs["drtool-mirror0"]["offset"] >= mirror0["offset"] and jobs["drtool-mirror1"]["ready"]
    vm.guest_write("vd1", 2 * MiB, MiB, 0x62)  # after protect: through the new mirror
    vm.guest_write("vd0", 4 * MiB, MiB, 0x13)
    wait_in_sync(vm)
    entry = status_json(lab_config, vm.name)
    assert entry["protection"] == "in-sync", entry
    again = drtool(lab_config, "protect", vm.name)
    assert again.returncode == ExitCode.REFUSED and "already protected" in again.stderr

    refused = drtool(lab_config, "failover", vm.name, "--test", "--point", old_point)
    assert refused.returncode == ExitCode.REFUSED and "before disk vd1 was protected" in refused.stderr

    drill = json.loads(drtool_ok(lab_config, "failover", vm.name, "--test", "--json").stdout)
    try:
        assert drill["point_chosen"] == "taken", drill  # the newest point lacked vd1: a fresh one was taken
        test_dir = replicas / "test"
        attached = {entry["qdev"].split("/")[3]: entry["inserted"]["file"]
                    for entry in qmp_execute(test_dir / "drtool.qmp", "query-block", None, 30)
                    if entry.get("inserted") and entry.get("qdev")}
        assert set(attached) == {"vd0", "vd1"}, attached
        assert attached["vd1"] == str(test_dir / "vd1.qcow2")
        assert replica_has(test_dir / "vd1.qcow2", 0, MiB, 0x61), "the drill's vd1 lacks what was written before protect"
        assert replica_has(test_dir / "vd1.qcow2", 2 * MiB, MiB, 0x62), "the drill's vd1 lacks a later write"
        assert replica_has(test_dir / "vd0.qcow2", 4 * MiB, MiB, 0x13)
    finally:
        drtool_ok(lab_config, "failover", vm.name, "--test", "--cleanup")
