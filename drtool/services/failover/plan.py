"""What a failover will do, and where an unplanned one starts: decided before anything changes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from drtool.absent import absent_is_none
from drtool.domain import Vm
from drtool.mechanics.dr_target import TargetLayout
from drtool.mechanics.dr_vm import dr_run_layout
from drtool.state.manifest import Manifest, RecoveryPoint
from drtool.state.protection import Protection
from drtool.state.records import PLANNED_STEPS, UNPLANNED_STEPS, FailoverKind, Step

from .unplanned import LATEST, LATEST_QUIESCE


@dataclass(frozen=True)
class FailoverPlan:
    vm: str
    kind: str  # planned | unplanned | rollback
    steps: tuple[str, ...]  # what will be done, one line each (QMP and remote commands)
    warnings: tuple[str, ...] = ()
    start_reason: str | None = None  # unplanned: where it starts and why

    def __post_init__(self) -> None:
        absent_is_none(self, "start_reason")


class Start(NamedTuple):
    point: str | None  # a point id, LATEST, or None: nowhere consistent to start
    reason: str


def replicas_state(manifest: Manifest) -> Protection:
    """The protection state the replicas were in when replication last ran (before any failover began)."""
    if manifest.state.failing_over and manifest.failover is not None and manifest.failover.state_before:
        return Protection(manifest.failover.state_before)
    return manifest.state


def default_start(manifest: Manifest) -> Start:
    """Where an unplanned failover starts by default, and why.

    Sync mode, replicas in sync: the replicas themselves. Every acknowledged
    write is on them, in order, so they are crash-consistent and the newest
    data (RPO 0). While they are being copied into (initial seeding, any
    resync tier) blocks arrive in no order: they are no image of anything,
    and the newest point (taken in sync: its mirrors drained) is. Async mode:
    the newest point, the mirrors copying dirty blocks in no order, each disk
    on its own.
    """
    newest = manifest.points[-1].id if manifest.points else None
    state = replicas_state(manifest)
    if manifest.mode == "sync":
        if state.replicas_consistent:
            return Start(LATEST, "sync mode, replicas in sync: they hold every acknowledged write, in order")
        copying = "seeded (initial copy)" if state is Protection.SEEDING else "resynced"
        why = f"the replicas were being {copying}: not a consistent image"
        if newest is None:
            return Start(None, f"{why}, and there is no point")
        return Start(newest, f"{why}; the newest point, taken in sync, is")
    if newest is None:
        return Start(None, "async mode: the replicas are not consistent across disks, and there is no point")
    return Start(newest, "async mode: the replicas are not consistent across disks; the newest point is")


def age_seconds(point: RecoveryPoint | None) -> float | None:
    """How old a point is: the RPO of starting from it (unknown for the replicas' latest state)."""
    if point is None or point.quiesce == LATEST_QUIESCE:
        return None
    taken = datetime.fromisoformat(point.time)
    return round((datetime.now(taken.tzinfo) - taken).total_seconds(), 1)


def plan(vm: Vm, manifest: Manifest, kind: FailoverKind, point_id: str | None, start_reason: str = "") -> FailoverPlan:
    layout, run = TargetLayout(vm.replica_dir), dr_run_layout(vm.replica_dir)
    done = set(manifest.failover.steps) if manifest.failover is not None and manifest.failover.kind is kind else set()
    warnings: tuple[str, ...] = ()
    steps: tuple[Step, ...]
    if kind is FailoverKind.PLANNED:
        described = {
            Step.SOURCE_PAUSED: f"{vm.host}: QMP stop on {vm.name}",
            Step.FINAL_POINT: f"{vm.host}: wait until the mirrors have nothing to copy; {vm.dr_host}: QMP "
                              f"transaction of blockdev-snapshot-sync on {len(manifest.disks)} replica(s) "
                              "(final point)",
            Step.REPLICATION_STOPPED: f"{vm.host}: QMP block-job-cancel, blockdev-del of the NBD nodes, object-del; "
                                      f"stop the link relay; {vm.dr_host}: stop qemu-storage-daemon "
                                      f"({layout.pidfile})",
            Step.SOURCE_STOPPED: f"{vm.host}: QMP quit on {vm.name}, then wait until no QEMU process has its monitor",
            Step.DR_STARTED: f"{vm.dr_host}: start qemu-system from the manifest's command line on the replicas "
                             f"(monitor {run.qmp_socket}), then QMP cont",
        }
        steps = PLANNED_STEPS
    else:
        start = "the replicas as the DR target last wrote them" if point_id == LATEST else f"point {point_id}"
        described = {
            Step.REPLICATION_STOPPED: f"{vm.dr_host}: stop qemu-storage-daemon ({layout.pidfile})",
            Step.DR_STARTED: f"{vm.dr_host}: qemu-img create overlays on {start}; start qemu-system "
                             f"from the manifest's command line on them (monitor {run.qmp_socket}), then QMP cont",
        }
        steps = UNPLANNED_STEPS
        if point_id == LATEST:
            lost = ("in sync mode every write the source acknowledged while replication was in sync is there; "
                    "writes made while it was broken are lost")
        else:
            age = age_seconds(manifest.point(point_id or ""))
            lost = "writes after the point are lost" + (f" (it is {age:.0f} s old)" if age is not None else "")
        start_reason = f"starting from {start}" + (f" ({start_reason})" if start_reason else "")
        warnings = (
            f"the source {vm.host} does not answer; it must be fenced (powered off or cut off) before this runs",
            f"last known replication state: {replicas_state(manifest).value} at {manifest.updated_at}; "
            f"{start_reason}: {lost}",
        )
    lines = tuple(("(done) " if step in done else "") + f"{step.value}: {described[step]}" for step in steps)
    return FailoverPlan(vm.name, kind.value, lines, warnings, start_reason)
