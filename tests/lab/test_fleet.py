"""Sixteen VMs on one host, the lab's sshd at OpenSSH's default MaxSessions (10).

Every command over the fleet (status, protect --all, checkpoint --all, resync
--all) works through all of them in one run, and one VM's failure is its own:
the others get their work done and the failed one is named with what happened.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from drtool.lab import Lab, LabVm
from tests.lab.replication_helpers import drtool, drtool_ok

pytestmark = pytest.mark.lab

FLEET = 16


@pytest.fixture(scope="module")
def fleet(lab: Lab) -> Iterator[list[LabVm]]:
    vms = []
    try:
        for i in range(FLEET):
            vms.append(lab.add_vm(f"fleet{i:02d}-{lab.id}", "site-a", {"vd0": "16M"}))  # idle: no OS
        yield vms
    finally:
        for vm in vms:
            vm.stop()


def by_vm(document: dict, key: str = "results") -> dict[str, dict]:
    return {entry.get("vm") or entry.get("name"): entry for entry in document[key]}


def test_sixteen_vms_on_one_host(lab: Lab, fleet: list[LabVm], tmp_path: Path) -> None:
    config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"} for vm in fleet})
    names = {vm.name for vm in fleet}

    # status: all sixteen from one relay on site-a and one read on site-b
    result = drtool(config, "status", "--json")
    assert result.returncode == 1, result.stderr  # not protected: a problem, each VM its own
    status = by_vm(json.loads(result.stdout), "vms")
    assert set(status) == names
    assert {(s["run_state"], s["protection"], s["exit_code"]) for s in status.values()} == {
        ("running", "unprotected", 0)}

    # protect --all: sixteen targets on site-b at once, each its own NBD port
    protected = by_vm(json.loads(drtool_ok(config, "protect", "--all", "--json", timeout=600).stdout))
    assert set(protected) == names and all(o["result"]["in_sync"] for o in protected.values()), protected
    manifests = {vm.name: json.loads((lab.replica_dir(vm.name) / "manifest.json").read_text()) for vm in fleet}
    assert len({m["nbd_port"] for m in manifests.values()}) == FLEET
    again = by_vm(json.loads(drtool_ok(config, "protect", "--all", "--json").stdout))
    assert {o["skipped"] for o in again.values()} == {"protected: skipped"}  # nothing set up twice

    status = by_vm(json.loads(drtool_ok(config, "status", "--json").stdout), "vms")
    assert {s["protection"] for s in status.values()} == {"in-sync"}, status

    # checkpoint --all: a point for every VM; the guests of one host are paused one at a time
    fleet[3].guest_write("vd0", 0, 64 * 1024, 0x5A)
    points = by_vm(json.loads(drtool_ok(config, "checkpoint", "--all", "--json", timeout=300).stdout))
    assert set(points) == names and all(p["point"] for p in points.values()), points
    assert max(p["quiesced_seconds"] for p in points.values()) < 1.0

    # resync --all: two DR targets killed; those two are restarted and caught up, the rest left alone
    broken = fleet[5:7]
    for vm in broken:
        os.kill(int((lab.replica_dir(vm.name) / "target.pid").read_text()), signal.SIGKILL)
    fleet[5].guest_write("vd0", 0, 64 * 1024, 0x6B)
    resynced = by_vm(json.loads(drtool_ok(config, "resync", "--all", "--json", timeout=300).stdout))
    assert {n for n, o in resynced.items() if o["result"]["target_restarted"]} == {vm.name for vm in broken}
    assert {o["result"]["action"] for n, o in resynced.items() if n not in {vm.name for vm in broken}} == {"none"}
    status = by_vm(json.loads(drtool_ok(config, "status", "--json").stdout), "vms")
    assert {s["protection"] for s in status.values()} == {"in-sync"}, status

    # a planned failover of one of them; --all then takes its point on the DR copy's own chain
    moved = fleet[0]
    drtool_ok(config, "failover", moved.name, "--yes", "--json", timeout=300)
    status = by_vm(json.loads(drtool_ok(config, "status", "--json").stdout), "vms")
    assert status[moved.name]["protection"] == "failed-over"
    assert {s["protection"] for n, s in status.items() if n != moved.name} == {"in-sync"}

    # one VM's QEMU gone: checkpoint --all names it and why, and every other VM still gets its point
    lost = fleet[9]
    lost.kill()
    result = drtool(config, "checkpoint", "--all", "--json", timeout=300)
    assert result.returncode == 3, result.stderr
    points = by_vm(json.loads(result.stdout))
    moved_point = points[moved.name]
    assert moved_point["exit_code"] == 0 and moved_point["point"]["quiesce"] == "drained", moved_point
    assert lost.name in points[lost.name]["error"] and "QMP monitor" in points[lost.name]["error"]
    assert all(p["point"] for n, p in points.items() if n != lost.name), points
    assert f"{lost.name}: " in result.stderr
