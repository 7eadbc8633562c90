"""`drtool failover`: run the VM on its DR host, planned or unplanned, and undo it.

Planned (the source answers), in steps, each recorded in the DR manifest as it
completes so that a failover killed half-way is finished by running the same
command again, or undone by --rollback:

  source-paused        QMP stop on the source: the guest issues no more writes
  final-point          the mirrors drained, a point of every disk (RPO 0)
  replication-stopped  jobs cancelled (never completed: the source keeps its disks),
                       NBD nodes and the link relay gone, the DR target stopped
  source-stopped       the source QEMU quits: never two running copies
  dr-started           the VM starts on the DR host on the replicas, above the final point

Unplanned (the source does not answer) needs --force, the user's word that
the source is fenced. It starts the VM from the newest point (or --point) on
writable overlays, so the point itself is kept.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import datetime
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from drtool.domain import Inventory, Vm
from drtool.mechanics.dr_target import TargetLayout, start_target, stop_target, target_pid
from drtool.mechanics.dr_vm import RunLayout, kill_vm, map_command_line, start_vm, vm_pid
from drtool.errors import DrtoolError, QmpError, Refused, RemoteCommandError, UnreachableError, UsageError
from drtool.mechanics.hardware import read_hardware
from drtool.mechanics.link import stop_link_and_target
from drtool.mechanics.remote import create_overlay, make_dirs
from drtool.transport.locks import VmLock
from drtool.state.ages import ROLLBACK_FORCE_AFTER, dr_copy_age, human_age
from drtool.state.manifest import Manifest, RecoveryPoint, now
from drtool.mechanics.replication import cancel_mirrors, detach_target, query_jobs
from drtool.services.checkpoint import take_consistent_point, target_session
from drtool.state.store import load_settled_manifest, require_protected, save_manifest, select_vm
from drtool.transport.connections import Reach
from drtool.transport.qmp import QmpSession

PLANNED_STEPS = ("source-paused", "final-point", "replication-stopped", "source-stopped", "dr-started")
UNPLANNED_STEPS = ("replication-stopped", "dr-started")
FAILED_OVER = "failed-over"
FAILING_OVER = "failing-over"
# Test hook: SIGKILL drtool right after this step is recorded. Armed only together with
# DRTOOL_TEST_HOOKS=1, so a stray variable in a production environment does nothing.
FAULT_ENV = "DRTOOL_FAULT_AFTER_STEP"
HOOKS_ENV = "DRTOOL_TEST_HOOKS"


@dataclass(frozen=True)
class FailoverPlan:
    vm: str
    kind: str  # planned | unplanned | rollback
    steps: tuple[str, ...]  # what will be done, one line each (QMP and remote commands)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class FailoverResult:
    vm: str
    kind: str
    dr_host: str
    point: str | None
    rto_seconds: float  # command start to the VM running on the DR host
    rpo_seconds: float | None  # 0 for planned; the point's age when unplanned
    run_state: str
    dry_run: bool = False
    plan: FailoverPlan | None = None


Confirm = Callable[[FailoverPlan], bool]


def dr_run_layout(vm: Vm) -> RunLayout:
    return RunLayout(vm.replica_dir / "vm")


def failover(inventory: Inventory, reach: Reach, name: str, *, force: bool = False, point_id: str | None = None,
             dry_run: bool = False, confirm: Confirm = lambda plan: True) -> FailoverResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    with VmLock(dr, vm.name):
        manifest = load_settled_manifest(dr, vm)
        if manifest is not None and manifest.state == FAILED_OVER:
            raise Refused(f"{vm.name} has already failed over: it runs on {vm.dr_host}",
                          hint=f"see drtool status {vm.name}")
        manifest = require_protected(manifest, vm, during_failover=True)
        resuming = manifest.state == FAILING_OVER
        kind = manifest.failover.get("kind") if resuming else _choose_kind(reach, vm)
        if kind == "unplanned" and not force and not resuming:
            raise Refused(
                f"the source of {vm.name} ({vm.host}) does not answer: this would be an unplanned failover, "
                "losing what was not yet replicated",
                hint="make sure the source VM cannot run (power it off or cut it off), then add --force",
            )
        if point_id is not None and point_id != LATEST and manifest.point(point_id) is None:
            raise UsageError(f"{vm.name} has no point {point_id!r}", hint=f"see drtool points {vm.name}")
        if kind == "planned" and point_id is not None:
            raise UsageError("--point is for an unplanned failover: a planned one keeps every write (RPO 0)")
        if kind == "unplanned" and not resuming:
            point_id = point_id or default_start(manifest)
            if point_id is None:
                raise Refused(f"{vm.name} has no point to start from and its async replica is not consistent",
                              hint=f"take points with drtool checkpoint {vm.name}, or pass --point latest "
                                   "to start from the replica as it is")
        if kind == "planned" and not resuming:
            _require_healthy_replication(reach, vm, manifest)
        plan = _plan(vm, manifest, kind, point_id)
        if dry_run:
            return FailoverResult(vm.name, kind, vm.dr_host, point_id, 0.0, None, "not started", True, plan)
        if not confirm(plan):
            raise Refused("failover not confirmed; nothing was changed")
        if not resuming:
            manifest = replace(manifest.with_state(FAILING_OVER, f"{kind} failover started"),
                               failover={"kind": kind, "started_at": now(), "steps": [], "point": point_id})
            save_manifest(dr, vm, manifest)
        run = _Run(reach, vm, manifest)
        if kind == "planned":
            run.planned()
        else:
            run.unplanned()
        state = run.verify()
        point = run.manifest.failover.get("point")
        rpo = 0.0 if kind == "planned" else _age_seconds(run.manifest.point(point)) if point else None
        rto = time.monotonic() - started
        run.save(run.manifest.with_state(FAILED_OVER, f"{kind} failover done"),
                 failover=run.manifest.failover | {"rto_seconds": round(rto, 3), "rpo_seconds": rpo,
                                                   "finished_at": now()})
    return FailoverResult(vm.name, kind, vm.dr_host, point, rto, rpo, state, False, plan)


LATEST = "latest"  # --point latest: the replicas as the DR target last wrote them


def default_start(manifest: Manifest) -> str | None:
    """Where an unplanned failover starts by default.

    Sync mode: the replicas themselves. Every acknowledged write is on them, in
    order, so they are crash-consistent and the newest data (RPO 0). Async
    mode: the newest point. The mirrors copy dirty blocks in no particular
    order and each disk on its own, so the replicas' latest state need not be
    consistent; a point is.
    """
    if manifest.mode == "sync":
        return LATEST
    return manifest.points[-1].id if manifest.points else None


def _choose_kind(reach: Reach, vm: Vm) -> str:
    """Planned if the source QEMU is there; unplanned only if its host does not answer at all.

    A monitor that is merely busy (another QMP client) or slow must never turn
    a planned failover into an unplanned one: that would start a second copy.
    """
    try:
        shell = reach.shell(vm.host)
    except UnreachableError:
        return "unplanned"
    return "planned" if source_qemu_alive(shell, vm) else "unplanned"


def source_qemu_alive(shell, vm: Vm) -> bool:  # noqa: ANN001
    """Whether a QEMU process with the VM's monitor on its command line runs on the source host."""
    try:
        read_hardware(shell, vm.qmp_socket)
        return True
    except RemoteCommandError as err:
        if "no QEMU process" in err.message:
            return False
        raise


