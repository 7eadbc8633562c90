"""`drtool failover --test`: a drill that changes nothing.

The VM starts on the DR host on copy-on-write overlays of a point, with every
network device removed, while replication goes on untouched: the point's
images are only read (as backing files), never written. The point is tagged
with the time it was tested. `--cleanup` stops the test VM and removes its
overlays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from drtool.domain import Inventory, Vm
from drtool.mechanics.dr_vm import RunLayout, kill_vm, map_command_line, start_vm, vm_pid
from drtool.errors import DrtoolError, Refused, UsageError
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.remote import create_overlay, make_dirs, remove
from drtool.state.manifest import now
from drtool.state.records import DrillRecord
from drtool.state.store import require_protected, save_manifest, select_vm
from drtool.transport.connections import Reach


@dataclass(frozen=True)
class DrillResult:
    vm: str
    point: str
    came_up: bool
    seconds: float  # command start to the test VM running
    run_state: str
    qmp_socket: str


@dataclass(frozen=True)
class DrillCleanup:
    vm: str
    removed: bool


def drill_layout(vm: Vm) -> RunLayout:
    return RunLayout(vm.replica_dir / "test")


def test_failover(inventory: Inventory, reach: Reach, name: str, point_id: str | None = None) -> DrillResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    layout = drill_layout(vm)
    with reach.lock(vm):
        manifest = require_protected(load_settled_manifest(dr, vm), vm)
        if manifest.drill is not None and vm_pid(dr, layout) is not None:
            raise Refused(f"a test failover of {vm.name} is already running (point {manifest.drill.point})",
                          hint=f"remove it first: drtool failover {vm.name} --test --cleanup")
        if not manifest.points:
            raise Refused(f"{vm.name} has no point to test", hint=f"take one: drtool checkpoint {vm.name}")
        point = manifest.point(point_id) if point_id else manifest.points[-1]
        if point is None:
            raise UsageError(f"{vm.name} has no point {point_id!r}", hint=f"see drtool points {vm.name}")
        # recorded first: a drill killed before its VM runs is started again by the same command
        save_manifest(dr, vm, replace(manifest, drill=DrillRecord(point.id, now())))
        make_dirs(dr, layout.run_dir)
        disks = {}
        for disk in manifest.disks:
            overlay = str(layout.run_dir / f"{disk.device}.qcow2")
            create_overlay(dr, point.images[disk.device], overlay)
            disks[disk.source_image] = overlay
        hardware = manifest.hardware
        argv = map_command_line(hardware["argv"], disks, hardware.get("qmp_socket", str(vm.qmp_socket)), layout,
                                isolate_network=True)
        start_vm(dr, argv, layout)
        with reach.qmp_at(vm.dr_host, layout.qmp_socket, f"{vm.name} (test)") as qmp:
            qmp.execute("cont")
            state = qmp.execute("query-status")["status"]
        seconds = time.monotonic() - started
        if state != "running":
            raise DrtoolError(f"the test VM of {vm.name} started but is {state!r}, not running")
        manifest = require_protected(load_settled_manifest(dr, vm), vm)
        points = tuple(replace(p, tested_at=now()) if p.id == point.id else p for p in manifest.points)
        drill = DrillRecord(point.id, manifest.drill.started_at if manifest.drill else now(), round(seconds, 3), state)
        save_manifest(dr, vm, replace(manifest, points=points, drill=drill))
    return DrillResult(vm.name, point.id, True, seconds, state, str(layout.qmp_socket))


def cleanup_test(inventory: Inventory, reach: Reach, name: str) -> DrillCleanup:
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    layout = drill_layout(vm)
    with reach.lock(vm):
        manifest = require_protected(load_settled_manifest(dr, vm), vm, during_failover=True)
        existed = manifest.drill is not None or vm_pid(dr, layout) is not None
        kill_vm(dr, layout)
        remove(dr, layout.run_dir)
        if manifest.drill is not None:
            save_manifest(dr, vm, replace(manifest, drill=None))
    return DrillCleanup(vm.name, existed)
