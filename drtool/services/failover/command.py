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
from drtool.errors import HostUnreachable, Refused, UnreachableError, UsageError
from drtool.mechanics.hardware import source_qemu_alive
from drtool.mechanics.migration import Figures
from drtool.mechanics.pausing import resume_own_pause
from drtool.mechanics.points import lacking_note, load_settled_manifest, missing_disks
from drtool.mechanics.recovery_objectives import SourceSeen, observe_source, recovery_objectives
from drtool.mechanics.replication import query_jobs
from drtool.state.manifest import Manifest, now
from drtool.state.protection import Protection
from drtool.state.records import FailoverKind, FailoverRecord, Step
from drtool.state.store import require_protected, save_manifest, select_vm
from drtool.transport.connections import Reach

from .plan import FailoverPlan, default_start, plan
from .planned import PlannedFailover
from .sessions import FailoverSessions
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
    live: Figures | None = None  # --live: the migration's downtime, time and bytes

    def __post_init__(self) -> None:
        absent_is_none(self, "rpo_reason", "rto_guest_reason", "start_reason")


Confirm = Callable[[FailoverPlan], bool]


def failover(inventory: Inventory, reach: Reach, name: str, *, force: bool = False, point_id: str | None = None,
             dry_run: bool = False, confirm: Confirm = lambda plan: True) -> FailoverResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    with reach.lock(vm), FailoverSessions(reach, vm) as sessions:
        # A planned failover needs both monitors: opened ahead of need (a monitor serves one client at a
        # time, so only under the VM's lock, and every use of the source's goes through `sessions`). The
        # source's only if the failover may be planned: its host may be the one that is gone.
        sessions.prefetch(sessions.TARGET)
        manifest = load_settled_manifest(dr, vm)
        if manifest is None or manifest.failover is None or manifest.failover.kind is FailoverKind.PLANNED:
            sessions.prefetch(sessions.SOURCE)
        if manifest is not None and (manifest.state is Protection.FAILED_OVER or manifest.state.reverse):
            raise Refused(f"{vm.name} has already failed over: it runs on {vm.dr_host}",
                          hint=f"see drtool status {vm.name}")
        manifest = require_protected(manifest, vm, during_failover=True)
        if point_id is not None and point_id != LATEST and manifest.point(point_id) is None:
            raise UsageError(f"{vm.name} has no point {point_id!r}", hint=f"see drtool points {vm.name}")
        notes: tuple[str, ...] = ()
        if manifest.failover is not None and manifest.state is Protection.FAILING_OVER:
            if manifest.failover.kind is FailoverKind.LIVE:
                raise Refused(f"a live failover of {vm.name} is under way",
                              hint=f"finish it with drtool failover {vm.name} --live, or undo it with --rollback")
            record, reason = _resumed(reach, sessions, vm, manifest, manifest.failover, force, point_id)
        else:
            kind = _choose_kind(reach, sessions, vm)
            if kind is FailoverKind.PLANNED:
                with sessions.source() as qmp:
                    manifest, resumed = resume_own_pause(reach, dr, vm, manifest, qmp)
                notes = (resumed,) if resumed else ()
            record, reason = _new_record(sessions, vm, manifest, kind, force, point_id)
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
            if record.kind is FailoverKind.UNPLANNED:  # a planned one writes it with its pause, before the stop
                save_manifest(dr, vm, manifest)
        steps = PlannedFailover if record.kind is FailoverKind.PLANNED else UnplannedFailover
        run = steps(reach, vm, manifest, sessions)
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


