"""`drtool resync`: bring a broken replica up to date by sending only what changed.

Made for cron: when all is well it changes nothing. Otherwise, in order of
preference:

1. "resumed": the source's mirror jobs still exist, paused after the target
   failed (link cut longer than reconnect-delay, DR target killed). A paused
   mirror keeps tracking every guest write in its own dirty bitmap. Restart the
   DR target if it died (same replicas, same export), let the NBD client
   reconnect, resume the jobs: they copy only what was written meanwhile.
2. "bitmap": the jobs are gone (the source QEMU restarted, a job aborted) but
   drtool's persistent bitmap survived on every disk (a clean QEMU shutdown
   writes it to the qcow2). It holds every write since protection (or the
   previous resync). Copy those blocks with bitmap backups while the VM runs,
   pause the VM for one last small round, start fresh mirrors with sync=none
   (in sync at once), resume the VM.
3. "hash": neither survived (QEMU was killed: its bitmap comes back
   inconsistent) but the replica was complete once (not seeding): both sides
   are hashed and only the chunks that differ are sent, then mirrors start
   with sync=none (mechanics/hash_resync.py, drtool check's machinery).
4. "full": the initial sync never finished: every allocated block is copied.

In tiers 3 and 4 the manifest trusts no bitmap while the copy runs; the new
persistent bitmap is added before the copy (every write from then on is in
it) and trusted only once the replicas are in sync.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from drtool.absent import absent_is_none
from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, QmpError, UsageError
from drtool.mechanics.dr_target import (
    PSK_USER,
    TargetLayout,
    source_tls_dir,
    start_target,
    target_pid,
)
from drtool.mechanics.fleet import read_dr_sides
from drtool.mechanics.hash_resync import hash_resync
from drtool.mechanics.link import link_socket, start_link, stop_link_and_target
from drtool.mechanics.old_site import look_at_old_site, refuse_split_brain
from drtool.mechanics.pausing import paused_source, resume_own_pause
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.replication import (
    DiskProgress,
    JobState,
    ProgressCallback,
    add_bitmaps,
    attach_target,
    cancel_mirrors,
    current_nodes,
    detach_target,
    distrusting_bitmaps,
    job_id,
    mirror_dirty_bytes,
    nbd_node,
    query_jobs,
    remove_bitmaps,
    rotate_bitmaps,
    start_mirrors,
    trusted_bitmap,
    trusting_bitmap,
    wait_until_ready,
)
from drtool.services.concurrent import (
    SETUPS_PER_HOST,
    FleetReport,
    VmOutcome,
    for_each_vm,
)
from drtool.state.manifest import Manifest
from drtool.state.protection import Protection
from drtool.state.store import require_protected, save_manifest, select_vm, select_vms
from drtool.transport.connections import Reach, RemoteShell, batched
from drtool.transport.qmp import QmpSession

RECONNECT_WAIT = 60.0  # s to wait for the NBD client to reach a restarted target


@dataclass(frozen=True)
class ResyncResult:
    vm: str
    action: str  # none | resumed | bitmap | hash | full
    bytes_sent: int
    seconds: float
    paused_seconds: float = 0.0  # how long the VM was paused (bitmap and hash resyncs)
    target_restarted: bool = False
    detail: str | None = None
    notes: tuple[str, ...] = ()  # what else drtool did on the way (resumed a VM it had left paused)

    def __post_init__(self) -> None:
        absent_is_none(self, "detail")


def resync_many(inventory: Inventory, reach: Reach, names: Sequence[str] = (), *,
                all_vms: bool = False) -> FleetReport[ResyncResult]:
    """resync of several VMs (or, with all_vms, of every protected one) at once, each on its own.

    With all_vms the manifests are read first (one command per DR host): VMs not
    protected, or failed over, are left out and say so, the rest are resynced.
    """
    if bool(names) == all_vms:
        raise UsageError("name the VMs to resync, or pass --all (not both)")
    vms = select_vms(inventory, names)
    skipped: dict[str, VmOutcome[ResyncResult]] = {}
    if all_vms:
        for name, side in read_dr_sides(reach, vms).items():
            if side.error:
                skipped[name] = VmOutcome(name, None, side.error, side.exit_code)
            elif side.manifest is None or _left_out(side.manifest.state):
                state = side.manifest.state.value if side.manifest else "not protected"
                skipped[name] = VmOutcome(name, skipped=f"{state}: skipped")  # a failover half-done is refused
    with batched(reach) as through:  # one agent per host (transport/agent.py)
        return for_each_vm(lambda vm: resync(inventory, through, vm.name), vms, skipped,
                           per_host=SETUPS_PER_HOST)


def _left_out(state: Protection) -> bool:
    """Not for resync --all: unprotected, failed over, or in drtool recover's hands."""
    return state is Protection.UNPROTECTED or (state.failing_over and state is not Protection.FAILING_OVER)


