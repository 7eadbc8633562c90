"""`drtool recover VM --reprotect`: protect a failed-over VM back towards its original host.

The DR copy runs on the DR host on overlays above the point it started from
(unplanned) or on the replica tops above the final point (planned): either
way its disks are "the point" plus the allocation of their top image, which
is exactly what the DR copy wrote since the failover. The original host's
old images are the seed:

  rewound          the old images are set back to the point where they differ from it
                   (block hashes computed on each host, only digests cross the network;
                   see mechanics/block_hashes.py): the writes the old primary made after
                   the point, which never reached the DR side (none after a planned one)
  target-started   a qemu-storage-daemon on the original host exports the old images
                   (NBD, TLS with a fresh pre-shared key), the link relay runs on the DR host
  mirrors-started  the DR copy's QEMU mirrors each disk with sync=top: only its top's
                   allocation is sent, then every new write
  in-sync          the mirrors are ready: state reprotected

State: failed-over -> reprotecting -> reprotected; each step is recorded
before the next acts. Run again, the same command finishes: mirror jobs that
still exist (drtool killed, the link cut: they paused and track every write)
are resumed with their target and relay restarted if gone; without them (the
DR copy's QEMU restarted) the steps run again from the rewind, which is
correct whatever an earlier run had written into the old images (the rewind
sets every block that differs from the point back to it, and the mirror then
sends the whole top again).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, QmpError, Refused
from drtool.mechanics.block_hashes import copy_chunks, differing_offsets, hash_image
from drtool.mechanics.blockinfo import parse_query_block
from drtool.mechanics.dr_target import (
    PSK_USER,
    TargetLayout,
    free_nbd_port,
    new_psk,
    push_psk,
    source_tls_dir,
    start_target,
    stop_target,
    target_pid,
)
from drtool.mechanics.dr_vm import dr_run_layout, dr_vm_session
from drtool.mechanics.link import give_to_qemu, link_pid, link_socket, start_link, stop_link
from drtool.mechanics.old_site import look_at_old_site, refuse_split_brain
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.replication import (
    JobState,
    ProgressCallback,
    attach_target,
    cancel_mirrors,
    detach_target,
    filter_node,
    query_jobs,
    start_mirrors,
    wait_until_ready,
)
from drtool.state.manifest import Manifest, ReplicaDisk, now
from drtool.state.protection import Protection
from drtool.state.records import FailoverKind, ReprotectRecord
from drtool.state.store import save_manifest, select_vm
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession
from drtool.transport.ssh import resolve_endpoint

from .reverse_bitmap import BITMAP_METHOD, PAUSED, catch_up_from_bitmap, drop_reverse_bitmap, live_reverse_bitmap

REWOUND, TARGET_STARTED, MIRRORS_STARTED, IN_SYNC = "rewound", "target-started", "mirrors-started", "in-sync"
# Test hook: SIGKILL drtool right after this step is recorded (only with DRTOOL_TEST_HOOKS=1), as failover's.
FAULT_ENV = "DRTOOL_FAULT_AFTER_STEP"
HOOKS_ENV = "DRTOOL_TEST_HOOKS"


def killed_after(step: str) -> None:
    if os.environ.get(HOOKS_ENV) == "1" and os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class ReprotectResult:
    vm: str
    from_host: str  # where the VM runs (the DR host)
    to_host: str  # its original host, now the replication target
    method: str
    point: str | None
    rewound_bytes: int  # old-host blocks set back to the point
    hashed_bytes: int  # digests that crossed the network to find them
    sent_bytes: int  # what the mirrors copied
    disk_bytes: int  # the disks' virtual size
    step_seconds: dict[str, float]  # each step's time (rewound: hashing both sides and the rewind itself)
    seconds: float
    resumed: bool  # an interrupted reprotect was finished, not started over
    already: bool = False  # it was reprotected and in sync: nothing done


def reverse_vm(inventory: Inventory, vm: Vm) -> Vm:
    """The VM as replication back home sees it: runs on the DR host, replicates onto the original host.

    Its link relay lives in <drtool_dir>/rev on the DR host (socket and pid file named by the VM): a
    UNIX socket path must stay under 108 bytes. Its target's files go to <source_dir>/reverse. A libvirt
    domain keeps its libvirt_domain: the DR host's libvirt runs the copy under the same name, so
    Reach.qmp reaches it through virsh there (dr_copy_session).
    """
    return replace(vm, host=vm.dr_host, qmp_socket=dr_run_layout(vm.replica_dir).qmp_socket, dr_host=vm.host,
                   replica_dir=vm.source_state_dir / "reverse",
                   source_dir=inventory.hosts[vm.dr_host].drtool_dir / "rev")


def reverse_manifest(manifest: Manifest, inventory: Inventory, vm: Vm, nodes: dict[str, str],
                     port: int) -> Manifest:
    """A manifest of the reverse direction for the replication mechanics (never saved)."""
    home = inventory.hosts[vm.host]
    address = home.replication_address or resolve_endpoint(home).hostname
    disks = tuple(ReplicaDisk(d.device, nodes.get(d.device, d.node_name), "qcow2", d.virtual_size,
                              d.replica_image, d.source_image, d.device) for d in manifest.disks)
    qemu_user: dict[str, object] = {k: manifest.hardware[k] for k in ("uid", "gid") if k in manifest.hardware} \
        if vm.libvirt_domain is not None else {}  # the DR domain's QEMU opens the relay and the key itself
    return Manifest(vm.name, vm.dr_host, vm.host, manifest.mode, manifest.transport, address, port, disks,
                    state=Protection.PROTECTED, hardware=qemu_user)


def dr_copy_session(reach: Reach, rvm: Vm, vm: Vm) -> QmpSession:
    """QMP to the DR copy: through virsh on the DR host for a libvirt domain, else drtool's own monitor."""
    if rvm.libvirt_domain is not None:
        return reach.qmp(rvm)
    return dr_vm_session(reach, vm)