def _new_record(sessions: FailoverSessions, vm: Vm, manifest: Manifest, kind: FailoverKind, force: bool,
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
        _require_healthy_replication(sessions, vm, manifest)
        return FailoverRecord(kind, now(), state_before=manifest.state.value), ""
    point, reason = _start(vm, manifest, point_id)
    return FailoverRecord(kind, now(), point=point, start_reason=reason, state_before=manifest.state.value), reason


def _start(vm: Vm, manifest: Manifest, point_id: str | None) -> tuple[str, str]:
    """Where an unplanned failover starts, and why; a point without some of the VM's disks only when named.

    A point taken before a disk was added to the protection holds nothing of
    that disk: the DR copy would start without it. That is never a default,
    only what the user asks for with --point, and the plan and result say it.
    """
    asked = point_id is not None
    if point_id is None:
        default, reason = default_start(manifest)
        if default is None:
            raise Refused(f"{vm.name} has no consistent place to start from: {reason}",
                          hint=f"take points with drtool checkpoint {vm.name}, or pass --point latest "
                               "to start from the replicas as they are")
        point_id = default
    else:
        reason = "the point asked for (--point)"
    point = manifest.point(point_id)
    missing = missing_disks(manifest, point) if point is not None else ()
    if missing and point is not None:
        if not asked:
            raise Refused(f"{vm.name}'s newest consistent point lacks disks: {lacking_note(missing, point)}; "
                          "a DR copy from it would run without them",
                          hint=f"to start without them, name it: drtool failover {vm.name} --force --point "
                               f"{point.id}" + (" (or --point latest: the replicas as they are)"
                                                if manifest.mode == "sync" else ""))
        reason += f"; it starts WITHOUT {', '.join(missing)}: {lacking_note(missing, point)}"
    return point_id, reason


def _resumed(reach: Reach, sessions: FailoverSessions, vm: Vm, manifest: Manifest, record: FailoverRecord,
             force: bool, point_id: str | None) -> tuple[FailoverRecord, str]:
    """The record a re-run goes on with: the same failover, or (--force) a planned one made unplanned."""
    if record.kind is FailoverKind.UNPLANNED or record.done(Step.SOURCE_STOPPED):
        if point_id is not None:
            raise UsageError(f"the failover of {vm.name} is under way from {record.point or 'its final point'}: "
                             "--point cannot change it now")
        return record, record.start_reason
    # a planned failover whose source is not stopped yet: does the source still answer? Past stopping
    # replication, a source host that answers without the QEMU is one the failover quit (killed before it
    # recorded that), or one that died paused after its final point: finishing as planned loses nothing.
    kind = _choose_kind(reach, sessions, vm)
    if kind is FailoverKind.PLANNED or (record.done(Step.REPLICATION_STOPPED) and _host_answers(reach, vm)):
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


def _choose_kind(reach: Reach, sessions: FailoverSessions, vm: Vm) -> FailoverKind:
    """Planned if the source QEMU is there; unplanned if its host does not answer or it has no such QEMU.

    A monitor that answers says so at once. One that does not is looked for
    among the host's processes: a monitor that is merely busy (another QMP
    client) or slow must never turn a planned failover into an unplanned one,
    which would start a second copy.
    """
    try:
        with sessions.source() as qmp:
            qmp.execute("query-status")
        return FailoverKind.PLANNED
    except HostUnreachable:
        return FailoverKind.UNPLANNED
    except UnreachableError:
        pass
    try:
        shell = reach.shell(vm.host)
    except UnreachableError:
        return FailoverKind.UNPLANNED
    return FailoverKind.PLANNED if source_qemu_alive(shell, vm) else FailoverKind.UNPLANNED


def _host_answers(reach: Reach, vm: Vm) -> bool:
    try:
        reach.shell(vm.host)
    except UnreachableError:
        return False
    return True


def _require_healthy_replication(sessions: FailoverSessions, vm: Vm, manifest: Manifest) -> None:
    """A planned failover promises RPO 0: refuse before touching anything if replication is broken."""
    with sessions.source() as qmp:
        jobs = query_jobs(qmp, manifest)
    if len(jobs) < len(manifest.disks) or any(j.broken for j in jobs.values()):
        raise Refused(f"replication of {vm.name} is broken: a planned failover now would lose writes",
                      hint=f"run drtool resync {vm.name} first")
