"""`drtool recover VM --failback`: a planned failover back to the original host (RPO 0), then protection again.

From reprotected (the DR copy replicates onto the old images, in sync):

  dr-paused        the DR copy paused (recorded before the QMP stop)
  reverse-stopped  its mirrors drained (nothing left to copy: the old images equal the DR copy's disks),
                   then cancelled; the reverse target and relay gone
  dr-stopped       the DR copy quits: never two running copies
  home-started     the VM starts on its original host from its own command line, paused (-S)
                   (a libvirt domain: `virsh start --paused` of the home domain, defined again from
                   the kept definition if libvirt lost it; the DR domain was destroyed, not quit)
  forward-started  replication in the original direction, onto the images the DR copy ran on (the DR
                   target exports them again): mirrors with sync=none, since both sides hold the same
                   bytes; nothing is copied but what the guest writes from now on
  then the VM runs (cont) and the state is protected; a libvirt VM's DR domain is undefined and its
  home domain's autostart restored as the failover recorded it (both idempotent, redone by a re-run).

State: reprotected -> failing-back -> protected. Run again, the same command
finishes from the first step not recorded, re-checking it on the hosts. Before
reverse-stopped a failure resumes the DR copy and goes back to reprotected.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from drtool.domain import Inventory
from drtool.errors import DrtoolError, QmpError, Refused, UnreachableError
from drtool.mechanics.added_disks import with_added_disks
from drtool.mechanics.dr_target import (
    PSK_USER,
    TargetLayout,
    new_psk,
    push_psk,
    source_tls_dir,
    start_target,
    stop_target,
    target_pid,
)
from drtool.mechanics.dr_vm import dr_run_layout, dr_vm_session, kill_vm, vm_pid
from drtool.mechanics.hardware import source_qemu_alive
from drtool.mechanics.libvirt_domain import (
    domain_name,
    remove_dr_domain,
    restore_source_autostart,
    start_source_domain_paused,
)
from drtool.mechanics.libvirt_migration import destroy_domain
from drtool.mechanics.link import give_to_qemu, link_socket, start_link, stop_link
from drtool.mechanics.old_site import (
    look_at_old_site,
    refuse_split_brain,
    unmark_old_images,
)
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.replication import (
    add_bitmaps,
    attach_target,
    cancel_mirrors,
    current_nodes,
    detach_target,
    query_jobs,
    start_mirrors,
    trusting_bitmap,
    wait_drained,
    wait_until_ready,
)
from drtool.state.manifest import Manifest, now
from drtool.state.protection import Protection
from drtool.state.store import save_manifest, select_vm
from drtool.transport.connections import Reach

from .reprotect import ReverseReplication

DR_PAUSED, REVERSE_STOPPED, DR_STOPPED = "dr-paused", "reverse-stopped", "dr-stopped"
LIVE_HOME_STARTED = "live-home-started"  # the first step of a live failback (failback_live.py)
HOME_STARTED, FORWARD_STARTED = "home-started", "forward-started"
DRAIN_TIMEOUT = 60.0
QUIT_TIMEOUT = 30.0


@dataclass(frozen=True)
class FailbackResult:
    vm: str
    host: str  # where it runs again
    dr_host: str  # where it is replicated again
    rto_seconds: float  # command start to the VM running at home
    rpo_seconds: float  # 0: the DR copy was paused and drained first
    dropped_points: tuple[str, ...]  # points of a branch the DR copy did not run on (unplanned from an older point)
    resumed: bool


def failback(inventory: Inventory, reach: Reach, name: str) -> FailbackResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    with reach.lock(vm):
        manifest = load_settled_manifest(dr, vm)
        if manifest is None or manifest.state not in (Protection.REPROTECTED, Protection.FAILING_BACK):
            state = manifest.state.value if manifest else "not protected"
            raise Refused(f"{vm.name} is not reprotected (state {state}): fail back only once the DR copy is "
                          "replicated home", hint=f"run drtool recover {vm.name} --reprotect first")
        home = reach.shell(vm.host)
        refuse_split_brain(look_at_old_site(reach, vm, manifest), vm, "failback")
        record = manifest.reprotect
        if record is None:
            raise Refused(f"{vm.name} has no reprotect record", hint="this is a drtool bug; please report it")
        if record.done(LIVE_HOME_STARTED):  # its home QEMU may be the migration's destination, or run already
            raise Refused(f"a live failback of {vm.name} is under way",
                          hint=f"finish or undo it with drtool recover {vm.name} --failback --live")
        work = ReverseReplication(inventory, reach, vm, manifest, record, dr, home)
        resumed = manifest.state is Protection.FAILING_BACK
        if not resumed:
            if not work.healthy():
                raise Refused(f"reverse replication of {vm.name} is not in sync: a failback now would lose writes",
                              hint=f"run drtool recover {vm.name} --reprotect first")
            work.save(Protection.FAILING_BACK, "failback started")
        run_layout = dr_run_layout(vm.replica_dir)
        libvirt_xml = work.manifest.hardware.get("libvirt_xml") if vm.libvirt_domain is not None else None
        if not work.record.done(REVERSE_STOPPED):
            with work.session() as qmp:
                reverse = work.reverse_of(qmp)  # the reverse direction reprotect set up
                jobs = query_jobs(qmp, reverse)
                status = str(qmp.execute("query-status")["status"])
                if status == "running":
                    work.step(DR_PAUSED)
                    qmp.execute("stop")
                nodes = [d.node_name for d in reverse.disks]
                if jobs and not wait_drained(qmp, reverse, nodes, DRAIN_TIMEOUT):
                    qmp.execute("cont")
                    work.record = work.record.without(DR_PAUSED)
                    work.save(Protection.REPROTECTED, "failback undone: reverse replication did not drain")
                    raise DrtoolError(f"reverse replication of {vm.name} did not drain in {DRAIN_TIMEOUT:g} s; "
                                      "the DR copy runs on", hint="check the link, then run the failback again")
                if not jobs and not work.record.done(DR_PAUSED):
                    raise Refused(f"the reverse mirrors of {vm.name} are gone", hint=f"run drtool recover "
                                  f"{vm.name} --reprotect, then fail back")
                # jobs gone with the copy paused by us: a killed run cancelled them after the drain
                if jobs:
                    cancel_mirrors(qmp, reverse)
                detach_target(qmp, reverse)
            stop_link(dr, work.rvm)
            stop_target(home, work.layout)
            work.step(REVERSE_STOPPED)
        if not work.record.done(DR_STOPPED):
            if libvirt_xml is not None:  # libvirt ends its domain (kept defined until home runs)
                destroy_domain(dr, vm, domain_name(libvirt_xml))
            else:
                with contextlib.suppress(UnreachableError, QmpError), dr_vm_session(reach, vm) as qmp:
                    qmp.execute("quit")
                deadline = time.monotonic() + QUIT_TIMEOUT
                while vm_pid(dr, run_layout) is not None and time.monotonic() < deadline:
                    time.sleep(0.2)
                kill_vm(dr, run_layout)
            work.step(DR_STOPPED)
        if not work.record.done(HOME_STARTED):
            if libvirt_xml is not None:
                start_source_domain_paused(home, vm, libvirt_xml)  # nothing if it runs already
            elif not source_qemu_alive(home, vm):
                home.run(home_argv(work.manifest), timeout=60)
            unmark_old_images(home, [d.source_image for d in work.manifest.disks])
            work.step(HOME_STARTED)
        manifest, dropped = forward_manifest(work.manifest, vm.replica_dir)
        if not work.record.done(FORWARD_STARTED):
            layout = TargetLayout(vm.replica_dir)
            stop_target(dr, layout)
            psk = new_psk() if manifest.transport == "tls-psk" else None
            if psk:
                push_psk(dr, layout.tls_dir, psk)
                push_psk(home, source_tls_dir(vm), psk)
                give_to_qemu(home, manifest, vm.source_state_dir, source_tls_dir(vm))  # libvirt's QEMU user
            if target_pid(dr, layout) is None:
                start_target(dr, manifest, layout)
            stop_link(home, vm)
            start_link(home, vm, manifest)
            with reach.qmp(vm) as qmp:
                detach_target(qmp, manifest)  # a killed earlier run's nodes
                nodes = current_nodes(qmp, manifest)
                attach_target(qmp, manifest, link_socket(vm), source_tls_dir(vm) if psk else None, PSK_USER)
                bitmap = add_bitmaps(qmp, manifest, nodes)
                start_mirrors(qmp, manifest, nodes, sync="none")  # both sides hold the same bytes
                wait_until_ready(qmp, manifest)
            manifest = trusting_bitmap(manifest, bitmap)
            work.manifest = manifest
            work.step(FORWARD_STARTED)
        with reach.qmp(vm) as qmp:
            if qmp.execute("query-status")["status"] != "running":
                qmp.execute("cont")
        rto = time.monotonic() - started
        if libvirt_xml is not None and vm.libvirt_domain is not None:
            remove_dr_domain(dr, vm, libvirt_xml)  # destroyed at dr-stopped: undefined now
            restore_source_autostart(home, vm)
        history_note = f"failed back from {vm.dr_host} at {now()}"
        save_manifest(dr, vm, replace(work.manifest.transition(Protection.PROTECTED, history_note),
                                      failover=None, reprotect=None, drill=None))
    return FailbackResult(vm.name, vm.host, vm.dr_host, round(rto, 3), 0.0, dropped, resumed)


def home_argv(manifest: Manifest) -> list[str]:
    """The VM's own command line at home, paused (-S) and daemonized."""
    argv = [a for a in manifest.hardware["argv"] if a not in ("-daemonize", "-S")]
    return [*with_added_disks(manifest, argv), "-S", "-daemonize"]


def forward_manifest(manifest: Manifest, replica_dir: PurePosixPath) -> tuple[Manifest, tuple[str, ...]]:
    """The manifest of the original direction: the replicas are the images the DR copy ran on.

    After an unplanned failover those are its overlays above the point it
    started from; points taken after that point lie on a branch the DR copy
    never ran on: they leave the manifest (their images stay on disk).
    """
    record = manifest.failover
    unplanned_overlays = record is not None and record.kind.value == "unplanned"
    if not unplanned_overlays:
        return manifest, ()
    disks = tuple(replace(d, replica_image=str(replica_dir / "failover" / f"{d.device}.qcow2"))
                  for d in manifest.disks)
    start = manifest.point(record.point or "") if record else None
    keep = manifest.points if start is None else manifest.points[:manifest.points.index(start) + 1]
    dropped = tuple(p.id for p in manifest.points if p not in keep)
    return replace(manifest, disks=disks, points=keep), dropped