def _require_healthy_replication(reach: Reach, vm: Vm, manifest: Manifest) -> None:
    """A planned failover promises RPO 0: refuse before touching anything if replication is broken."""
    with reach.qmp(vm) as qmp:
        jobs = query_jobs(qmp, manifest)
    if len(jobs) < len(manifest.disks) or any(j.broken for j in jobs.values()):
        raise Refused(f"replication of {vm.name} is broken: a planned failover now would lose writes",
                      hint=f"run drtool resync {vm.name} first")


def _age_seconds(point: RecoveryPoint | None) -> float | None:
    """How old a point is: the RPO of starting from it (unknown for the replicas' latest state)."""
    if point is None or point.quiesce == "unplanned-latest":
        return None
    taken = datetime.fromisoformat(point.time)
    return round((datetime.now(taken.tzinfo) - taken).total_seconds(), 1)


def _plan(vm: Vm, manifest: Manifest, kind: str, point_id: str | None) -> FailoverPlan:
    layout, run = TargetLayout(vm.replica_dir), dr_run_layout(vm)
    done = set(manifest.failover.get("steps", ()))
    lines = []
    if kind == "planned":
        described = {
            "source-paused": f"{vm.host}: QMP stop on {vm.name}",
            "final-point": f"{vm.host}: wait until the mirrors have nothing to copy; {vm.dr_host}: QMP transaction "
                           f"of blockdev-snapshot-sync on {len(manifest.disks)} replica(s) (final point)",
            "replication-stopped": f"{vm.host}: QMP block-job-cancel, blockdev-del of the NBD nodes, object-del; "
                                   f"stop the socat link; {vm.dr_host}: stop qemu-storage-daemon ({layout.pidfile})",
            "source-stopped": f"{vm.host}: QMP quit on {vm.name}, then wait until no QEMU process has its monitor",
            "dr-started": f"{vm.dr_host}: start qemu-system from the manifest's command line on the replicas "
                          f"(monitor {run.qmp_socket}), then QMP cont",
        }
        steps = PLANNED_STEPS
        warnings: tuple[str, ...] = ()
    else:
        chosen = point_id or manifest.failover.get("point")
        start = ("the replicas as the DR target last wrote them" if chosen == LATEST else f"point {chosen}")
        described = {
            "replication-stopped": f"{vm.dr_host}: stop qemu-storage-daemon ({layout.pidfile})",
            "dr-started": f"{vm.dr_host}: qemu-img create overlays on {start}; start qemu-system "
                          f"from the manifest's command line on them (monitor {run.qmp_socket}), then QMP cont",
        }
        steps = UNPLANNED_STEPS
        if chosen == LATEST:
            lost = ("in sync mode every write the source acknowledged while replication was in sync is there; "
                    "writes made while it was broken are lost")
        else:
            age = _age_seconds(manifest.point(chosen or ""))
            lost = "writes after the point are lost" + (f" (it is {age:.0f} s old)" if age is not None else "")
        warnings = (
            f"the source {vm.host} does not answer; it must be fenced (powered off or cut off) before this runs",
            f"last known replication state: {manifest.state} at {manifest.updated_at}; starting from {start}: {lost}",
        )
    for step in steps:
        lines.append(("(done) " if step in done else "") + f"{step}: {described[step]}")
    return FailoverPlan(vm.name, kind, tuple(lines), warnings)


