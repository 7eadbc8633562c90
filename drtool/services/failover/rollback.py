"""`drtool failover --rollback`: undo a planned failover, finished or not, while the source host exists.

The source runs again where it ran; the replicas are set back to the final
point (what the source held when it stopped) and the DR target restarts on
them. Replication then catches up with `drtool resync`, which the command line
runs right after.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from drtool.domain import Inventory, Vm
from drtool.errors import Refused, UnreachableError
from drtool.mechanics.added_disks import with_added_disks
from drtool.mechanics.dr_target import TargetLayout, start_target, target_pid
from drtool.mechanics.dr_vm import dr_run_layout, kill_vm, vm_pid
from drtool.mechanics.libvirt_domain import remove_dr_domain, restore_source_autostart, start_source_domain_paused
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.remote import create_overlay
from drtool.state.ages import ROLLBACK_FORCE_AFTER, dr_copy_age, human_age
from drtool.state.manifest import Manifest
from drtool.state.protection import Protection
from drtool.state.records import FailoverKind, FailoverRecord, Step
from drtool.state.store import save_manifest, select_vm
from drtool.transport.connections import Reach

from .command import Confirm
from .live import live_rollback_or_refusal, rollback_live
from .plan import FailoverPlan


@dataclass(frozen=True)
class RollbackResult:
    vm: str
    undone: tuple[str, ...]
    source_state: str


def rollback(inventory: Inventory, reach: Reach, name: str, *, force: bool = False,
             confirm: Confirm = lambda plan: True) -> RollbackResult:
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    src = reach.shell(vm.host)  # rollback needs the source host: unreachable is exit 3
    with reach.lock(vm):
        manifest = load_settled_manifest(dr, vm)
        if manifest is None or not manifest.state.failing_over or manifest.failover is None:
            raise Refused(f"{vm.name} has no failover to roll back")
        record = manifest.failover
        if manifest.state.reverse:
            raise Refused(f"{vm.name} is {manifest.state.value} (drtool recover): a rollback would discard it",
                          hint=f"finish with drtool recover {vm.name} --failback")
        if record.kind is FailoverKind.UNPLANNED:
            raise Refused(f"{vm.name}'s {record.kind.value} failover cannot be rolled back",
                          hint="after an unplanned failover, fail back with a new protection from the DR host")
        taken_there = points_after(manifest, record.point)
        if record.kind is FailoverKind.PLANNED and taken_there:
            raise Refused(f"{vm.name} has points taken on its DR copy since the failover ({', '.join(taken_there)}): "
                          "a rollback would discard what they hold",
                          hint=f"come home without losing them: drtool recover {vm.name} --reprotect, then --failback")
        # a live one that ran on the DR host can only go home (recover): refused before the plan asks anything
        live = live_rollback_or_refusal(reach, vm, manifest) if record.kind is FailoverKind.LIVE else None
        steps = tuple(s.value for s in record.steps)
        libvirt_xml = manifest.hardware.get("libvirt_xml") if vm.libvirt_domain is not None else None
        the_plan = FailoverPlan(vm.name, "rollback", tuple(f"undo {s}" for s in reversed(steps)),
                                (discarded_writes(vm, record, force),))
        if not confirm(the_plan):
            raise Refused("rollback not confirmed; nothing was changed")
        if live is not None:
            undone, state = rollback_live(live)
            return RollbackResult(vm.name, undone, state)
        if record.done(Step.REPLICATION_STOPPED) and not _source_alive(reach, vm):
            # first, before the DR copy is touched: if the source cannot come back, nothing is lost.
            # It starts paused (-S) and runs only once the DR copy is gone.
            if libvirt_xml is not None:  # the domain libvirt ran, as it was defined
                start_source_domain_paused(src, vm, libvirt_xml)
            else:
                src.run(_relaunch_argv(manifest), timeout=60)
        run_layout = dr_run_layout(vm.replica_dir)
        if libvirt_xml is not None:  # the DR host's libvirt runs the copy: destroyed and undefined
            dr_vm_ran = remove_dr_domain(dr, vm, libvirt_xml) or record.done(Step.DR_STARTED)
        else:
            dr_vm_ran = record.done(Step.DR_STARTED) or vm_pid(dr, run_layout) is not None
            kill_vm(dr, run_layout)
        final = manifest.point(record.point or "") if record.done(Step.FINAL_POINT) else None
        if dr_vm_ran and final is not None:
            # the DR VM wrote into the tops above the final point (the target is stopped by
            # then): start them anew, empty, so the replicas equal the source as it stopped
            for disk in manifest.disks:
                create_overlay(dr, final.images[disk.device], disk.replica_image)
        layout = TargetLayout(vm.replica_dir)
        if target_pid(dr, layout) is None:
            start_target(dr, manifest, layout)
        with reach.qmp(vm) as qmp:
            paused_by_drtool = record.source_was in (None, "running") or manifest.source_pause is not None
            if qmp.execute("query-status")["status"] != "running" and paused_by_drtool:
                qmp.execute("cont")
            state = str(qmp.execute("query-status")["status"])
        if libvirt_xml is not None and vm.libvirt_domain is not None:
            restore_source_autostart(src, vm)  # as it was before the failover disabled it
        save_manifest(dr, vm, replace(manifest.transition(Protection.PROTECTED, "failover rolled back"),
                                      failover=None, source_pause=None))
    return RollbackResult(vm.name, tuple(reversed(steps)), state)


def points_after(manifest: Manifest, point_id: str | None) -> tuple[str, ...]:
    """The points listed after the failover's final point: taken on the DR copy (dr_points.py).

    Retention deletes the final point only once a newer one exists: then the newest at least was.
    """
    ids = [p.id for p in manifest.points]
    if point_id is None or not ids:
        return ()
    return tuple(ids[ids.index(point_id) + 1:]) if point_id in ids else (ids[-1],)


def discarded_writes(vm: Vm, record: FailoverRecord, force: bool) -> str:
    """What a rollback discards, said with its age; refused past ROLLBACK_FORCE_AFTER without --force."""
    age = dr_copy_age(record)
    if age is None:
        return "the VM never ran on the DR host: nothing it wrote there is discarded"
    if age > ROLLBACK_FORCE_AFTER and not force:
        raise Refused(f"{vm.name} has run on {vm.dr_host} for {human_age(age)}: a rollback discards everything "
                      "it wrote there since", hint="add --force to discard it, or keep the DR copy")
    return f"writes made by the VM on the DR host over the last {human_age(age)} are discarded"


def _source_alive(reach: Reach, vm: Vm) -> bool:
    try:
        with reach.qmp(vm) as qmp:
            qmp.execute("query-status")
        return True
    except UnreachableError:
        return False


def _relaunch_argv(manifest: Manifest) -> list[str]:
    """The source's own command line, paused (-S) and daemonized, to start it again where it ran."""
    argv = [a for a in manifest.hardware["argv"] if a not in ("-daemonize", "-S")]
    return [*with_added_disks(manifest, argv), "-S", "-daemonize"]