def reprotect(inventory: Inventory, reach: Reach, name: str, *,
              on_progress: ProgressCallback | None = None) -> ReprotectResult:
    started = time.monotonic()
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
    with reach.lock(vm):
        manifest = load_settled_manifest(dr, vm)
        manifest = _require_failed_over(manifest, vm)
        home = reach.shell(vm.host)  # unreachable: exit 3, nothing changed
        refuse_split_brain(look_at_old_site(reach, vm, manifest), vm, "reprotect")
        not_qcow2 = [d.source_image for d in manifest.disks if d.format != "qcow2"]
        if not_qcow2:
            raise Refused(f"{vm.name}: reprotect needs qcow2 images on {vm.host}; {not_qcow2[0]} is not",
                          hint="convert the old image to qcow2, or protect the VM anew from the DR host")
        resumed = manifest.state is not Protection.FAILED_OVER
        record = manifest.reprotect
        if record is None or manifest.state is Protection.FAILED_OVER:
            method = BITMAP_METHOD if live_reverse_bitmap(manifest) else "hashes"
            record = ReprotectRecord(now(), method, point_below_tops(manifest),
                                     free_nbd_port(home), disk_bytes=sum(d.virtual_size for d in manifest.disks))
        work = ReverseReplication(inventory, reach, vm, manifest, record, dr, home)
        if manifest.state is Protection.REPROTECTED and work.healthy():
            return work.result(started, resumed=False, already=True)
        work.save(Protection.REPROTECTING, "reprotect started" if not resumed else "reprotect resumed")
        work.run(on_progress)
        took = round(time.monotonic() - work.step_started, 3)
        work.record = work.record.with_step(IN_SYNC, seconds=round(time.monotonic() - started, 3), finished_at=now(),
                                            step_seconds=work.record.step_seconds | {IN_SYNC: took})
        work.save(Protection.REPROTECTED, "reprotect in sync")
    return work.result(started, resumed=resumed)


def point_below_tops(manifest: Manifest) -> str | None:
    """The point the DR copy's disks are "that point plus their top": what the old images are rewound to.

    Unplanned: the point it started from. Planned (cold or live): the newest
    point, right below the replica tops it runs on; that is the final point, or
    one taken on the DR copy since (dr_points.py), whose images hold what it
    wrote before.
    """
    record = manifest.failover
    if record is None:
        return None
    if record.kind is FailoverKind.UNPLANNED or not manifest.points:
        return record.point
    return manifest.points[-1].id