class _Run:
    """One failover's steps against the hosts, each recorded as it completes."""

    def __init__(self, reach: Reach, vm: Vm, manifest: Manifest) -> None:
        self.reach, self.vm, self.manifest = reach, vm, manifest
        self.dr = reach.shell(vm.dr_host)
        self.layout = TargetLayout(vm.replica_dir)
        self.run_layout = dr_run_layout(vm)
        self._step_started = time.monotonic()

    def save(self, manifest: Manifest, **changes: object) -> None:
        self.manifest = replace(manifest, **changes) if changes else manifest
        save_manifest(self.dr, self.vm, self.manifest)

    def done(self, step: str) -> bool:
        return step in self.manifest.failover.get("steps", ())

    def record(self, step: str, **extra: object) -> None:
        took = self.manifest.failover.get("step_seconds", {}) | {step: round(time.monotonic() - self._step_started, 3)}
        self._step_started = time.monotonic()
        failover = self.manifest.failover | {"steps": [*self.manifest.failover.get("steps", []), step],
                                             "step_seconds": took} | extra
        self.save(self.manifest, failover=failover)
        if os.environ.get(HOOKS_ENV) == "1" and os.environ.get(FAULT_ENV) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def planned(self) -> None:
        try:
            self._planned_steps()
        except BaseException:
            if self.done("source-paused") and not self.done("source-stopped"):
                # never leave production paused by a failover that could not finish
                with contextlib.suppress(Exception), self.reach.qmp(self.vm) as qmp:
                    if self.manifest.failover.get("source_was") == "running":
                        qmp.execute("cont")
            raise

    def _planned_steps(self) -> None:
        if not self.done("source-paused"):
            with self.reach.qmp(self.vm) as qmp:
                was = qmp.execute("query-status")["status"]
                qmp.execute("stop")
            self.record("source-paused", source_was=was)
        if not self.done("final-point"):
            with self.reach.qmp(self.vm) as qmp, target_session(self.reach, self.vm) as target:
                self.manifest, _ = take_consistent_point(qmp, target, self.manifest, self.vm, self.dr, "final")
            self.record("final-point", point=self.manifest.points[-1].id)
        if not self.done("replication-stopped"):
            with self.reach.qmp(self.vm) as qmp:
                if query_jobs(qmp, self.manifest):
                    cancel_mirrors(qmp, self.manifest)
                detach_target(qmp, self.manifest)
            stop_link_and_target(self.reach.shell(self.vm.host), self.vm, self.dr, self.layout)
            self.record("replication-stopped")
        if not self.done("source-stopped"):
            self._stop_source()
            self.record("source-stopped")
        if not self.done("dr-started"):
            disks = {d.source_image: d.replica_image for d in self.manifest.disks}
            self._start_on_dr(disks)
            self.record("dr-started")

    def _stop_source(self, timeout: float = 30) -> None:
        """Quit the source QEMU and see its process gone: only then may the DR copy start."""
        src = self.reach.shell(self.vm.host)  # unreachable now: stop here, the user decides (--force)
        with contextlib.suppress(UnreachableError, QmpError), self.reach.qmp(self.vm) as qmp:
            qmp.execute("quit")  # it may be gone already: a re-run after the quit
        deadline = time.monotonic() + timeout
        while source_qemu_alive(src, self.vm):
            if time.monotonic() > deadline:
                raise DrtoolError(f"the source QEMU of {self.vm.name} still runs on {self.vm.host} after quit; "
                                  "the VM was not started on the DR host",
                                  hint="stop it, then run the same failover again")
            time.sleep(0.2)

    def unplanned(self) -> None:
        if not self.done("replication-stopped"):
            stop_target(self.dr, self.layout)
            self.record("replication-stopped")
        if not self.done("dr-started"):
            chosen = self.manifest.failover.get("point")
            if chosen == LATEST:
                point = self._latest_as_point()
            else:
                point = self.manifest.point(chosen or "")
            if point is None:
                raise Refused(f"{self.vm.name} has no point {chosen!r} to start from")
            overlays = self._overlays(point, self.vm.replica_dir / "failover")
            disks = {d.source_image: overlays[d.device] for d in self.manifest.disks}
            self.save(self.manifest, failover=self.manifest.failover | {"point": point.id})
            self._start_on_dr(disks)
            self.record("dr-started")

    def _latest_as_point(self) -> RecoveryPoint:
        """The replicas as the (now stopped) target left them, recorded as a point of their own."""
        existing = next((p for p in self.manifest.points if p.quiesce == "unplanned-latest"), None)
        if existing is not None:
            return existing  # a re-run
        point = RecoveryPoint(f"latest-{now().replace(':', '').replace('-', '')[:15]}", now(), "unplanned-latest",
                              0.0, {d.device: d.replica_image for d in self.manifest.disks})
        self.save(self.manifest, points=(*self.manifest.points, point))
        return point

    def _overlays(self, point: RecoveryPoint, directory: PurePosixPath) -> dict[str, str]:
        """Writable overlays on a point's images (the point itself stays as it is).

        An overlay that exists already belongs to a DR copy an earlier, killed
        run started: it is kept, never created anew under a running VM.
        """
        make_dirs(self.dr, directory)
        overlays = {}
        for device, image in point.images.items():
            overlay = str(directory / f"{device}.qcow2")
            create_overlay(self.dr, image, overlay, keep_existing=True)
            overlays[device] = overlay
        return overlays

    def _start_on_dr(self, disks: dict[str, str]) -> None:
        if vm_pid(self.dr, self.run_layout) is not None:
            return  # started by an earlier run that was killed before recording it
        hardware = self.manifest.hardware
        argv = map_command_line(hardware["argv"], disks, hardware.get("qmp_socket", str(self.vm.qmp_socket)),
                                self.run_layout)
        start_vm(self.dr, argv, self.run_layout)

    def verify(self) -> str:
        """Resume the VM on the DR host and see it run."""
        with dr_vm_session(self.reach, self.vm) as qmp:
            if qmp.execute("query-status")["status"] != "running":
                qmp.execute("cont")
            state = qmp.execute("query-status")["status"]
        if state != "running":
            raise DrtoolError(f"{self.vm.name} started on {self.vm.dr_host} but is {state!r}, not running")
        return state


