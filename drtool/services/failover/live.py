"""`drtool failover VM --live`: a planned failover without a reboot, live-migrating the VM onto its replicas.

Each step is recorded in the manifest before it acts:

  destination-started  QEMU starts on the DR host from the manifest's command line, on the replica
                       tops, with -incoming defer (it keeps them inactive: qsd may still write them)
  migration-started    the RAM copy over TLS-PSK with pause-before-switchover; inside that pause
                       the mirrors are completed and the DR target stopped, then migrate-continue,
                       the destination completes and is resumed (`cont`)
  replication-stopped, switchover, dr-started
                       once the destination runs (the migration's figures with them)
  source-stopped       the source (in postmigrate) quits; the link relay goes

The guest's pause holds no manifest write (each is an SSH round trip that
would add to the downtime): `migration-started` covers the pause window, and a
re-run reads from both QEMUs how far it got. Nor does the move: the first two
steps go in the write that starts the failover (undoing the one is undoing the
other), the last four in one write once the destination runs. Never two
running copies:

- before migrate-continue (the source's migration not past pre-switchover): a
  re-run or --rollback cancels the migration (the source runs on by itself),
  kills the destination, restarts the DR target; replication catches up with
  resync from drtool's persistent bitmap (no full copy). A re-run then moves
  the VM afresh;
- after it: the destination is resumed; if it cannot run, it is killed and the
  source (in postmigrate, its images intact) resumes.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum

from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, QmpError, Refused, UnreachableError
from drtool.mechanics.blockinfo import parse_query_block
from drtool.mechanics.dr_target import (
    PSK_USER,
    free_nbd_port,
    push_dh_params,
    source_tls_dir,
    start_target,
    stop_target,
    target_pid,
    target_process,
)
from drtool.mechanics.dr_vm import dr_vm_session, kill_vm, map_recorded, start_vm, vm_pid
from drtool.mechanics.hardware import source_qemu_alive
from drtool.mechanics.link import start_link, stop_link
from drtool.mechanics.migration import (
    DOWNTIME_LIMIT_MS,
    MAX_BANDWIDTH,
    MIGRATION_TLS_ID,
    RAM_COPY_TIMEOUT,
    SWITCH_TIMEOUT,
    ArmedStop,
    Figures,
    HostQemu,
    MigrationFailed,
    add_reverse_bitmaps,
    cancel_migration,
    destination_mismatch,
    event_time,
    host_qemu,
    incoming_argv,
    listen_for_migration,
    migration_status,
    migration_uri,
    prepare_source,
    reverse_bitmap_name,
    reverse_bitmap_on,
    wait_migration,
)
from drtool.mechanics.pausing import resume_own_pause
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.replication import cancel_mirrors, detach_target, query_jobs
from drtool.services.resync import resync
from drtool.state.manifest import Manifest, now
from drtool.state.protection import Protection
from drtool.state.records import LIVE_STEPS, FailoverKind, FailoverRecord, Step
from drtool.state.store import require_protected, select_vm
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import Event, EventSubscription, QmpSession
from drtool.units import human_size

from .command import Confirm, FailoverResult
from .plan import FailoverPlan
from .sessions import in_background, once_up_opener
from .steps import FAULT_ENV, HOOKS_ENV, FailoverSteps

SOURCE_QUIT_TIMEOUT = 30.0
DESTINATION_START_TIMEOUT = 60.0  # s for the destination's monitor to appear
PAUSE_HOOK = "pre-switchover"  # FAULT_ENV values: SIGKILL drtool inside the guest's pause (tests),
STOPPED_HOOK = "target-stopped"  # at its start, or once the mirrors completed and the target stopped


class Outcome(str, Enum):
    FINISHED = "finished"  # the VM runs on the DR host
    UNDONE = "undone"  # the VM runs on its source; the DR target is back (replication needs a resync)


@dataclass(frozen=True)
class _Seen:
    """One QEMU as a re-run finds it."""

    alive: bool
    status: str  # query-status, "gone" when not alive
    migration: str  # query-migrate status, "none" when not alive


def live_failover(inventory: Inventory, reach: Reach, name: str, *, dry_run: bool = False,
                  confirm: Confirm = lambda plan: True) -> FailoverResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    with reach.lock(vm):
        manifest = load_settled_manifest(dr, vm)
        interrupted = manifest is not None and manifest.failover is not None and \
            manifest.state is Protection.FAILING_OVER
        if manifest is not None and manifest.failover is not None and interrupted:
            if manifest.failover.kind is not FailoverKind.LIVE:
                raise Refused(f"a {manifest.failover.kind.value} failover of {vm.name} is under way",
                              hint=f"finish it with drtool failover {vm.name} (without --live), or --rollback")
            if dry_run:
                return _dry(vm, manifest, ("an interrupted live failover: a run finishes or undoes it",))
            run = live_run(reach, vm, manifest)
            with run.sessions:
                settled = run.settle()
            if settled is Outcome.FINISHED:
                return _finished(run, started, ("finished the interrupted live failover",))
        else:  # the usual case: under this lock, from the manifest just read
            outcome = _move_afresh(reach, vm, manifest, (), started, dry_run, confirm)
    if interrupted:  # undone: replication catches up (resync takes the lock itself), then the move
        notes = ("an interrupted live failover was undone (the source ran on); moving the VM afresh",
                 catch_up_replication(inventory, reach, name))
        with reach.lock(vm):
            outcome = _move_afresh(reach, vm, load_settled_manifest(dr, vm), notes, started, dry_run, confirm)
    if isinstance(outcome, FailoverResult):
        return outcome
    # undone after a failure: the source runs; bring replication back, then say what failed
    caught_up = catch_up_replication(inventory, reach, name)
    message = outcome.message if isinstance(outcome, DrtoolError) else "interrupted"
    raise DrtoolError(f"live failover of {vm.name} failed and was undone: {message}; it runs on {vm.host}, "
                      f"protected ({caught_up})", hint="fix the cause and run it again, or fail over with a reboot "
                                        f"(drtool failover {vm.name})") from outcome


def _move_afresh(reach: Reach, vm: Vm, manifest: Manifest | None, notes: tuple[str, ...], started: float,
                 dry_run: bool, confirm: Confirm) -> FailoverResult | BaseException:
    """Under the VM's lock: refusals, then the move; its result, or the failure it was undone after."""
    dr = reach.shell(vm.dr_host)
    if manifest is not None and (manifest.state is Protection.FAILED_OVER or manifest.state.reverse):
        raise Refused(f"{vm.name} has already failed over: it runs on {vm.dr_host}",
                      hint=f"see drtool status {vm.name}")
    manifest = require_protected(manifest, vm)
    manifest, resumed = resume_own_pause(reach, dr, vm, manifest)  # a pause a killed drtool left
    notes = (*notes, resumed) if resumed else notes
    run = live_run(reach, vm, manifest)
    run.refusals()
    if dry_run:
        return _dry(vm, manifest, notes)
    if not confirm(live_plan(vm, manifest)):
        raise Refused("failover not confirmed; nothing was changed")
    with run.sessions:
        run.open_sessions_ahead()  # while the port is chosen and the record written
        record = FailoverRecord(FailoverKind.LIVE, now(), state_before=manifest.state.value,
                                migration={"port": run.port_ahead.result()})
        run.begin(replace(manifest.transition(Protection.FAILING_OVER, "live failover started"), failover=record))
        try:
            run.run()
            return _finished(run, started, notes)
        except (DrtoolError, KeyboardInterrupt) as err:
            run.sessions.close()  # settling opens its own: a monitor serves one client at a time
            outcome = _settle_after_failure(run)
            if outcome is Outcome.FINISHED:
                return _finished(run, started, (*notes, f"finished after: {err}"))
            if outcome is None:
                raise
            return err


