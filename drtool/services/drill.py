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

from drtool.domain import Inventory
from drtool.errors import DrtoolError, Refused, UsageError
from drtool.mechanics.dr_vm import drill_layout, kill_vm, map_recorded, start_vm, vm_pid
from drtool.mechanics.libvirt_domain import domain_running, drill_domain_name, start_drill_domain, stop_drill_domain
from drtool.mechanics.pausing import take_consistent_point, target_session
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
    point_chosen: str = "named"  # named (--point) | newest | taken (there was none: taken first, a drill of "now")


@dataclass(frozen=True)
class DrillCleanup:
    vm: str
    removed: bool


def test_failover(inventory: Inventory, reach: Reach, name: str, point_id: str | None = None) -> DrillResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    layout = drill_layout(vm)
    with reach.lock(vm):
        manifest = require_protected(load_settled_manifest(dr, vm), vm)
        libvirt = "libvirt_xml" in manifest.hardware  # libvirt runs the drill copy (libvirt_domain.py)
        running = (domain_running(dr, vm, drill_domain_name(manifest.hardware["libvirt_xml"])) if libvirt
                   else vm_pid(dr, layout) is not None)
        if manifest.drill is not None and running:
            raise Refused(f"a test failover of {vm.name} is already running (point {manifest.drill.point})",
                          hint=f"remove it first: drtool failover {vm.name} --test --cleanup")
        taken = not manifest.points and point_id is None
        if taken:  # a drill of "now": the point a checkpoint would take
            with target_session(reach, vm) as target, reach.qmp(vm) as qmp:
                manifest, _ = take_consistent_point(reach, qmp, target, manifest, vm, dr, "paused", "drill")
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
        if libvirt:
            state = start_drill_domain(dr, vm, manifest.hardware, disks, layout.run_dir)
        else:
            argv = map_recorded(manifest.hardware, disks, layout, str(vm.qmp_socket), isolate_network=True).argv
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
    chosen = "taken" if taken else "named" if point_id else "newest"
    return DrillResult(vm.name, point.id, True, seconds, state, str(layout.qmp_socket), chosen)


def cleanup_test(inventory: Inventory, reach: Reach, name: str) -> DrillCleanup:
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    layout = drill_layout(vm)
    with reach.lock(vm):
        manifest = require_protected(load_settled_manifest(dr, vm), vm, during_failover=True)
        existed = manifest.drill is not None or vm_pid(dr, layout) is not None
        kill_vm(dr, layout)
        if "libvirt_xml" in manifest.hardware:
            existed = stop_drill_domain(dr, vm, manifest.hardware) or existed
        remove(dr, layout.run_dir)
        if manifest.drill is not None:
            save_manifest(dr, vm, replace(manifest, drill=None))
    return DrillCleanup(vm.name, existed)