def dr_vm_session(reach: Reach, vm: Vm) -> QmpSession:
    return reach.qmp_at(vm.dr_host, dr_run_layout(vm).qmp_socket, f"{vm.name} (failed over)")


# ----------------------------------------------------------------------------- rollback


@dataclass(frozen=True)
class RollbackResult:
    vm: str
    undone: tuple[str, ...]
    source_state: str


def rollback(inventory: Inventory, reach: Reach, name: str, *, force: bool = False,
             confirm: Confirm = lambda plan: True) -> RollbackResult:
    """Undo a planned failover, finished or not, while the source host exists: the source runs again, protected."""
    from drtool.services.resync import resync

    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    src = reach.shell(vm.host)  # rollback needs the source host: unreachable is exit 3
    with VmLock(dr, vm.name):
        manifest = load_settled_manifest(dr, vm)
        if manifest is None or manifest.state not in (FAILING_OVER, FAILED_OVER):
            raise Refused(f"{vm.name} has no failover to roll back")
        if manifest.failover.get("kind") != "planned":
            raise Refused(f"{vm.name}'s {manifest.failover.get('kind')} failover cannot be rolled back",
                          hint="after an unplanned failover, fail back with a new protection from the DR host")
        steps = list(manifest.failover.get("steps", []))
        plan = FailoverPlan(vm.name, "rollback", tuple(f"undo {s}" for s in reversed(steps)),
                            (_discarded_writes(vm, manifest, force),))
        if not confirm(plan):
            raise Refused("rollback not confirmed; nothing was changed")
        run = _Run(reach, vm, manifest)
        if "source-stopped" in steps and not _source_alive(reach, vm):
            # first, before the DR copy is touched: if the source cannot come back, nothing is lost.
            # It starts paused (-S) and runs only once the DR copy is gone.
            src.run(_relaunch_argv(manifest), timeout=60)
        run_layout = dr_run_layout(vm)
        dr_vm_ran = "dr-started" in steps or vm_pid(dr, run_layout) is not None
        kill_vm(dr, run_layout)
        final = manifest.point(manifest.failover.get("point") or "")
        if dr_vm_ran and final is not None:
            # the DR VM wrote into the tops above the final point (the target is stopped by
            # then): start them anew, empty, so the replicas equal the source as it stopped
            for disk in manifest.disks:
                create_overlay(dr, final.images[disk.device], disk.replica_image)
        if target_pid(dr, run.layout) is None:
            start_target(dr, manifest, run.layout)
        with reach.qmp(vm) as qmp:
            if qmp.execute("query-status")["status"] != "running" and manifest.failover.get("source_was",
                                                                                              "running") == "running":
                qmp.execute("cont")
            state = qmp.execute("query-status")["status"]
        run.save(manifest.with_state("protected", "failover rolled back"), failover={})
    resync(inventory, reach, vm.name)
    return RollbackResult(vm.name, tuple(reversed(steps)), state)


def _discarded_writes(vm: Vm, manifest: Manifest, force: bool) -> str:
    """What a rollback discards, said with its age; refused past ROLLBACK_FORCE_AFTER without --force."""
    age = dr_copy_age(manifest.failover)
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
    return argv + ["-S", "-daemonize"]