def _settle_after_failure(run: LiveFailover) -> Outcome | None:
    try:
        return run.settle()
    except (DrtoolError, OSError):
        return None  # the record stays: a re-run or --rollback settles it


def catch_up_replication(inventory: Inventory, reach: Reach, name: str) -> str:
    """After an undo: mirrors again, sending only what the replicas lack (drtool resync's own work); a note."""
    done = resync(inventory, reach, name)
    return f"replication caught up ({done.action}: {human_size(done.bytes_sent)} sent)"


def live_rollback_or_refusal(reach: Reach, vm: Vm, manifest: Manifest) -> LiveFailover:
    """The live failover a --rollback undoes, or Refused once its destination has run: asked first, before
    the rollback's plan (whose age check would ask for --force to discard what can only be brought home)."""
    run = live_run(reach, vm, manifest)
    if not (run.done(Step.DR_STARTED) or run.destination().status == "running"):
        return run
    home = f"drtool recover {vm.name} --reprotect, then drtool recover {vm.name} --failback --live"
    raise Refused(f"{vm.name} already runs on {vm.dr_host} after its live failover: a rollback would lose what it "
                  "wrote there", hint=f"bring it home without a reboot: {home}" if run.done(Step.SOURCE_STOPPED)
                  else f"finish it with drtool failover {vm.name} --live, then {home}")


