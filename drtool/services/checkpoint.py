"""`drtool checkpoint` and `drtool points`: consistent points in time on the DR side.

A point is consistent across all of a VM's disks: the source is paused (QMP
stop: no guest write can be issued), every mirror is waited for until it has
had nothing to copy for longer than its polling interval, the point is taken
on the DR target for all disks in one QMP transaction, and the source resumes.
The pause is measured and reported. Then, still under the VM's lock, the
points the VM's retention rules no longer keep are deleted (points.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from drtool.domain import Inventory, Vm
from drtool.mechanics.dr_target import TargetLayout, target_pid
from drtool.errors import DrtoolError, ExitCode, QmpError, Refused, UsageError
from drtool.transport.locks import VmLock
from drtool.state.manifest import Manifest, RecoveryPoint, now
from drtool.mechanics.points import delete_points, point_transaction, prepare_point, take_point
from drtool.mechanics.replication import JobState, current_nodes, job_id, query_jobs, wait_drained
from drtool.retention import points_to_delete
from drtool.units import human_size
from drtool.services.concurrent import map_concurrently
from drtool.state.store import (
    load_manifest,
    load_settled_manifest,
    require_protected,
    save_manifest,
    select_vm,
)
from drtool.transport.connections import Reach
from drtool.transport.qmp import QmpSession

DRAIN_TIMEOUT = 30.0  # s the mirrors get to send what they hold while the source is paused
# A checkpoint pauses a running guest: it refuses to while the replicas are seeding or
# further behind than MAX_BEHIND (the pause would last the whole catch-up), and
# gives up, resuming the guest without a point, after CHECKPOINT_DRAIN_TIMEOUT.
MAX_BEHIND = 32 << 20
CHECKPOINT_DRAIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class CheckpointResult:
    vm: str
    point: RecoveryPoint | None
    quiesced_seconds: float
    error: str = ""
    exit_code: ExitCode = ExitCode.OK
    deleted: tuple[str, ...] = ()  # points the VM's retention rules let go


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
        raise UsageError("name a VM or pass --all")
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
            if target_pid(dr, TargetLayout(vm.replica_dir)) is None:
                raise Refused(f"the replication target of {vm.name} is not running on {vm.dr_host}",
                              hint=f"run drtool resync {vm.name}: it restarts the target and catches up")
            with target_session(reach, vm) as target:
                with reach.qmp(vm) as qmp:
                    manifest, seconds = take_consistent_point(qmp, target, manifest, vm, dr, "paused",
                                                              max_behind=MAX_BEHIND,
                                                              drain_timeout=CHECKPOINT_DRAIN_TIMEOUT)
                point = manifest.points[-1]
                deleted, failure = apply_retention(target, dr, vm, manifest)
        if failure:
            # The point stands (it is saved); exit 1 all the same: a retention that keeps
            # failing fills the DR host until replication itself stops, and cron only sees this.
            return CheckpointResult(vm.name, point, seconds, f"point {point.id} taken, but {failure}",
                                    ExitCode.FAILED, deleted)
        return CheckpointResult(vm.name, point, seconds, deleted=deleted)
    except DrtoolError as err:
        return CheckpointResult(vm.name, None, 0.0, str(err), err.exit_code)


def apply_retention(target: QmpSession, dr, vm: Vm, manifest: Manifest,  # noqa: ANN001
                    now: datetime | None = None) -> tuple[tuple[str, ...], str]:
    """Delete the points vm.retention does not keep; (ids deleted, what failed or "").

    Only in the plain protected state: never while a failover or drill is
    recorded, whose VM may be running on a point's images.
    """
    if manifest.state != "protected" or manifest.failover or manifest.drill:
        return (), ""
    doomed = points_to_delete(manifest.points, vm.retention, now or datetime.now(UTC))
    if not doomed:
        return (), ""
    saved: list[Manifest] = []

    def save(m: Manifest) -> None:
        save_manifest(dr, vm, m)
        saved.append(m)

    try:
        delete_points(target, dr, manifest, doomed, save=save)
    except DrtoolError as err:
        left = {p.id for p in saved[-1].points} if saved else set(doomed)
        return tuple(i for i in doomed if i not in left), f"deleting old points failed: {err}"
    return tuple(doomed), ""


def take_consistent_point(qmp: QmpSession, target: QmpSession, manifest: Manifest, vm: Vm, dr,  # noqa: ANN001
                          quiesce: str, *, max_behind: int | None = None,
                          drain_timeout: float = DRAIN_TIMEOUT) -> tuple[Manifest, float]:
    """Pause the source (if running), drain the mirrors, take the point, resume; (manifest, paused s).

    Everything that can be done before the pause is: the checks, the pending
    point recorded on the DR host, the snapshot transaction built. The pause
    holds only the drain and the transaction.
    """
    jobs = query_jobs(qmp, manifest)
    broken = [j for i, _ in enumerate(manifest.disks) if (j := jobs.get(job_id(i))) is None or j.broken]
    if broken or len(jobs) < len(manifest.disks):
        raise Refused(f"replication of {vm.name} is broken: a point now would not hold its latest writes",
                      hint=f"run drtool resync {vm.name} first")
    if max_behind is not None:
        refuse_when_behind(vm, list(jobs.values()), max_behind)
    nodes = current_nodes(qmp, manifest)
    # Recorded as pending before the pause: the SSH round trip does not lengthen it.
    pending = prepare_point(manifest, TargetLayout(vm.replica_dir), quiesce, 0.0)
    save_manifest(dr, vm, pending)
    try:
        actions = point_transaction(target, pending)
    except DrtoolError:
        _drop_pending(dr, vm, pending)
        raise
    running = qmp.execute("query-status")["status"] == "running"
    started = time.monotonic()
    if running:
        qmp.execute("stop")
    try:
        if not wait_drained(qmp, manifest, nodes, drain_timeout):
            _drop_pending(dr, vm, pending)
            raise DrtoolError(f"the mirrors of {vm.name} did not drain within {drain_timeout:g} s; no point taken",
                              hint=f"see drtool status {vm.name}: the DR side may be slow or stuck")
        try:
            manifest = take_point(target, pending, actions)
        except QmpError:  # refused: nothing switched, but QEMU may have left the new files behind
            _drop_pending(dr, vm, pending)
            raise
        taken_at = now()
    finally:
        if running:
            qmp.execute("cont")
        paused = time.monotonic() - started
    point = replace(manifest.points[-1], time=taken_at, quiesce_seconds=round(paused, 3))
    manifest = replace(manifest, points=(*manifest.points[:-1], point))
    save_manifest(dr, vm, manifest)
    return manifest, paused


def refuse_when_behind(vm: Vm, jobs: Sequence[JobState], max_behind: int) -> None:
    """Refuse a point that would pause the guest for a whole catch-up."""
    if any(not j.ready for j in jobs):
        raise Refused(f"{vm.name} is still seeding its replicas: a point now would pause it until the copy ends",
                      hint=f"wait until drtool status {vm.name} says in sync")
    behind = sum(j.remaining for j in jobs)
    if behind > max_behind:
        raise Refused(f"the replicas of {vm.name} are {human_size(behind)} behind: a point now would pause it "
                      f"until they catch up", hint="run the checkpoint again in a moment")


def _drop_pending(dr, vm: Vm, pending: Manifest) -> None:  # noqa: ANN001
    dr.run(["rm", "-f", "--", *pending.pending_point["tops"].values()], timeout=30)
    save_manifest(dr, vm, replace(pending, pending_point={}))


@dataclass(frozen=True)
class PointsReport:
    vm: str
    points: tuple[RecoveryPoint, ...]
    space: dict[str, int]  # point id -> bytes its images take on the DR host


def list_points(inventory: Inventory, reach: Reach, name: str) -> PointsReport:
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    # read-only, without the lock: never settle a pending point here (a checkpoint may be mid-way)
    manifest = require_protected(load_manifest(dr, vm), vm, during_failover=True)
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
