"""`drtool checkpoint` and `drtool points`: consistent points in time on the DR side.

A point is consistent across all of a VM's disks: the source is paused (QMP
stop: no guest write can be issued), every mirror is waited for until it has
had nothing to copy for longer than its polling interval, the point is taken
on the DR target for all disks in one QMP transaction, and the source resumes.
The pause is measured and reported. Then, still under the VM's lock, the
points the VM's retention rules no longer keep are deleted (points.py).
Failed over after a planned failover, the VM's QEMU on the DR host takes the
point on its own chain instead, without a pause (dr_points.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from drtool.absent import absent_is_none
from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, ExitCode, Refused, RemoteCommandError, UsageError, VmUnreachable
from drtool.mechanics.dr_points import (
    define_on_tops,
    dr_copy_refusal,
    let_qemu_create_overlays,
    on_dr_copy_chain,
    take_dr_copy_point,
)
from drtool.mechanics.dr_target import TargetLayout, target_pid
from drtool.mechanics.dr_vm import dr_copy_pid, dr_copy_qmp
from drtool.mechanics.fleet import group_by
from drtool.mechanics.hardware import read_hardware_many, recheck_hardware
from drtool.mechanics.pausing import resume_own_pause, take_consistent_point, target_session
from drtool.mechanics.points import delete_points, load_settled_manifest, pin_point, runs_on_dr_copy
from drtool.retention import points_to_delete
from drtool.services.concurrent import map_concurrently
from drtool.state.kept import keep_entry
from drtool.state.manifest import Manifest, RecoveryPoint
from drtool.state.protection import Protection
from drtool.state.store import (
    load_manifest,
    require_protected,
    save_manifest,
    select_vm,
    select_vms,
)
from drtool.transport.connections import Reach, RemoteShell, batched
from drtool.transport.qmp import QmpSession

# A checkpoint pauses a running guest: it refuses to while the replicas are seeding or
# further behind than MAX_BEHIND (the pause would last the whole catch-up), and
# gives up, resuming the guest without a point, after CHECKPOINT_DRAIN_TIMEOUT.
MAX_BEHIND = 32 << 20
CHECKPOINT_DRAIN_TIMEOUT = 5.0
# VMs of one host worked at once by checkpoint --all: 16 on the loaded 2-core lab made
# QMP greetings and lock commands miss their 10 s (bench_scale.py, 64 VMs).
CHECKPOINTS_PER_HOST = 8


@dataclass(frozen=True)
class CheckpointResult:
    vm: str
    point: RecoveryPoint | None
    quiesced_seconds: float | None  # None: no point was taken
    error: str | None = None
    exit_code: ExitCode = ExitCode.OK
    deleted: tuple[str, ...] = ()  # points the VM's retention rules let go
    notes: tuple[str, ...] = ()  # what else drtool did on the way (resumed a VM it had left paused)

    def __post_init__(self) -> None:
        absent_is_none(self, "error")


@dataclass(frozen=True)
class CheckpointReport:
    results: tuple[CheckpointResult, ...]

    @property
    def exit_code(self) -> ExitCode:
        return max((r.exit_code for r in self.results), default=ExitCode.OK)


def checkpoint(inventory: Inventory, reach: Reach, names: Sequence[str] = (), all_vms: bool = False,
               keep: bool = False) -> CheckpointReport:
    """A point of each VM named (or of every protected one); keep: pin the new points against retention."""
    if not names and not all_vms:
        raise UsageError("name a VM or pass --all")
    vms = select_vms(inventory, () if all_vms else names)
    # VMs are worked at once, but on each host one guest is paused at a time: pauses
    # that overlap would share the host's CPUs and each last longer. Each host is
    # reached through one agent (one SSH channel, even for one VM: a checkpoint is
    # some twenty remote steps), and its QEMUs' command lines are read in one scan
    # for all its VMs.
    by_host = group_by(vms, lambda vm: vm.host)
    gates = {host: threading.Lock() for host in by_host}
    slots = {host: threading.BoundedSemaphore(CHECKPOINTS_PER_HOST) for host in by_host}
    with batched(reach) as through:
        scans = _Scans(through, by_host)

        def one(vm: Vm) -> CheckpointResult:
            with slots[vm.host]:
                return _checkpoint_one(inventory, through, vm, all_vms, keep, gates[vm.host], partial(scans.of, vm))

        return CheckpointReport(tuple(map_concurrently(one, vms)))


class _Scans:
    """The QEMU command lines of each host's VMs, read in one scan (hardware.read_hardware_many) when
    the first of them needs it; a host none of whose VMs gets a point is never asked."""

    def __init__(self, reach: Reach, by_host: dict[str, list[Vm]]) -> None:
        self._reach = reach
        self._by_host = by_host
        self._locks = {host: threading.Lock() for host in by_host}
        self._found: dict[str, dict[str, dict[str, Any] | RemoteCommandError]] = {}

    def of(self, vm: Vm) -> dict[str, Any]:
        with self._locks[vm.host]:
            if vm.host not in self._found:
                try:
                    self._found[vm.host] = read_hardware_many(self._reach.shell(vm.host), self._by_host[vm.host])
                except DrtoolError as err:
                    failed = RemoteCommandError(err.message)
                    self._found[vm.host] = {v.name: failed for v in self._by_host[vm.host]}
        found = self._found[vm.host][vm.name]
        if isinstance(found, RemoteCommandError):
            raise found
        return found


def _checkpoint_one(inventory: Inventory, reach: Reach, vm: Vm, skip_unprotected: bool, keep: bool = False,
                    pause_gate: AbstractContextManager[object] | None = None,
                    read_hardware: Callable[[], dict[str, Any]] | None = None) -> CheckpointResult:
    try:
        dr = reach.shell(vm.dr_host)
        with reach.lock(vm):
            manifest = load_settled_manifest(dr, vm)
            if skip_unprotected and (manifest is None or manifest.state is Protection.UNPROTECTED):
                return CheckpointResult(vm.name, None, None, "not protected: skipped")
            if manifest is not None and runs_on_dr_copy(manifest):  # a point on the DR copy's own chain
                refused = dr_copy_refusal(vm, manifest)
                if refused is None:
                    return _checkpoint_dr_copy(inventory, reach, dr, vm, manifest, keep)
                if skip_unprotected:
                    return CheckpointResult(vm.name, None, None, f"{refused.message}: skipped")
                raise refused
            manifest = require_protected(manifest, vm)
            manifest, resumed = resume_own_pause(reach, dr, vm, manifest)
            notes = (resumed,) if resumed else ()
            keep_entry(inventory, reach, vm)  # refreshed, so it follows the inventory
            try:
                target = target_session(reach, vm)
            except VmUnreachable:  # say why when the target is not running (one round trip less when it is)
                if target_pid(dr, TargetLayout(vm.replica_dir)) is None:
                    raise Refused(f"the replication target of {vm.name} is not running on {vm.dr_host}",
                                  hint=f"run drtool resync {vm.name}: it restarts the target and catches up"
                                  ) from None
                raise
            with target:
                with reach.qmp(vm) as qmp:
                    manifest, seconds = take_consistent_point(reach, qmp, target, manifest, vm, dr, "paused",
                                                              "checkpoint", max_behind=MAX_BEHIND,
                                                              drain_timeout=CHECKPOINT_DRAIN_TIMEOUT,
                                                              pause_gate=pause_gate)
                if keep:
                    manifest = pin_point(dr, vm, manifest, manifest.points[-1].id, True)
                point = manifest.points[-1]
                manifest, unmappable = recheck_hardware(reach.shell(vm.host), dr, vm, manifest, read_hardware)
                deleted, failure = apply_retention(target, dr, vm, manifest)
                failure = "; ".join(f for f in (unmappable, failure) if f)
        if failure:
            # The point stands (it is saved); exit 1 all the same: a retention that keeps
            # failing fills the DR host until replication itself stops, and cron only sees this.
            return CheckpointResult(vm.name, point, seconds, f"point {point.id} taken, but {failure}",
                                    ExitCode.FAILED, deleted, notes)
        return CheckpointResult(vm.name, point, seconds, deleted=deleted, notes=notes)
    except DrtoolError as err:
        return CheckpointResult(vm.name, None, None, str(err), err.exit_code)


def _checkpoint_dr_copy(inventory: Inventory, reach: Reach, dr: RemoteShell, vm: Vm, manifest: Manifest,
                        keep: bool) -> CheckpointResult:
    """A point taken by the failed-over VM's own QEMU on the DR host (dr_points.py); under the VM's lock."""
    if dr_copy_pid(dr, vm, manifest) is None:
        raise Refused(f"{vm.name} is {manifest.state.value} to {vm.dr_host}, but its DR copy is not running there",
                      hint=f"see drtool status {vm.name}")
    keep_entry(inventory, reach, vm)
    let_qemu_create_overlays(dr, vm, manifest)
    with dr_copy_qmp(reach, vm, manifest) as qmp:
        manifest, seconds = take_dr_copy_point(qmp, dr, vm, manifest)
        if keep:
            manifest = pin_point(dr, vm, manifest, manifest.points[-1].id, True)
        point = manifest.points[-1]
        deleted, failure = apply_retention(qmp, dr, vm, manifest)
    failure = "; ".join(f for f in (failure, define_on_tops(dr, vm, manifest)) if f)
    if failure:
        return CheckpointResult(vm.name, point, seconds, f"point {point.id} taken, but {failure}",
                                ExitCode.FAILED, deleted)
    return CheckpointResult(vm.name, point, seconds, deleted=deleted)


def apply_retention(target: QmpSession, dr: RemoteShell, vm: Vm, manifest: Manifest,
                    now: datetime | None = None) -> tuple[tuple[str, ...], str]:
    """Delete the points vm.retention does not keep; (ids deleted, what failed or "").

    Only in the plain protected state, through the replication target, or
    failed over after a planned failover, through the DR copy (`target` is then
    its session; dr_points.py); never while a drill is recorded, nor during
    other failover stages: a VM may be running on a point's images.
    """
    plain = manifest.state is Protection.PROTECTED and manifest.failover is None
    if not (plain or on_dr_copy_chain(manifest)) or manifest.drill is not None:
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


def keep_point(inventory: Inventory, reach: Reach, name: str, point_id: str, kept: bool = True) -> PointsReport:
    """`points VM --keep ID` (--unkeep ID): pin a point against retention, or let it go again."""
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    with reach.lock(vm):
        manifest = require_protected(load_settled_manifest(dr, vm), vm, during_failover=True)
        if manifest.point(point_id) is None:
            raise UsageError(f"{vm.name} has no point {point_id!r}", hint=f"see drtool points {vm.name}")
        pin_point(dr, vm, manifest, point_id, kept)
    return list_points(inventory, reach, name)


def _allocated(dr: RemoteShell, images: list[str]) -> dict[str, int]:
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