def rollback_live(run: LiveFailover) -> tuple[tuple[str, ...], str]:
    """`failover --rollback` of a live failover whose destination has not run; (undone, source state)."""
    steps = tuple(s.value for s in reversed(run.record.steps))
    if run.settle(allow_finish=False) is not Outcome.UNDONE:
        raise DrtoolError(f"the live failover of {run.vm.name} could not be undone")
    with run.reach.qmp(run.vm) as qmp:
        return steps, str(qmp.execute("query-status")["status"])


def live_run(reach: Reach, vm: Vm, manifest: Manifest) -> LiveFailover:
    """The live failover's steps for this VM: a libvirt domain's destination is a libvirt domain too."""
    if vm.libvirt_domain is not None:
        from .live_libvirt import LibvirtLiveFailover  # here: that module builds on this one

        return LibvirtLiveFailover(reach, vm, manifest)
    return LiveFailover(reach, vm, manifest)


def live_plan(vm: Vm, manifest: Manifest) -> FailoverPlan:
    run_dir = vm.replica_dir / "vm"
    tls = "TLS-PSK (the VM's replication key)" if manifest.transport == "tls-psk" else "plain TCP"
    described = {
        Step.DESTINATION_STARTED: f"{vm.dr_host}: start qemu-system from the manifest's command line on the "
                                  f"replica tops with -incoming defer (monitor {run_dir}/drtool.qmp)",
        Step.MIGRATION_STARTED: f"{vm.host}: migrate with pause-before-switchover, downtime-limit "
                                f"{DOWNTIME_LIMIT_MS} ms, max-bandwidth {MAX_BANDWIDTH >> 20} MiB/s, over {tls} "
                                f"to {manifest.nbd_address}; in the pause: block-job-cancel (mirrors complete)",
        Step.REPLICATION_STOPPED: f"{vm.dr_host}: stop qemu-storage-daemon; then migrate-continue",
        Step.SWITCHOVER: f"{vm.dr_host}: the destination completes (it activates the replicas)",
        Step.DR_STARTED: f"{vm.dr_host}: QMP cont on the destination: the guest runs on, no reboot",
        Step.SOURCE_STOPPED: f"{vm.host}: QMP quit on the source (postmigrate); stop the link relay",
    }
    if vm.libvirt_domain is not None:
        from .live_libvirt import libvirt_plan_lines  # here: that module builds on this one

        described |= libvirt_plan_lines(vm)
    done = set(manifest.failover.steps) if manifest.failover is not None else set()
    lines = tuple(("(done) " if s in done else "") + f"{s.value}: {described[s]}" for s in LIVE_STEPS)
    return FailoverPlan(vm.name, FailoverKind.LIVE.value, lines,
                        ("the guest pauses for the last RAM round (about 0.1 s); it does not reboot",))


def _dry(vm: Vm, manifest: Manifest, notes: tuple[str, ...]) -> FailoverResult:
    the_plan = live_plan(vm, manifest)
    return FailoverResult(vm.name, FailoverKind.LIVE.value, vm.dr_host, None, None, None, "not started", True,
                          the_plan, notes=notes)


def _finished(run: LiveFailover, started: float, notes: tuple[str, ...]) -> FailoverResult:
    record = replace(run.record, rto_seconds=round(time.monotonic() - started, 3), rpo_seconds=0.0,
                     rpo_bound="exact", finished_at=now())
    run.save(replace(run.manifest.transition(Protection.FAILED_OVER, "live failover done"), failover=record))
    kept = record.migration or {}
    figures = Figures(**{f.name: kept[f.name] for f in fields(Figures)}) if "move_seconds" in kept else None
    return FailoverResult(run.vm.name, FailoverKind.LIVE.value, run.vm.dr_host, None, record.rto_seconds, 0.0,
                          "running", False, None, "exact",
                          "live migration: the source stopped only for the switch, after its last write was "
                          "on the replicas", notes=notes, live=figures)


