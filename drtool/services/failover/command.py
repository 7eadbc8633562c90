"""`drtool failover`: run the VM on its DR host, planned or unplanned.

Planned (the source answers) and unplanned (it does not; --force is the
user's word that it is fenced) run in steps recorded in the DR manifest, so a
failover killed half-way is finished by running the same command again, or
undone by --rollback. A planned failover whose source dies half-way becomes
an unplanned one from its final point with --force.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from drtool.absent import absent_is_none
from drtool.domain import Inventory, Vm
from drtool.errors import Refused, UnreachableError, UsageError
from drtool.mechanics.hardware import source_qemu_alive
from drtool.mechanics.pausing import resume_own_pause
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.recovery_objectives import SourceSeen, observe_source, recovery_objectives
from drtool.mechanics.replication import query_jobs
from drtool.state.manifest import Manifest, now
from drtool.state.protection import Protection
from drtool.state.records import FailoverKind, FailoverRecord, Step
from drtool.state.store import require_protected, save_manifest, select_vm
from drtool.transport.connections import Reach

from .plan import FailoverPlan, default_start, plan
from .planned import PlannedFailover
from .unplanned import LATEST, UnplannedFailover


@dataclass(frozen=True)
class FailoverResult:
    vm: str
    kind: str
    dr_host: str
    point: str | None
    rto_seconds: float | None  # command start to the VM running on the DR host (None: a dry run)
    rpo_seconds: float | None  # 0 for planned; see rpo_bound and rpo_reason
    run_state: str
    dry_run: bool = False
    plan: FailoverPlan | None = None
    rpo_bound: str = "unknown"  # exact | upper bound | unknown
    rpo_reason: str | None = None
    rto_guest_seconds: float | None = None  # command start to the guest answering (needs a guest agent)
    rto_guest_reason: str | None = None
    start_reason: str | None = None  # unplanned: where it started and why
    notes: tuple[str, ...] = ()  # what else drtool did on the way

    def __post_init__(self) -> None:
        absent_is_none(self, "rpo_reason", "rto_guest_reason", "start_reason")


Confirm = Callable[[FailoverPlan], bool]


def failover(inventory: Inventory, reach: Reach, name: str, *, force: bool = False, point_id: str | None = None,
             dry_run: bool = False, confirm: Confirm = lambda plan: True) -> FailoverResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    with reach.lock(vm):
        manifest = load_settled_manifest(dr, vm)
        if manifest is not None and (manifest.state is Protection.FAILED_OVER or manifest.state.reverse):
            raise Refused(f"{vm.name} has already failed over: it runs on {vm.dr_host}",
                          hint=f"see drtool status {vm.name}")
        manifest = require_protected(manifest, vm, during_failover=True)
        if point_id is not None and point_id != LATEST and manifest.point(point_id) is None:
            raise UsageError(f"{vm.name} has no point {point_id!r}", hint=f"see drtool points {vm.name}")
        notes: tuple[str, ...] = ()
        if manifest.failover is not None and manifest.state is Protection.FAILING_OVER:
            record, reason = _resumed(reach, vm, manifest, manifest.failover, force, point_id)
        else:
            kind = _choose_kind(reach, vm)
            if kind is FailoverKind.PLANNED:
                manifest, resumed = resume_own_pause(reach, dr, vm, manifest)
                notes = (resumed,) if resumed else ()
            record, reason = _new_record(reach, vm, manifest, kind, force, point_id)
        the_plan = plan(vm, manifest, record.kind, record.point, reason)
        if dry_run:
            return FailoverResult(vm.name, record.kind.value, vm.dr_host, record.point, None, None, "not started",
                                  True, the_plan, start_reason=the_plan.start_reason, notes=notes)
        if not confirm(the_plan):
            raise Refused("failover not confirmed; nothing was changed")
        if manifest.failover is not record:
            if record.kind is FailoverKind.UNPLANNED:
                # what the DR host saw of the source, read before the target stops: the evidence for the RPO
                seen = observe_source(dr, manifest)
                record = replace(record, source_seen=seen.to_record() if seen else None)
            if manifest.state is not Protection.FAILING_OVER:
                manifest = manifest.transition(Protection.FAILING_OVER, f"{record.kind.value} failover started")
            manifest = replace(manifest, failover=record)
            save_manifest(dr, vm, manifest)
        run = (PlannedFailover if record.kind is FailoverKind.PLANNED else UnplannedFailover)(reach, vm, manifest)
        run.run()
        state = run.verify()
        record = run.record
        goals = recovery_objectives(run.manifest, record.kind.value, run.manifest.point(record.point or ""),
                                    SourceSeen.from_record(record.source_seen), time.monotonic() - started)
        record = replace(record, rto_seconds=goals.rto_seconds, rpo_seconds=goals.rpo_seconds,
                         rpo_bound=goals.rpo_bound, finished_at=now())
        run.save(replace(run.manifest.transition(Protection.FAILED_OVER, f"{record.kind.value} failover done"),
                         failover=record))
    return FailoverResult(vm.name, record.kind.value, vm.dr_host, record.point, goals.rto_seconds, goals.rpo_seconds,
                          state, False, the_plan, goals.rpo_bound, goals.rpo_reason, goals.rto_guest_seconds,
                          goals.rto_guest_reason, the_plan.start_reason, notes)


def _new_record(reach: Reach, vm: Vm, manifest: Manifest, kind: FailoverKind, force: bool,
                point_id: str | None) -> tuple[FailoverRecord, str]:
    if kind is FailoverKind.UNPLANNED and not force:
        raise Refused(
            f"the source of {vm.name} ({vm.host}) does not answer: this would be an unplanned failover, "
            "losing what was not yet replicated",
            hint="make sure the source VM cannot run (power it off or cut it off), then add --force",
        )
    if kind is FailoverKind.PLANNED:
        if point_id is not None:
            raise UsageError("--point is for an unplanned failover: a planned one keeps every write (RPO 0)")
        _require_healthy_replication(reach, vm, manifest)
        return FailoverRecord(kind, now(), state_before=manifest.state.value), ""
    point, reason = _start(vm, manifest, point_id)
    return FailoverRecord(kind, now(), point=point, start_reason=reason, state_before=manifest.state.value), reason


def _start(vm: Vm, manifest: Manifest, point_id: str | None) -> tuple[str, str]:
    if point_id is not None:
        return point_id, "the point asked for (--point)"
    point, reason = default_start(manifest)
    if point is None:
        raise Refused(f"{vm.name} has no consistent place to start from: {reason}",
                      hint=f"take points with drtool checkpoint {vm.name}, or pass --point latest "
                           "to start from the replicas as they are")
    return point, reason


def _resumed(reach: Reach, vm: Vm, manifest: Manifest, record: FailoverRecord, force: bool,
             point_id: str | None) -> tuple[FailoverRecord, str]:
    """The record a re-run goes on with: the same failover, or (--force) a planned one made unplanned."""
    if record.kind is FailoverKind.UNPLANNED or record.done(Step.SOURCE_STOPPED):
        if point_id is not None:
            raise UsageError(f"the failover of {vm.name} is under way from {record.point or 'its final point'}: "
                             "--point cannot change it now")
        return record, record.start_reason
    # a planned failover whose source is not stopped yet: does the source still answer?
    if _choose_kind(reach, vm) is FailoverKind.PLANNED:
        if point_id is not None:
            raise UsageError("--point is for an unplanned failover: a planned one keeps every write (RPO 0)")
        return record, ""
    if not force:
        raise Refused(f"the source of {vm.name} ({vm.host}) no longer answers: the planned failover under way "
                      "cannot finish as planned",
                      hint=f"make sure the source cannot run (power it off or cut it off), then drtool failover "
                           f"{vm.name} --force starts it from its final point (or --point)")
    if point_id is not None:
        point, reason = _start(vm, manifest, point_id)
    elif record.done(Step.FINAL_POINT) and record.point is not None:
        point, reason = record.point, "the interrupted planned failover's final point: every write up to its pause"
    else:
        point, reason = _start(vm, manifest, None)
    return FailoverRecord(FailoverKind.UNPLANNED, now(), point=point, start_reason=reason,
                          state_before=record.state_before, converted_from=record.steps), reason


def _choose_kind(reach: Reach, vm: Vm) -> FailoverKind:
    """Planned if the source QEMU is there; unplanned only if its host does not answer at all.

    A monitor that is merely busy (another QMP client) or slow must never turn
    a planned failover into an unplanned one: that would start a second copy.
    """
    try:
        shell = reach.shell(vm.host)
    except UnreachableError:
        return FailoverKind.UNPLANNED
    return FailoverKind.PLANNED if source_qemu_alive(shell, vm) else FailoverKind.UNPLANNED


def _require_healthy_replication(reach: Reach, vm: Vm, manifest: Manifest) -> None:
    """A planned failover promises RPO 0: refuse before touching anything if replication is broken."""
    with reach.qmp(vm) as qmp:
        jobs = query_jobs(qmp, manifest)
    if len(jobs) < len(manifest.disks) or any(j.broken for j in jobs.values()):
        raise Refused(f"replication of {vm.name} is broken: a planned failover now would lose writes",
                      hint=f"run drtool resync {vm.name} first")