def _require_failed_over(manifest: Manifest | None, vm: Vm) -> Manifest:
    if manifest is None or manifest.state is Protection.UNPROTECTED:
        raise Refused(f"{vm.name} is not protected: there is nothing to recover",
                      hint=f"see drtool status {vm.name}")
    if manifest.state not in (Protection.FAILED_OVER, Protection.REPROTECTING, Protection.REPROTECTED):
        raise Refused(f"{vm.name} has not failed over (state {manifest.state.value}): reprotect protects a "
                      "failed-over VM back to its original host", hint=f"see drtool status {vm.name}")
    if manifest.failover is None or (point_below_tops(manifest) is None and live_reverse_bitmap(manifest) is None):
        raise Refused(f"{vm.name}'s failover record names no point to start from",
                      hint="this is a drtool bug; nothing was changed, please report it")
    return manifest


class ReverseReplication:
    def __init__(self, inventory: Inventory, reach: Reach, vm: Vm, manifest: Manifest, record: ReprotectRecord,
                 dr: RemoteShell, home: RemoteShell) -> None:
        self.inventory, self.reach, self.vm, self.manifest, self.record = inventory, reach, vm, manifest, record
        self.dr, self.home = dr, home
        self.rvm = reverse_vm(inventory, vm)
        self.layout = TargetLayout(self.rvm.replica_dir)
        self.step_started = time.monotonic()
        self.backup_sent = 0  # bitmap method: what the catch-up rounds sent before the mirrors started

    def save(self, state: Protection | None = None, note: str = "") -> None:
        manifest = self.manifest if state is None else self.manifest.transition(state, note)
        self.manifest = replace(manifest, reprotect=self.record)
        save_manifest(self.dr, self.vm, self.manifest)

    def step(self, name: str, **changes: object) -> None:
        took = round(time.monotonic() - self.step_started, 3)
        self.step_started = time.monotonic()
        self.record = self.record.with_step(name, step_seconds=self.record.step_seconds | {name: took}, **changes)
        self.save()
        killed_after(name)

    def reverse_of(self, qmp: QmpSession) -> Manifest:
        by_device = {d.device: d.node_name for d in parse_query_block(qmp.execute("query-block"))}
        missing = [d.device for d in self.manifest.disks if d.device not in by_device]
        if missing:
            raise DrtoolError(f"the DR copy of {self.vm.name} has no disk {missing[0]!r}")
        return reverse_manifest(self.manifest, self.inventory, self.vm, by_device, self.record.nbd_port)

    def healthy(self) -> bool:
        with self.session() as qmp:
            reverse = self.reverse_of(qmp)
            jobs = query_jobs(qmp, reverse)
        return len(jobs) == len(reverse.disks) and not any(j.broken or not j.ready for j in jobs.values())

    def session(self) -> QmpSession:
        return dr_copy_session(self.reach, self.rvm, self.vm)

    def run(self, on_progress: ProgressCallback | None) -> None:
        with self.session() as qmp:
            status = str(qmp.execute("query-status")["status"])
            if status not in ("running", "paused"):
                raise Refused(f"the DR copy of {self.vm.name} is {status!r} on {self.vm.dr_host}",
                              hint="start it (drtool failover finishes a failover), then reprotect")
            if status == "paused" and self.record.done(PAUSED):  # an earlier run paused it for its catch-up
                qmp.execute("cont")
            reverse = self.reverse_of(qmp)
            jobs = query_jobs(qmp, reverse)
            if len(jobs) == len(reverse.disks) and not any(j.ended for j in jobs.values()) \
                    and self.record.done(MIRRORS_STARTED):
                self._resume(qmp, reverse, jobs)
            else:
                self._start_over(qmp, reverse, bool(jobs))
            wait_until_ready(qmp, reverse, on_progress)
            sent = sum(j.offset for j in query_jobs(qmp, reverse).values())
        self.record = replace(self.record, sent_bytes=sent + self.backup_sent)

    def _resume(self, qmp: QmpSession, reverse: Manifest, jobs: dict[str, JobState]) -> None:
        """Jobs of an earlier run exist: bring back what they need, resume the paused ones."""
        if target_pid(self.home, self.layout) is None:
            start_target(self.home, reverse, self.layout)
        if link_pid(self.dr, self.rvm) is None:
            start_link(self.dr, self.rvm, reverse)
        for job in jobs.values():
            if job.paused or job.io_status != "ok":
                try:
                    qmp.execute("block-job-resume", {"device": job.job_id})
                except QmpError:
                    pass  # it resumed on its own (the NBD client reconnected)

    def _start_over(self, qmp: QmpSession, reverse: Manifest, leftovers: bool) -> None:
        """No usable jobs: clear what an earlier run left, rewind, start target, relay and mirrors."""
        if leftovers:
            cancel_mirrors(qmp, reverse)
        detach_target(qmp, reverse)
        stop_link(self.dr, self.rvm)
        stop_target(self.home, self.layout)  # the old images must be closed before the rewind writes them
        self.record = self.record.without(REWOUND, TARGET_STARTED, MIRRORS_STARTED)
        self.save()
        if self.record.method == BITMAP_METHOD:
            self.step(REWOUND, rewound_bytes=0, hashed_bytes=0)  # the old disks are the switch's state
        else:
            self._rewind()
        psk = new_psk() if reverse.transport == "tls-psk" else None
        if psk:
            push_psk(self.home, self.layout.tls_dir, psk)
            push_psk(self.dr, source_tls_dir(self.rvm), psk)
            give_to_qemu(self.dr, reverse, self.rvm.source_state_dir, source_tls_dir(self.rvm))
        start_target(self.home, reverse, self.layout)
        start_link(self.dr, self.rvm, reverse)
        self.step(TARGET_STARTED)
        attach_target(qmp, reverse, link_socket(self.rvm), source_tls_dir(self.rvm) if psk else None, PSK_USER)
        nodes = [d.node_name for d in reverse.disks]
        if any(n.startswith("drtool-filter") or n == filter_node(i) for i, n in enumerate(nodes)):
            raise DrtoolError(f"the DR copy of {self.vm.name} still has a mirror filter: run the command again")
        bitmap = live_reverse_bitmap(self.manifest) if self.record.method == BITMAP_METHOD else None
        if bitmap is not None:
            self.backup_sent = catch_up_from_bitmap(qmp, reverse, nodes, bitmap, self._record_pause)
        else:
            start_mirrors(qmp, reverse, nodes, sync="top")
        self.step(MIRRORS_STARTED)
        if bitmap is not None:
            drop_reverse_bitmap(qmp, nodes, bitmap)

    def _record_pause(self, paused: bool) -> None:
        self.record = self.record.with_step(PAUSED) if paused else self.record.without(PAUSED)
        self.save()

    def _rewind(self) -> None:
        """Set every chunk of the old images that differs from the point back to the point."""
        point = self.manifest.point(self.record.point or "")
        if point is None:
            raise Refused(f"{self.vm.name}'s failover point {self.record.point!r} is gone from its manifest")
        rewound = hashed = 0
        for disk in self.manifest.disks:
            with ThreadPoolExecutor(max_workers=2) as pool:  # each host hashes its own image, at once
                ours_f = pool.submit(hash_image, self.dr, point.images[disk.device], "qcow2",
                                     f"point {point.id} {disk.device}")
                theirs_f = pool.submit(hash_image, self.home, disk.source_image, disk.format,
                                       f"{self.vm.host}:{disk.source_image}")
            ours, theirs = ours_f.result(), theirs_f.result()
            hashed += ours.wire_bytes + theirs.wire_bytes
            differ = differing_offsets(ours, theirs)
            rewound += copy_chunks(self.dr, point.images[disk.device], "qcow2", self.home, disk.source_image,
                                   disk.format, differ)
        self.step(REWOUND, rewound_bytes=rewound, hashed_bytes=hashed)

    def result(self, started: float, *, resumed: bool, already: bool = False) -> ReprotectResult:
        r = self.record
        return ReprotectResult(self.vm.name, self.vm.dr_host, self.vm.host, r.method, r.point, r.rewound_bytes,
                               r.hashed_bytes, r.sent_bytes, r.disk_bytes, r.step_seconds,
                               time.monotonic() - started, resumed, already)