class LiveFailover(FailoverSteps):
    """One live failover's steps (see the module docstring)."""

    _dh_params_missing = False  # refusals found the DR host's TLS directory without DH parameters
    port_ahead: Future  # the migration's port, chosen during the refusals

    def intend(self, *steps: Step, **changes: object) -> None:
        """Record steps before they act (with the fields that go with them), in one manifest write."""
        record = self.record
        for step in steps:
            record = record.with_step(step, time.monotonic() - self._step_started)
        self._step_started = time.monotonic()
        self.save_record(replace(record, **changes))  # type: ignore[arg-type]
        self._fault(*(step.value for step in steps))  # any step of this one write: they were recorded together

    def begin(self, manifest: Manifest) -> None:
        """The failover's record, with the move's first two steps, in the write that starts the failover.

        Undoing the destination's start and undoing the migration are one and the same (settle reads
        both QEMUs), so one record before the first covers both and the move waits for no write.
        """
        self.manifest = manifest
        self.intend(Step.DESTINATION_STARTED, Step.MIGRATION_STARTED)

    @staticmethod
    def _fault(*where: str) -> None:
        import os
        import signal

        if os.environ.get(HOOKS_ENV) == "1" and os.environ.get(FAULT_ENV) in where:
            os.kill(os.getpid(), signal.SIGKILL)

    @property
    def port(self) -> int:
        return int((self.record.migration or {})["port"])

    # ------------------------------------------------------------------ refusals, before anything changes
    def refusals(self) -> None:
        manifest, vm = self.manifest, self.vm
        if manifest.state is not Protection.PROTECTED:
            raise Refused(f"{vm.name} is {manifest.state.value}, not in sync: a live failover needs replicas "
                          "that hold every write", hint=f"wait for the copy, or run drtool resync {vm.name}")
        binary = str(manifest.hardware["argv"][0])
        tls_dir = self.layout.tls_dir if manifest.transport == "tls-psk" else None
        dr_qemu = in_background(lambda: host_qemu(self.dr, binary, tls_dir))  # while the source's session opens
        self.port_ahead = in_background(lambda: free_nbd_port(self.dr))  # the migration's, chosen meanwhile too
        with self.reach.qmp(vm) as qmp:
            status = str(qmp.execute("query-status")["status"])
            if status != "running":
                raise Refused(f"{vm.name} is {status} on {vm.host}, not running: there is nothing to migrate live",
                              hint=f"fail over with a reboot: drtool failover {vm.name}")
            jobs = query_jobs(qmp, manifest)
            for i, disk in enumerate(manifest.disks):
                job = jobs.get(f"drtool-mirror{i}")
                if job is None or job.broken or not job.ready:
                    why = "no replication job" if job is None else ("broken" if job.broken else "still copying")
                    raise Refused(f"replica of {vm.name} disk {disk.device} is not in sync ({why})",
                                  hint=f"run drtool resync {vm.name}, then fail over")
            theirs: HostQemu = dr_qemu.result()
            mismatch = destination_mismatch(qmp, theirs, binary, vm.dr_host, vm.host)
        self._dh_params_missing = tls_dir is not None and not theirs.dh_params  # protected by an older drtool
        if mismatch:
            raise Refused(f"{vm.name} cannot migrate live to {vm.dr_host}: {mismatch}",
                          hint=f"fail over with a reboot (drtool failover {vm.name}), or install the same QEMU")

    # ------------------------------------------------------------------ the move
    def open_sessions_ahead(self) -> None:
        """Start opening the source's session, and the destination's before it starts (its relay waits)."""
        self.sessions.prefetch(self.sessions.SOURCE)
        ahead = once_up_opener(self.reach, self.vm.dr_host, self.run_layout.qmp_socket,
                               f"{self.vm.name} (failed over)", DESTINATION_START_TIMEOUT)
        if ahead is not None:
            self.sessions.prefetch(self.sessions.DR_VM, ahead)

    def run(self) -> None:
        """The move; its first two steps are recorded (begin)."""
        move_started = time.monotonic()
        tls = self.manifest.transport == "tls-psk"
        uri = migration_uri(self.manifest.nbd_address, self.port)
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(max_workers=2) as pool:
            # while the destination starts: the source's settings, the target's stopper (both sessions
            # are opening since open_sessions_ahead)
            source_ready = pool.submit(self._prepared_source, stack, tls)
            stopper_ready = pool.submit(self._armed_stopper, stack)
            self.start_destination(tls)
            marks = {"destination_started": time.monotonic()}
            dest = stack.enter_context(self.moving_destination_session())
            listen_for_migration(dest, uri, self.layout.tls_dir if tls else None, tls_on_command_line=True)
            source, stopper = source_ready.result(), stopper_ready.result()
            nodes = self._disk_nodes(dest)
            marks["listening"] = time.monotonic()
            seen: list[Event] = []
            source_events = stack.enter_context(source.subscribe(["MIGRATION", "STOP"]))
            dest_events = stack.enter_context(dest.subscribe(["MIGRATION", "RESUME"]))
            source.execute("migrate", {"uri": uri})
            wait_migration(source, frozenset({"pre-switchover"}), RAM_COPY_TIMEOUT, source_events, seen,
                           "the RAM copy")
            marks["pre_switchover"] = time.monotonic()
            self._fault(PAUSE_HOOK)
            self._complete_replication(source, stopper, marks)
            self._fault(STOPPED_HOOK)
            source.execute("migrate-continue", {"state": "pre-switchover"})
            marks["continued"] = time.monotonic()
            wait_migration(dest, frozenset({"completed"}), SWITCH_TIMEOUT, dest_events, None,
                           "the destination's migration")
            marks["completed"] = time.monotonic()
            reverse = reverse_bitmap_name()
            add_reverse_bitmaps(dest, nodes, reverse)  # before cont: every write of the DR copy is in it
            dest.execute("cont")
            marks["resumed"] = time.monotonic()
            resumed = [e for e in _drain(dest_events, "RESUME") if e.get("event") == "RESUME"]
            if resumed and not any(e.get("event") == "STOP" for e in seen):  # through virsh events lag
                seen += _drain(source_events, "STOP")
            if str(dest.execute("query-status")["status"]) != "running":
                raise DrtoolError(f"{self.vm.name} did not run on {self.vm.dr_host} after the migration")
            info = migration_status(source)
        switch_seconds = marks["continued"] - marks["pre_switchover"]
        stops = [t for e in seen if e.get("event") == "STOP" and (t := event_time(e)) is not None]
        resume_at = event_time(resumed[0]) if resumed else None
        figures = Figures(
            downtime_seconds=round(resume_at - stops[-1], 4) if stops and resume_at else None,
            qemu_downtime_seconds=info["downtime"] / 1000 if "downtime" in info else None,
            switchover_seconds=round(switch_seconds, 4),
            move_seconds=round(time.monotonic() - move_started, 3),
            ram_bytes=int(info.get("ram", {}).get("transferred", 0)),
            downtime_limit_ms=DOWNTIME_LIMIT_MS, max_bandwidth=MAX_BANDWIDTH, encrypted=tls)
        phases = {name: round(at - move_started, 4) for name, at in marks.items()}
        self.intend(Step.REPLICATION_STOPPED, Step.SWITCHOVER, Step.DR_STARTED, Step.SOURCE_STOPPED,
                    migration=(self.record.migration or {}) | asdict(figures) | {"phases": phases,
                                                                                 "reverse_bitmap": reverse})
        self._stop_source()

    # ------------------------------------------------------------------ the destination (live_libvirt.py: libvirt's)
    def start_destination(self, tls: bool) -> None:
        """QEMU on the DR host from the manifest's command line on the replica tops, waiting for the stream."""
        disks = {d.source_image: d.replica_image for d in self.manifest.disks}
        argv = map_recorded(self.manifest.hardware, disks, self.run_layout, str(self.vm.qmp_socket)).argv
        if tls and self._dh_params_missing:
            push_dh_params(self.dr, self.layout.tls_dir)
        start_vm(self.dr, incoming_argv(argv, self.layout.tls_dir if tls else None), self.run_layout,
                 timeout=DESTINATION_START_TIMEOUT)

    def destination_session(self) -> QmpSession:
        return dr_vm_session(self.reach, self.vm)

    def moving_destination_session(self) -> contextlib.AbstractContextManager[QmpSession]:
        """The destination's session for the move: opened ahead (open_sessions_ahead) and kept."""
        return self.sessions.dr_vm()

    def destination_exists(self) -> bool:
        return vm_pid(self.dr, self.run_layout) is not None

    def kill_destination(self) -> None:
        kill_vm(self.dr, self.run_layout)

    def quit_source(self, qmp: QmpSession) -> None:
        """The source (postmigrate, not running) told to end."""
        qmp.execute("quit")

    def finish_source(self, src: RemoteShell) -> None:
        """Wait until the source's QEMU process has ended (one command, waiting there), its idle relay stopping
        beside it (the pause detached its NBD client)."""
        link_stopped = in_background(lambda: stop_link(src, self.vm))
        alive = source_qemu_alive(src, self.vm, wait_gone=SOURCE_QUIT_TIMEOUT)
        link_stopped.result()
        if alive:
            raise DrtoolError(f"the source QEMU of {self.vm.name} (postmigrate) still runs on {self.vm.host} "
                              "after quit", hint="stop it, then run the same failover again")

    def _disk_nodes(self, dest: QmpSession) -> list[str]:
        """The destination's format node of each replicated disk, in manifest order."""
        by_device = {d.device: d.node_name for d in parse_query_block(dest.execute("query-block"))}
        missing = [d.device for d in self.manifest.disks if d.device not in by_device]
        if missing:
            raise DrtoolError(f"the destination QEMU of {self.vm.name} has no disk {missing[0]!r}")
        return [by_device[d.device] for d in self.manifest.disks]

    def _record_reverse_bitmap(self) -> dict[str, object]:
        """A re-run that finds the destination running: the reverse bitmap it has, for the record."""
        with contextlib.suppress(DrtoolError), self.destination_session() as qmp:
            name = reverse_bitmap_on(qmp, self._disk_nodes(qmp))
            if name is not None:
                return {"migration": (self.record.migration or {}) | {"reverse_bitmap": name}}
        return {}

    def _prepared_source(self, stack: contextlib.ExitStack, tls: bool) -> QmpSession:
        source = stack.enter_context(self.sessions.source())  # kept: the source quits through it
        prepare_source(source, source_tls_dir(self.vm) if tls else None, PSK_USER)
        return source

    def _armed_stopper(self, stack: contextlib.ExitStack) -> ArmedStop:
        stopper = stack.enter_context(contextlib.closing(
            ArmedStop(self.dr, target_process(self.layout), lambda: stop_target(self.dr, self.layout))))
        if stopper.pid is None:
            raise DrtoolError(f"the replication target of {self.vm.name} is not running: the replicas may lack "
                              "the source's last writes", hint=f"run drtool resync {self.vm.name}, then fail over")
        return stopper

    def _complete_replication(self, source: QmpSession, stopper: ArmedStop, marks: dict[str, float]) -> None:
        """Inside the pause: the mirrors complete (the replicas equal the source), the target lets go of them."""
        cancel_mirrors(source, self.manifest)
        marks["mirrors_completed"] = time.monotonic()
        detach_target(source, self.manifest)  # a left NBD node would make the source's quit wait 5 s
        marks["nbd_detached"] = time.monotonic()
        stopper.fire()  # after the NBD clients said goodbye: a target with clients may wait for them
        stopper.wait()  # the process is gone: its locks on the replicas are released
        marks["target_stopped"] = time.monotonic()

    def _stop_source(self) -> None:
        """The source (in postmigrate) quits, its link relay goes; SOURCE_STOPPED is recorded already."""
        src = self.reach.shell(self.vm.host)
        with contextlib.suppress(UnreachableError, QmpError), self.sessions.source() as qmp:
            if str(qmp.execute("query-status")["status"]) == "running":
                raise DrtoolError(f"{self.vm.name} runs on {self.vm.host} as well: drtool stopped nothing",
                                  hint="stop one of the two copies by hand")
            self.quit_source(qmp)
        self.sessions.drop(self.sessions.SOURCE)
        self.finish_source(src)

    # ------------------------------------------------------------------ a re-run, --rollback, a failure
    def source(self) -> _Seen:
        try:
            with self.reach.qmp(self.vm) as qmp:
                return _Seen(True, str(qmp.execute("query-status")["status"]), str(migration_status(qmp)["status"]))
        except UnreachableError:
            return _Seen(False, "gone", "none")

    def destination(self) -> _Seen:
        if not self.destination_exists():
            return _Seen(False, "gone", "none")
        try:
            with self.destination_session() as qmp:
                return _Seen(True, str(qmp.execute("query-status")["status"]), str(migration_status(qmp)["status"]))
        except UnreachableError:
            return _Seen(True, "unknown", "none")

    def settle(self, *, allow_finish: bool = True) -> Outcome:
        """Finish or undo an interrupted live failover, from what the two QEMUs say; never two running copies."""
        dest = self.destination()
        if self.done(Step.DR_STARTED) or dest.status == "running":
            if not self.done(Step.DR_STARTED):
                self.intend(Step.REPLICATION_STOPPED, Step.SWITCHOVER, Step.DR_STARTED, Step.SOURCE_STOPPED,
                            **self._record_reverse_bitmap())
            elif not self.done(Step.SOURCE_STOPPED):
                self.intend(Step.SOURCE_STOPPED)
            self._stop_source()
            return Outcome.FINISHED
        source = self.source()
        if source.migration == "device":  # migrate-continue went out: QEMU finishes on its own
            with self.reach.qmp(self.vm) as qmp, contextlib.suppress(MigrationFailed):
                wait_migration(qmp, frozenset({"completed"}), SWITCH_TIMEOUT)
            source = self.source()
        switched = source.status == "postmigrate" or source.migration == "completed"
        if not source.alive and dest.migration == "completed":
            switched = True  # the source quit or died after the switch: the destination has everything
        if switched and allow_finish and dest.alive and dest.migration == "completed":
            reverse: dict[str, object] = {}
            with contextlib.suppress(QmpError, UnreachableError), self.destination_session() as qmp:
                name = reverse_bitmap_name()
                add_reverse_bitmaps(qmp, self._disk_nodes(qmp), name)
                reverse = {"migration": (self.record.migration or {}) | {"reverse_bitmap": name}}
                qmp.execute("cont")
            if self.destination().status == "running":
                self.intend(Step.REPLICATION_STOPPED, Step.SWITCHOVER, Step.DR_STARTED, Step.SOURCE_STOPPED, **reverse)
                self._stop_source()
                return Outcome.FINISHED
        if not source.alive:  # neither can run: give the replicas back to the target, for --force
            self._undo(switched, source_alive=False)
            raise DrtoolError(f"the source QEMU of {self.vm.name} is gone and the destination on {self.vm.dr_host} "
                              "had not switched over: the live failover was undone",
                              hint=f"fail over from the replicas: drtool failover {self.vm.name} --force")
        return self._undo(switched)

    def _undo(self, switched: bool, *, source_alive: bool = True) -> Outcome:
        """The destination killed, the source running again, the DR target back; the record gone."""
        if source_alive:
            with self.reach.qmp(self.vm) as qmp:
                if not switched:
                    cancel_migration(qmp)
        self.kill_destination()  # only now can the source run without a second copy
        if source_alive:
            with self.reach.qmp(self.vm) as qmp:
                if str(qmp.execute("query-status")["status"]) != "running":
                    qmp.execute("cont")  # postmigrate or paused: its images are activated again
                with contextlib.suppress(QmpError):
                    qmp.execute("object-del", {"id": MIGRATION_TLS_ID})
        if target_pid(self.dr, self.layout) is None:
            start_target(self.dr, self.manifest, self.layout)
        if source_alive:
            start_link(self.reach.shell(self.vm.host), self.vm, self.manifest)
        self.save(replace(self.manifest.transition(Protection.PROTECTED, "live failover undone"), failover=None))
        return Outcome.UNDONE


def _drain(events: EventSubscription, until: str, timeout: float = 1.0) -> list[Event]:
    """Every event already queued, waiting up to timeout for the one named `until` (RESUME follows cont at
    once on QEMU's own monitor; through virsh's event stream it may come after cont's reply)."""
    out: list[Event] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = events.get(timeout=left)
        if event is None:
            break
        out.append(event)
        if event.get("event") == until:
            break
    return out