def resync(inventory: Inventory, reach: Reach, vm_name: str,
           on_progress: ProgressCallback | None = None) -> ResyncResult:
    started = time.monotonic()
    vm = select_vm(inventory, vm_name)
    dr = reach.shell(vm.dr_host)
    layout = TargetLayout(vm.replica_dir)
    with reach.lock(vm):
        manifest = load_settled_manifest(dr, vm)
        if manifest is not None:  # after a failover: a QEMU back on the old images is said first (split brain)
            refuse_split_brain(look_at_old_site(reach, vm, manifest), vm, "resync")
        manifest = require_protected(manifest, vm)
        manifest, resumed = resume_own_pause(reach, dr, vm, manifest)
        notes = (resumed,) if resumed else ()
        restarted = False
        if target_pid(dr, layout) is None:
            start_target(dr, manifest, layout)
            restarted = True
        start_link(reach.shell(vm.host), vm, manifest)  # no-op while the relay runs
        with reach.qmp(vm) as qmp:
            jobs = query_jobs(qmp, manifest)
            wanted = [job_id(i) for i in range(len(manifest.disks))]
            healthy = all(j in jobs and jobs[j].ready and not jobs[j].broken for j in wanted)
            def save(m: Manifest) -> None:
                save_manifest(dr, vm, m)

            if healthy and not restarted:
                settled = manifest.state is Protection.PROTECTED
                if not settled:
                    manifest = manifest.transition(Protection.PROTECTED, "in sync at resync")
                _rotate(qmp, manifest, current_nodes(qmp, manifest), save, always_save=not settled)
                return ResyncResult(vm.name, "none", 0, time.monotonic() - started, notes=notes)
            # the replicas are being copied into from here on: not a consistent image until in sync
            seeding = manifest.state is Protection.SEEDING
            if not seeding:
                manifest = manifest.transition(Protection.RESYNCING, "resync started")
                save(manifest)
            if all(j in jobs and not jobs[j].ended for j in wanted):
                nodes = current_nodes(qmp, manifest)
                sent = _resume(qmp, manifest, nodes, on_progress)
                manifest = _rotate(qmp, manifest, nodes, save)
                result = ResyncResult(vm.name, "resumed", sent, time.monotonic() - started, 0.0, restarted)
            else:
                result, manifest = _restart_replication(_Catchup(reach, dr, vm, qmp), manifest, seeding, jobs,
                                                        on_progress, started, restarted, save)
        save_manifest(dr, vm, manifest.transition(Protection.PROTECTED, f"resync: {result.action}"))
    return replace(result, notes=notes)


@dataclass(frozen=True)
class _Catchup:
    """What a resync that restarts replication works with."""

    reach: Reach
    dr: RemoteShell
    vm: Vm
    qmp: QmpSession


def _rotate(qmp: QmpSession, manifest: Manifest, nodes: list[str], save: Callable[[Manifest], None],
            always_save: bool = False) -> Manifest:
    """A new bitmap generation, recorded in the manifest before the older generations go."""
    name = rotate_bitmaps(qmp, manifest, nodes)
    if name is None:
        if always_save:
            save(manifest)
        return manifest
    manifest = trusting_bitmap(manifest, name)
    save(manifest)
    remove_bitmaps(qmp, nodes, keep=name)
    return manifest


