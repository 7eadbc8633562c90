"""`drtool recover VM --failback --live`: home again without a reboot, live-migrating the DR copy onto the old disks.

From reprotected (the DR copy replicates onto the original host's old images, in sync), each step recorded
in the reprotect record before it acts:

  live-home-started  the VM's own command line starts at home, paused, with -incoming defer, on its old
                     images (an incoming QEMU keeps them inactive: the reverse target still writes them)
  live-migrating     the DR copy migrates home (TLS-PSK with the reverse direction's key). In its pause: a
                     persistent bitmap on the DR copy's disks (what it writes if this is undone), the
                     reverse mirrors completed, the reverse target stopped, migrate-continue; at home a
                     persistent bitmap (drtool's resync bitmap) on each disk before cont
  dr-stopped         recorded once home runs: the DR copy (postmigrate) quits, its relay goes

Then the state is protected and replication in the original direction catches up from that bitmap, as
`drtool resync` does (only what the guest wrote at home since the switch). Never two running copies: a
failure before migrate-continue cancels the migration (the DR copy runs on), kills the home QEMU, restarts
the reverse target and goes back to reprotected; `recover --reprotect` then catches up from the bitmap
taken in the pause. After it, home is resumed; if it cannot run it is killed and the DR copy resumes.
A libvirt domain runs the same steps with libvirt at both ends (failback_live_libvirt.py).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future
from dataclasses import replace

from drtool.domain import Inventory
from drtool.errors import DrtoolError, QmpError, Refused, UnreachableError
from drtool.mechanics.blockinfo import parse_query_block
from drtool.mechanics.dr_target import (
    PSK_USER,
    TargetLayout,
    free_nbd_port,
    new_psk,
    push_dh_params,
    push_psk,
    source_tls_dir,
    start_target,
    stop_target,
    target_pid,
    target_process,
)
from drtool.mechanics.dr_vm import dr_run_layout, kill_vm, vm_pid
from drtool.mechanics.hardware import read_hardware, source_qemu_alive
from drtool.mechanics.link import give_to_qemu, start_link, stop_link
from drtool.mechanics.migration import (
    RAM_COPY_TIMEOUT,
    SWITCH_TIMEOUT,
    ArmedStop,
    HostQemu,
    add_reverse_bitmaps,
    cancel_migration,
    destination_mismatch,
    host_qemu,
    listen_for_migration,
    migration_status,
    migration_uri,
    prepare_source,
    reverse_bitmap_name,
    reverse_bitmap_on,
    wait_migration,
)
from drtool.mechanics.old_site import look_at_old_site, refuse_split_brain, unmark_old_images
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.replication import BITMAP_PREFIX, cancel_mirrors, detach_target, query_jobs, trusting_bitmap
from drtool.services.failover.sessions import close_when_open, in_background, opened_once_up
from drtool.services.resync import resync
from drtool.state.manifest import Manifest, now
from drtool.state.protection import Protection
from drtool.state.records import FailoverRecord
from drtool.state.store import save_manifest, select_vm
from drtool.transport.connections import Reach
from drtool.transport.qmp import QmpSession

from .failback import DR_STOPPED, LIVE_HOME_STARTED, QUIT_TIMEOUT, FailbackResult, forward_manifest, home_argv
from .reprotect import MIRRORS_STARTED, ReverseReplication, killed_after, reprotect
from .reverse_bitmap import BITMAP_METHOD

LIVE_MIGRATING = "live-migrating"
FORWARD_KEY = "failback_forward_bitmap"  # in the failover record's migration figures
HOME_START_TIMEOUT = 60.0  # s for home's QEMU to start and open its monitor
PAUSE_HOOK = "failback-pre-switchover"  # test hooks: SIGKILL inside the guest's pause, at its start
STOPPED_HOOK = "failback-target-stopped"  # or once the reverse mirrors completed and the reverse target stopped


def failback_live(inventory: Inventory, reach: Reach, name: str) -> FailbackResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    outcome, failure = _move(inventory, reach, name, started, interrupted_only=True)
    if outcome == UNDONE:  # an interrupted one was undone: catch up, then move afresh
        reprotect(inventory, reach, name)
    if not isinstance(outcome, FailbackResult):
        outcome, failure = _move(inventory, reach, name, started, interrupted_only=False)
    if isinstance(outcome, FailbackResult):
        resync(inventory, reach, name)  # replication home -> DR host: only what home wrote since the switch
        return outcome
    reprotect(inventory, reach, name)  # undone: the reverse direction catches up from the pause's bitmap
    raise DrtoolError(f"the live failback of {vm.name} failed and was undone: {failure}; it runs on "
                      f"{vm.dr_host}, reprotected", hint=f"fix the cause and run it again, or fail back with a "
                                                         f"reboot (drtool recover {vm.name} --failback)")


UNDONE = "undone"


def _move(inventory: Inventory, reach: Reach, name: str, started: float, *,
          interrupted_only: bool) -> tuple[FailbackResult | str | None, str]:
    """Under the lock: settle an interrupted live failback (interrupted_only), or run one.

    (the result, "") once home runs; (UNDONE, why) once undone; (None, "") when there was nothing to settle.
    """
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    with reach.lock(vm):
        manifest = load_settled_manifest(dr, vm)
        live_run = manifest is not None and manifest.state is Protection.FAILING_BACK and \
            manifest.reprotect is not None and manifest.reprotect.done(LIVE_HOME_STARTED)
        if interrupted_only and not live_run:
            return None, ""
        if manifest is not None and manifest.state is Protection.PROTECTED:  # home already (a kill in its resync?)
            raise Refused(f"{vm.name} is protected and runs on {vm.host}: there is nothing to fail back",
                          hint=f"if a killed failback left its replication behind, run drtool resync {vm.name}")
        if manifest is None or manifest.reprotect is None or not (manifest.state is Protection.REPROTECTED
                                                                   or live_run):
            state = manifest.state.value if manifest else "not protected"
            raise Refused(f"{vm.name} is not reprotected (state {state}): fail back only once the DR copy is "
                          "replicated home", hint=f"run drtool recover {vm.name} --reprotect first")
        home = reach.shell(vm.host)
        if not live_run:  # an interrupted run's QEMU at home is its incoming destination: settle decides
            refuse_split_brain(look_at_old_site(reach, vm, manifest), vm, "failback")
        work = ReverseReplication(inventory, reach, vm, manifest, manifest.reprotect, dr, home)
        move = LiveFailback(work) if vm.libvirt_domain is None else _libvirt_failback()(work)
        if live_run:
            return (move.finish(started) if move.settle() else UNDONE), "an interrupted run"
        move.refusals()
        try:
            move.run()
        except (DrtoolError, KeyboardInterrupt) as err:
            why = err.message if isinstance(err, DrtoolError) else "interrupted"
            try:
                finished = move.settle()
            except (DrtoolError, OSError):
                raise err from None
            return (move.finish(started) if finished else UNDONE), why
        return move.finish(started), ""


def _libvirt_failback() -> type[LiveFailback]:
    from .failback_live_libvirt import LibvirtLiveFailback  # it builds on this module

    return LibvirtLiveFailback


class LiveFailback:
    """The steps with a plain QEMU at home; failback_live_libvirt.py's subclass with libvirt domains."""

    tls_on_command_line = False  # the home QEMU's TLS server object: made by start_home, not object-add

    def __init__(self, work: ReverseReplication) -> None:
        self.work = work
        self._dh_params_missing = False  # refusals found home's TLS directory without DH parameters
        self.vm, self.reach, self.dr, self.home = work.vm, work.reach, work.dr, work.home
        self.run_layout = dr_run_layout(self.vm.replica_dir)

    def intend(self, *steps: str, state: Protection | None = None, note: str = "") -> None:
        """Record steps before they act, in one manifest write (with the state, when it changes)."""
        for step in steps:
            self.work.record = self.work.record.with_step(step)
        self.work.save(state, note)
        for step in steps:
            killed_after(step)  # test hook (DRTOOL_TEST_HOOKS=1, DRTOOL_FAULT_AFTER_STEP=step)

    def refusals(self) -> None:
        if not self.work.healthy():
            raise Refused(f"reverse replication of {self.vm.name} is not in sync: a failback now would lose writes",
                          hint=f"run drtool recover {self.vm.name} --reprotect first")
        binary = str(self.work.manifest.hardware["argv"][0])
        home_qemu = in_background(lambda: host_qemu(self.home, binary, self.work.layout.tls_dir))
        with self.work.session() as qmp:
            theirs: HostQemu = home_qemu.result()
            mismatch = destination_mismatch(qmp, theirs, binary, self.vm.host, self.vm.dr_host)
        self._dh_params_missing = not theirs.dh_params  # reprotected by an older drtool (written if TLS is used)
        if mismatch:
            raise Refused(f"{self.vm.name} cannot migrate live back to {self.vm.host}: {mismatch}",
                          hint=f"fail back with a reboot: drtool recover {self.vm.name} --failback")

    def run(self) -> None:
        port = free_nbd_port(self.home)
        rollback = reverse_bitmap_name()
        forward = f"{BITMAP_PREFIX}{time.time_ns()}"  # drtool's resync bitmap at home: a re-run trusts it too
        self.work.manifest = replace(self.work.manifest, failover=_with_migration(self.work.manifest.failover, {
            "failback_port": port, "failback_rollback_bitmap": rollback, FORWARD_KEY: forward}))
        with contextlib.ExitStack() as stack:
            # while the steps are recorded and home's QEMU starts: the DR copy's session, and home's own
            # where it can open before home's monitor exists
            source_ready = in_background(self.migration_source)
            stack.callback(close_when_open, source_ready)
            home_ahead = self.home_session_ahead(stack)
            # one write, with the state, before home's QEMU starts: undoing its start and undoing the migration
            # are one (settle), and a run killed right after it finds a live failback to settle
            self.intend(LIVE_HOME_STARTED, LIVE_MIGRATING, state=Protection.FAILING_BACK,
                        note="live failback started")
            self.start_home(self.work.manifest.transport == "tls-psk")
            source = stack.enter_context(source_ready.result())
            dest = stack.enter_context(home_ahead.result() if home_ahead is not None else self.migration_home())
            self._migrate(source, dest, port, rollback, forward)
        self._switched(forward)  # the sessions closed: it opens the DR copy's again

    def _migrate(self, source: QmpSession, dest: QmpSession, port: int, rollback: str, forward: str) -> None:
        """The RAM copy, the pause's work, the switch and home's cont (home's writes go to the forward bitmap)."""
        reverse = self.work.reverse_of(source)
        uri = migration_uri(reverse.nbd_address, port)
        tls = reverse.transport == "tls-psk"
        if tls and self._dh_params_missing:
            push_dh_params(self.home, self.work.layout.tls_dir)
        listen_for_migration(dest, uri, self.work.layout.tls_dir if tls else None,
                             tls_on_command_line=self.tls_on_command_line)
        prepare_source(source, source_tls_dir(self.work.rvm) if tls else None, PSK_USER)
        home_nodes = self._home_nodes(dest)
        stopper = ArmedStop(self.home, target_process(self.work.layout),
                            lambda: stop_target(self.home, self.work.layout))
        if stopper.pid is None:
            stopper.close()
            raise DrtoolError(f"the reverse target of {self.vm.name} is not running on {self.vm.host}",
                              hint=f"run drtool recover {self.vm.name} --reprotect, then fail back")
        with source.subscribe(["MIGRATION"]) as source_events, dest.subscribe(["MIGRATION"]) as dest_events, \
                contextlib.closing(stopper):
            source.execute("migrate", {"uri": uri})
            wait_migration(source, frozenset({"pre-switchover"}), RAM_COPY_TIMEOUT, source_events, None,
                           "the RAM copy")
            killed_after(PAUSE_HOOK)
            self.end_reverse_mirrors(source, reverse)  # the guest is stopped: nothing is written from here on
            nodes = [d.node_name for d in self.work.reverse_of(source).disks]  # the filters are gone
            add_reverse_bitmaps(source, nodes, rollback)  # what the DR copy writes if this is undone
            detach_target(source, reverse)
            stopper.fire()
            stopper.wait()
            killed_after(STOPPED_HOOK)
            source.execute("migrate-continue", {"state": "pre-switchover"})
            wait_migration(dest, frozenset({"completed"}), SWITCH_TIMEOUT, dest_events, None,
                           "the migration home")
            add_reverse_bitmaps(dest, home_nodes, forward)  # drtool's resync bitmap: home's writes from now
            dest.execute("cont")
        if str(dest.execute("query-status")["status"]) != "running":
            raise DrtoolError(f"{self.vm.name} did not run at home after the migration")

    def _home_nodes(self, home: QmpSession) -> list[str]:
        by_device = {d.device: d.node_name for d in parse_query_block(home.execute("query-block"))}
        return [by_device[d.device] for d in self.work.manifest.disks]

    def _forward_on_home(self, home: QmpSession, *, add: bool) -> str | None:
        """A re-run: the run's resync bitmap if every home disk has it (add: add it first, before cont)."""
        failover = self.work.manifest.failover
        name = str((failover.migration or {}).get(FORWARD_KEY, "")) if failover is not None else ""
        if not name:
            return None
        nodes = self._home_nodes(home)
        have = {str(n.get("node-name")): {str(b.get("name")) for b in n.get("dirty-bitmaps", [])}
                for n in home.execute("query-named-block-nodes", {"flat": True})}
        if all(name in have.get(node, set()) for node in nodes):
            return name
        if add:
            add_reverse_bitmaps(home, nodes, name)
            return name
        return None  # home ran without it: resync compares instead of trusting

    def _switched(self, forward: str | None) -> None:
        """Home runs: trust its bitmap, then the DR copy quits (recorded first)."""
        manifest = self.work.manifest
        if forward is not None:
            manifest = trusting_bitmap(manifest, forward)
        self.work.manifest = manifest
        if not self.work.record.done(DR_STOPPED):
            self.intend(DR_STOPPED)
        with contextlib.suppress(UnreachableError, QmpError), self.work.session() as qmp:
            if str(qmp.execute("query-status")["status"]) == "running":
                raise DrtoolError(f"{self.vm.name} runs on {self.vm.dr_host} as well", hint="stop one copy by hand")
            self.quit_dr_copy(qmp)
        self.end_dr_copy()
        stop_link(self.dr, self.work.rvm)

    # --- what differs for libvirt domains (failback_live_libvirt.py) -------------------------------------
    def migration_source(self) -> QmpSession:
        """The DR copy's session for the move (every command in the guest's pause counts)."""
        return self.work.session()

    def migration_home(self) -> QmpSession:
        return self.reach.qmp(self.vm)

    def home_session_ahead(self, stack: contextlib.ExitStack) -> Future | None:
        """Home's session, opening in the background before its QEMU starts (the relay waits for the monitor);
        None where it cannot (then migration_home once home runs)."""
        return opened_once_up(self.reach, stack, self.vm.host, self.vm.monitor, self.vm.name, HOME_START_TIMEOUT)

    def end_reverse_mirrors(self, source: QmpSession, reverse: Manifest) -> None:
        """Inside the guest's pause: the reverse mirrors completed and dismissed."""
        cancel_mirrors(source, reverse)

    def start_home(self, tls: bool) -> None:
        """The VM's own command line at home, paused, waiting for the stream (nothing if it runs already)."""
        if not source_qemu_alive(self.home, self.vm):
            self.home.run([*home_argv(self.work.manifest), "-incoming", "defer"], timeout=HOME_START_TIMEOUT)

    def quit_dr_copy(self, qmp: QmpSession) -> None:
        qmp.execute("quit")

    def end_dr_copy(self) -> None:
        """The DR copy (postmigrate, told to quit) gone for sure."""
        deadline = time.monotonic() + QUIT_TIMEOUT
        while vm_pid(self.dr, self.run_layout) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_vm(self.dr, self.run_layout)

    def kill_home(self) -> None:
        """Undo: the home QEMU (the migration's destination) killed and gone."""
        with contextlib.suppress(DrtoolError):
            pid = read_hardware(self.home, self.vm)["pid"]
            self.home.run(["kill", "-KILL", str(pid)], check=False, timeout=15)
        deadline = time.monotonic() + QUIT_TIMEOUT
        while source_qemu_alive(self.home, self.vm) and time.monotonic() < deadline:
            time.sleep(0.2)

    def finish_home(self) -> None:
        """Once home runs and the DR copy is gone: nothing more for a plain QEMU."""

    def finish(self, started: float) -> FailbackResult:
        """Protected again: the forward target on the replicas, then resync's bitmap tier sends home's writes."""
        vm, dr, home = self.vm, self.dr, self.home
        manifest, dropped = forward_manifest(self.work.manifest, vm.replica_dir)
        unmark_old_images(home, [d.source_image for d in manifest.disks])
        layout = TargetLayout(vm.replica_dir)
        stop_target(dr, layout)
        if manifest.transport == "tls-psk":
            psk = new_psk()
            push_psk(dr, layout.tls_dir, psk)
            push_psk(home, source_tls_dir(vm), psk)
            give_to_qemu(home, manifest, vm.source_state_dir, source_tls_dir(vm))  # libvirt's QEMU user
        stop_link(home, vm)
        self.finish_home()
        rto = time.monotonic() - started
        save_manifest(dr, vm, replace(manifest.transition(Protection.PROTECTED, f"failed back live at {now()}"),
                                      failover=None, reprotect=None, drill=None))
        return FailbackResult(vm.name, vm.host, vm.dr_host, round(rto, 3), 0.0, dropped, False)

    def settle(self) -> bool:
        """A re-run, or a failure: True once home runs (finished), False once undone (the DR copy runs)."""
        home_status, home_migration, forward = "gone", "none", None
        with contextlib.suppress(DrtoolError), self.reach.qmp(self.vm) as qmp:
            home_status = str(qmp.execute("query-status")["status"])
            home_migration = str(migration_status(qmp)["status"])
            if home_status == "running" and not self.work.record.done(DR_STOPPED):
                forward = self._forward_on_home(qmp, add=False)
        if self.work.record.done(DR_STOPPED) or home_status == "running":
            self._switched(forward)  # a run killed after recording dr-stopped may have left the DR copy
            return True
        dr_status, dr_migration = "gone", "none"
        with contextlib.suppress(DrtoolError), self.work.session() as qmp:
            dr_status, dr_migration = str(qmp.execute("query-status")["status"]), str(migration_status(qmp)["status"])
        switched = dr_status == "postmigrate" or dr_migration == "completed"
        if switched and home_status != "gone" and home_migration == "completed":
            resumed = False
            with contextlib.suppress(DrtoolError), self.reach.qmp(self.vm) as qmp:
                forward = self._forward_on_home(qmp, add=True)
                qmp.execute("cont")
                resumed = str(qmp.execute("query-status")["status"]) == "running"
            if resumed:  # home runs and writes: from here on never undone (its writes would be lost)
                self._switched(forward)
                return True
        if dr_status == "gone":
            raise DrtoolError(f"the DR copy of {self.vm.name} is gone and home cannot run: the failback cannot finish")
        self._undo(switched)
        return False

    def _undo(self, switched: bool) -> None:
        with self.work.session() as qmp:
            if not switched:
                cancel_migration(qmp)
        self.kill_home()
        with self.work.session() as qmp:
            if str(qmp.execute("query-status")["status"]) != "running":
                qmp.execute("cont")
            reverse = self.work.reverse_of(qmp)
            jobs = query_jobs(qmp, reverse)
            rollback = reverse_bitmap_on(qmp, [d.node_name for d in reverse.disks])
        if target_pid(self.home, self.work.layout) is None:
            start_target(self.home, reverse, self.work.layout)
        start_link(self.dr, self.work.rvm, reverse)
        record = self.work.record.without(LIVE_HOME_STARTED, LIVE_MIGRATING)
        if len(jobs) < len(reverse.disks) and rollback is not None:  # the mirrors went: catch up from the bitmap
            record = replace(record.without(MIRRORS_STARTED), method=BITMAP_METHOD)
            self.work.manifest = replace(self.work.manifest, failover=_with_migration(
                self.work.manifest.failover, {"reverse_bitmap": rollback}))
        self.work.record = record
        self.work.save(Protection.REPROTECTED, "live failback undone")


def _with_migration(record: FailoverRecord | None, changes: dict[str, object]) -> FailoverRecord | None:
    return replace(record, migration=(record.migration or {}) | changes) if record is not None else None
