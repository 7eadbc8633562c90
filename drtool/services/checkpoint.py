"""`drtool checkpoint` and `drtool points`: consistent points in time on the DR side.

A point is consistent across all of a VM's disks: the source is paused (QMP
stop: no guest write can be issued), every mirror is waited for until it has
had nothing to copy for longer than its polling interval, the point is taken
on the DR target for all disks in one QMP transaction, and the source resumes.
The pause is measured and reported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from drtool.domain import Inventory, Vm
from drtool.dr_target import TargetLayout
from drtool.errors import DrtoolError, ExitCode, Refused
from drtool.locks import VmLock
from drtool.manifest import Manifest, RecoveryPoint
from drtool.points import prepare_point, take_point
from drtool.replication import job_id, query_jobs, wait_quiet
from drtool.services.concurrent import map_concurrently
from drtool.services.state import load_settled_manifest, require_protected, save_manifest, select_vm
from drtool.transport.connections import Reach
from drtool.transport.qmp import QmpSession

DRAIN_TIMEOUT = 30.0  # s the mirrors get to send what they hold while the source is paused


@dataclass(frozen=True)
class CheckpointResult:
    vm: str
    point: RecoveryPoint | None
    quiesced_seconds: float
    error: str = ""
    exit_code: ExitCode = ExitCode.OK


@dataclass(frozen=True)
class CheckpointReport:
    results: tuple[CheckpointResult, ...]

    @property
    def exit_code(self) -> ExitCode:
        return max((r.exit_code for r in self.results), default=ExitCode.OK)


def target_session(reach: Reach, vm: Vm) -> QmpSession:
    """drtool's QMP session to the VM's replication target on the DR host."""
    return reach.qmp_at(vm.dr_host, TargetLayout(vm.replica_dir).qmp_socket, f"{vm.name} replication target")


def checkpoint(inventory: Inventory, reach: Reach, names: Sequence[str] = (), all_vms: bool = False) -> CheckpointReport:
    if not names and not all_vms:
        raise DrtoolError("name a VM or pass --all")
    vms = [select_vm(inventory, n) for n in dict.fromkeys(names)]
    if all_vms:
        vms = [inventory.vms[n] for n in sorted(inventory.vms)]
    return CheckpointReport(tuple(map_concurrently(lambda vm: _checkpoint_one(reach, vm, all_vms), vms)))


def _checkpoint_one(reach: Reach, vm: Vm, skip_unprotected: bool) -> CheckpointResult:
    try:
        dr = reach.shell(vm.dr_host)
        with VmLock(dr, vm.name):
            manifest = load_settled_manifest(dr, vm)
            if skip_unprotected and (manifest is None or manifest.state == "unprotected"):
                return CheckpointResult(vm.name, None, 0.0, "not protected: skipped")
            manifest = require_protected(manifest, vm)
            with reach.qmp(vm) as qmp, target_session(reach, vm) as target:
                manifest, seconds = take_consistent_point(qmp, target, manifest, vm, dr, "paused")
        return CheckpointResult(vm.name, manifest.points[-1], seconds)
    except DrtoolError as err:
        return CheckpointResult(vm.name, None, 0.0, str(err), err.exit_code)


def take_consistent_point(qmp: QmpSession, target: QmpSession, manifest: Manifest, vm: Vm, dr,  # noqa: ANN001
                          quiesce: str) -> tuple[Manifest, float]:
    """Pause the source (if running), drain the mirrors, take the point, resume; (manifest, paused s)."""
    jobs = query_jobs(qmp, manifest)
    broken = [j for i, _ in enumerate(manifest.disks) if (j := jobs.get(job_id(i))) is None or j.broken]
    if broken or len(jobs) < len(manifest.disks):
        raise Refused(f"replication of {vm.name} is broken: a point now would not hold its latest writes",
                      hint=f"run drtool resync {vm.name} first")
    running = qmp.execute("query-status")["status"] == "running"
    started = time.monotonic()
    if running:
        qmp.execute("stop")
    try:
        if not wait_quiet(qmp, manifest, DRAIN_TIMEOUT):
            raise DrtoolError(f"the mirrors of {vm.name} did not drain within {DRAIN_TIMEOUT:g} s; no point taken")
        pending = prepare_point(manifest, TargetLayout(vm.replica_dir), quiesce, 0.0)
        save_manifest(dr, vm, pending)
        manifest = take_point(target, pending)
    finally:
        if running:
            qmp.execute("cont")
        paused = time.monotonic() - started
    point = replace(manifest.points[-1], quiesce_seconds=round(paused, 3))
    manifest = replace(manifest, points=(*manifest.points[:-1], point))
    save_manifest(dr, vm, manifest)
    return manifest, paused


@dataclass(frozen=True)
class PointsReport:
    vm: str
    points: tuple[RecoveryPoint, ...]
    space: dict[str, int]  # point id -> bytes its images take on the DR host


def list_points(inventory: Inventory, reach: Reach, name: str) -> PointsReport:
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    manifest = require_protected(load_settled_manifest(dr, vm), vm)
    images = [img for p in manifest.points for img in p.images.values()]
    sizes = _allocated(dr, images)
    space = {p.id: sum(sizes.get(img, 0) for img in p.images.values()) for p in manifest.points}
    return PointsReport(vm.name, manifest.points, space)


def _allocated(dr, images: list[str]) -> dict[str, int]:  # noqa: ANN001
    """Bytes each file takes on disk (du), the frozen image of a point being its own delta."""
    if not images:
        return {}
    result = dr.run(["du", "-B1", "--", *images], check=False, timeout=60)
    sizes = {}
    for line in result.out.splitlines():
        size, _, path = line.partition("\t")
        if size.isdigit():
            sizes[path] = int(size)
    return sizes