def _resume(qmp: QmpSession, manifest: Manifest, nodes: list[str], on_progress: ProgressCallback | None) -> int:
    """Resume paused jobs until they have caught up; the bytes they copied meanwhile.

    A resumed job may fail again while QEMU's NBD client is still reconnecting
    (the link relay holds its new connection until the target answers): resume
    it again. Give up only when nothing has moved for RECONNECT_WAIT seconds.
    Caught up: the mirrors' dirty bitmaps are empty and len == offset, twice
    in a row (see wait_drained); rotate_bitmaps, which follows, waits until
    that has held longer than the mirrors' polling interval.
    """
    held = 0
    before = {j: s.offset for j, s in query_jobs(qmp, manifest).items()}
    last_offsets, last_progress = dict(before), time.monotonic()
    while True:
        jobs = query_jobs(qmp, manifest)
        for jid, job in jobs.items():
            if job.paused:
                with contextlib.suppress(QmpError):  # resumed meanwhile
                    qmp.execute("block-job-resume", {"device": jid})
        if on_progress:
            on_progress([DiskProgress(j.device, j.length, j.offset, j.remaining == 0 and not j.broken)
                         for j in jobs.values()])
        offsets = {j: s.offset for j, s in jobs.items()}
        if offsets != last_offsets:
            last_offsets, last_progress = offsets, time.monotonic()
        caught_up = all(j.ready and not j.broken and j.length == j.offset for j in jobs.values())
        held = held + 1 if caught_up and mirror_dirty_bytes(qmp, nodes) == 0 else 0
        if held >= 2:
            return sum(max(0, offsets[j] - before.get(j, 0)) for j in offsets)
        if time.monotonic() - last_progress > RECONNECT_WAIT:
            raise DrtoolError(f"replication of {manifest.vm} made no progress for {RECONNECT_WAIT:g} s after "
                              "resuming", hint=f"check the link to {manifest.dr_host} and the DR target, then "
                              "run drtool resync again")
        time.sleep(0.05)


def _restart_replication(run: _Catchup, manifest: Manifest, seeding: bool, jobs: dict[str, JobState],
                         on_progress: ProgressCallback | None, started: float, restarted: bool,
                         save: Callable[[Manifest], None]) -> tuple[ResyncResult, Manifest]:
    qmp, vm = run.qmp, run.vm
    if jobs:  # some but not all jobs survived, or ended ones: start over together
        cancel_mirrors(qmp, manifest)
    if not restarted:
        _fresh_link_and_target(run, manifest)
    nodes = current_nodes(qmp, manifest)
    _ensure_target_nodes(qmp, manifest, vm)
    bitmap = None if seeding else trusted_bitmap(qmp, manifest, nodes)
    if bitmap is not None:
        sent, paused = _bitmap_catch_up(run, manifest, nodes, bitmap)
        wait_until_ready(qmp, manifest, on_progress)
        manifest = _rotate(qmp, manifest, nodes, save)
        return ResyncResult(manifest.vm, "bitmap", sent, time.monotonic() - started, paused, restarted,
                            "replication jobs were gone; sent the blocks drtool's persistent bitmap "
                            "recorded"), manifest
    if seeding:
        why = "the initial sync never completed"
    elif manifest.bitmap_name:
        why = "the source QEMU stopped uncleanly: its change tracking (persistent bitmap) is lost"
    else:
        why = "no change tracking was trusted (a full copy had not finished)"
    # Nothing trusted while the copy runs: killed half-way, the next resync copies (or compares) again.
    manifest = distrusting_bitmaps(manifest)
    save(manifest)
    name = add_bitmaps(qmp, manifest, nodes)  # before the copy: every write from here on is in it
    if not seeding:  # the replicas were whole once: compare digests, send only what differs
        done = hash_resync(run.reach, qmp, manifest, vm, nodes)
        wait_until_ready(qmp, manifest, on_progress)
        manifest = trusting_bitmap(manifest, name)
        return ResyncResult(manifest.vm, "hash", done.sent_bytes, time.monotonic() - started, done.paused_seconds,
                            restarted,
                            f"{why}: compared digests in {done.rounds} round(s) ({done.digest_bytes} bytes), "
                            "sent the chunks that differ"), manifest
    start_mirrors(qmp, manifest, nodes, sync="full")
    wait_until_ready(qmp, manifest, on_progress)
    manifest = trusting_bitmap(manifest, name)
    sent = sum(j.offset for j in query_jobs(qmp, manifest).values())
    return ResyncResult(manifest.vm, "full", sent, time.monotonic() - started, 0.0, restarted,
                        f"full sync: {why}"), manifest


def _fresh_link_and_target(run: _Catchup, manifest: Manifest) -> None:
    """End every replication connection of the source's earlier life before anything is compared or copied.

    Writes of a QEMU that died (or of jobs that ended) may still sit in the
    link relay or in either host's socket buffers; landing on a replica after
    it was hashed or copied, they would leave it silently different. Stopping
    the relay and the target drops them all; both start again on the same
    replicas, and the NBD nodes are attached anew.
    """
    detach_target(run.qmp, manifest)
    layout = TargetLayout(run.vm.replica_dir)
    source = run.reach.shell(run.vm.host)
    stop_link_and_target(source, run.vm, run.dr, layout)
    start_target(run.dr, manifest, layout)
    start_link(source, run.vm, manifest)


def _ensure_target_nodes(qmp: QmpSession, manifest: Manifest, vm: Vm) -> None:
    """Re-add the TLS object and NBD nodes a restarted QEMU no longer has."""
    names = {n.get("node-name") for n in qmp.execute("query-named-block-nodes", {"flat": True})}
    if all(nbd_node(i) in names for i in range(len(manifest.disks))):
        return
    detach_target(qmp, manifest)
    attach_target(qmp, manifest, link_socket(vm), source_tls_dir(vm), PSK_USER)


def _bitmap_catch_up(run: _Catchup, manifest: Manifest, nodes: list[str], bitmap: str) -> tuple[int, float]:
    """Copy the bitmap's blocks while the VM runs, then once more paused, then mirror from now on."""
    qmp = run.qmp
    sent = bitmap_backup_round(qmp, manifest, nodes, bitmap)
    paused_at = time.monotonic()
    with paused_source(run.reach, run.dr, run.vm, manifest, qmp, "resync"):  # recorded first
        paused_at = time.monotonic()
        sent += bitmap_backup_round(qmp, manifest, nodes, bitmap)
        start_mirrors(qmp, manifest, nodes, sync="none")
    return sent, time.monotonic() - paused_at


def bitmap_backup_round(qmp: QmpSession, manifest: Manifest, nodes: list[str], bitmap: str,
                         timeout: float = 3600) -> int:
    """Copy the bitmap's blocks to the replicas; the bytes sent.

    The jobs are watched through query-jobs (they stay, concluded, until
    dismissed); events only wake the wait early. Through libvirt an event can
    come before `virsh qemu-monitor-event` listens, and a wait on it alone
    would never end.
    """
    ids = [f"drtool-catchup{i}" for i in range(len(nodes))]
    for jid in ids:  # concluded by a run killed before it dismissed them: the ids must be free
        with contextlib.suppress(QmpError):
            qmp.execute("job-dismiss", {"id": jid})
    sent = 0
    with qmp.subscribe(["BLOCK_JOB_COMPLETED"]) as events:
        for i, node in enumerate(nodes):
            qmp.execute("blockdev-backup", {
                "job-id": ids[i], "device": node, "target": nbd_node(i), "sync": "bitmap",
                "bitmap": bitmap, "bitmap-mode": "on-success", "auto-dismiss": False,
            })
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while pending:
            for job in qmp.execute("query-jobs"):
                if job.get("id") in pending and job.get("status") == "concluded":
                    qmp.execute("job-dismiss", {"id": job["id"]})
                    if job.get("error"):
                        raise DrtoolError(f"catching up {manifest.vm} failed: {job['error']}",
                                          hint=f"check the link to {manifest.dr_host} and run drtool resync again")
                    pending.discard(job["id"])
                    sent += int(job.get("current-progress", 0))
            if pending and time.monotonic() > deadline:
                raise DrtoolError(f"catching up {manifest.vm} from its bitmap did not finish in {timeout:g} s")
            if pending:
                events.get(timeout=0.05)
    return sent
