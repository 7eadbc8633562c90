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
   inconsistent) but the replica was complete once: a mirror starts for new
   writes, both sides are hashed, and only the chunks that differ are sent
   (services/check_resync.py, drtool check's machinery).
4. "full": the initial sync never finished: every allocated block is copied.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from drtool.mechanics.dr_target import PSK_USER, TargetLayout, start_target, target_pid
from drtool.errors import DrtoolError, QmpError
from drtool.domain import Vm
from drtool.mechanics.link import link_socket, start_link
from drtool.transport.locks import VmLock
from drtool.state.manifest import Manifest
from drtool.mechanics.replication import (
    QUIET,
    DiskProgress,
    ProgressCallback,
    add_bitmaps,
    attach_target,
    cancel_mirrors,
    current_nodes,
    detach_target,
    job_id,
    nbd_node,
    query_jobs,
    start_mirrors,
    merged_bitmap,
    rotate_bitmaps,
    wait_until_ready,
)
from drtool.state.store import load_settled_manifest, require_protected, save_manifest, select_vm
from drtool.transport.connections import Reach
from drtool.transport.qmp import QmpSession

RECONNECT_WAIT = 60.0  # s to wait for the NBD client to reach a restarted target


@dataclass(frozen=True)
class ResyncResult:
    vm: str
    action: str  # none | resumed | bitmap | hash | full
    bytes_sent: int
    seconds: float
    paused_seconds: float = 0.0  # how long the VM was paused (bitmap resync only)
    target_restarted: bool = False
    detail: str = ""


def resync(inventory, reach: Reach, vm_name: str, on_progress: ProgressCallback | None = None) -> ResyncResult:  # noqa: ANN001
    started = time.monotonic()
    vm = select_vm(inventory, vm_name)
    dr = reach.shell(vm.dr_host)
    layout = TargetLayout(vm.replica_dir)
    with VmLock(dr, vm.name):
        manifest = require_protected(load_settled_manifest(dr, vm), vm)
        restarted = False
        if target_pid(dr, layout) is None:
            start_target(dr, manifest, layout)
            restarted = True
        start_link(reach.shell(vm.host), vm, manifest)  # no-op while the relay runs
        with reach.qmp(vm) as qmp:
            jobs = query_jobs(qmp, manifest)
            wanted = [job_id(i) for i in range(len(manifest.disks))]
            healthy = all(j in jobs and jobs[j].ready and not jobs[j].broken for j in wanted)
            if healthy and not restarted:
                rotate_bitmaps(qmp, manifest, current_nodes(qmp, manifest))
                if manifest.state != "protected":
                    save_manifest(dr, vm, manifest.with_state("protected", "in sync at resync"))
                return ResyncResult(vm.name, "none", 0, time.monotonic() - started)
            if all(j in jobs for j in wanted):
                sent = _resume(qmp, manifest, on_progress)
                rotate_bitmaps(qmp, manifest, current_nodes(qmp, manifest))
                result = ResyncResult(vm.name, "resumed", sent, time.monotonic() - started, 0.0, restarted)
            else:
                result = _restart_replication(qmp, manifest, vm, jobs, on_progress, started, restarted, reach)
        save_manifest(dr, vm, manifest.with_state("protected", f"resync: {result.action}"))
    return result


def _resume(qmp: QmpSession, manifest: Manifest, on_progress: ProgressCallback | None) -> int:
    """Resume paused jobs until they have caught up; the bytes they copied meanwhile.

    A resumed job may fail again while QEMU's NBD client is still reconnecting
    (it backs off up to 16 s between attempts): resume it again. Give up only
    when nothing has moved for RECONNECT_WAIT seconds.
    """
    before = {j: s.offset for j, s in query_jobs(qmp, manifest).items()}
    last_offsets, last_progress = dict(before), time.monotonic()
    quiet_since: float | None = None
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
        if all(j.ready and not j.broken and j.remaining == 0 for j in jobs.values()):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET:
                return sum(max(0, offsets[j] - before.get(j, 0)) for j in offsets)
        else:
            quiet_since = None
        if time.monotonic() - last_progress > RECONNECT_WAIT:
            raise DrtoolError(f"replication of {manifest.vm} made no progress for {RECONNECT_WAIT:g} s after "
                              "resuming", hint=f"check the link to {manifest.dr_host} and the DR target, then "
                              "run drtool resync again")
        time.sleep(0.25)


def _restart_replication(qmp: QmpSession, manifest: Manifest, vm: Vm, jobs: dict,
                         on_progress: ProgressCallback | None, started: float, restarted: bool,
                         reach: Reach) -> ResyncResult:
    if jobs:  # some but not all jobs survived: start over together
        cancel_mirrors(qmp, manifest)
    nodes = current_nodes(qmp, manifest)
    _ensure_target_nodes(qmp, manifest, vm)
    bitmap = merged_bitmap(qmp, nodes) if manifest.state == "protected" else None
    if bitmap is not None:
        sent, paused = _bitmap_catch_up(qmp, manifest, nodes, bitmap)
        wait_until_ready(qmp, manifest, on_progress)
        rotate_bitmaps(qmp, manifest, nodes)
        return ResyncResult(manifest.vm, "bitmap", sent, time.monotonic() - started, paused, restarted,
                            "replication jobs were gone; sent the blocks drtool's persistent bitmap recorded")
    if manifest.state == "protected":  # the replica was whole once: send only what differs now
        from drtool.services.check_resync import hash_resync

        done = hash_resync(reach, qmp, manifest, vm, nodes)
        wait_until_ready(qmp, manifest, on_progress)
        add_bitmaps(qmp, manifest, nodes)
        return ResyncResult(manifest.vm, "hash", done.sent_bytes, time.monotonic() - started, 0.0, restarted,
                            "the source QEMU stopped uncleanly (its persistent bitmap is lost): compared digests "
                            f"in {done.rounds} round(s) ({done.digest_bytes} bytes), sent the chunks that differ")
    why = "the initial sync never completed"
    start_mirrors(qmp, manifest, nodes, sync="full")
    wait_until_ready(qmp, manifest, on_progress)
    add_bitmaps(qmp, manifest, nodes)
    sent = sum(j.offset for j in query_jobs(qmp, manifest).values())
    return ResyncResult(manifest.vm, "full", sent, time.monotonic() - started, 0.0, restarted,
                        f"full sync: {why}")


def _ensure_target_nodes(qmp: QmpSession, manifest: Manifest, vm: Vm) -> None:
    """Re-add the TLS object and NBD nodes a restarted QEMU no longer has."""
    names = {n.get("node-name") for n in qmp.execute("query-named-block-nodes", {"flat": True})}
    if all(nbd_node(i) in names for i in range(len(manifest.disks))):
        return
    detach_target(qmp, manifest)
    attach_target(qmp, manifest, link_socket(vm), vm.source_state_dir / "tls", PSK_USER)


def _bitmap_catch_up(qmp: QmpSession, manifest: Manifest, nodes: list[str], bitmap: str) -> tuple[int, float]:
    """Copy the bitmap's blocks while the VM runs, then once more paused, then mirror from now on."""
    sent = _bitmap_backup_round(qmp, manifest, nodes, bitmap)
    was_running = qmp.execute("query-status")["status"] == "running"
    paused_at = time.monotonic()
    if was_running:
        qmp.execute("stop")
    try:
        sent += _bitmap_backup_round(qmp, manifest, nodes, bitmap)
        start_mirrors(qmp, manifest, nodes, sync="none")
    finally:
        if was_running:
            qmp.execute("cont")
    return sent, time.monotonic() - paused_at


def _bitmap_backup_round(qmp: QmpSession, manifest: Manifest, nodes: list[str], bitmap: str,
                         timeout: float = 3600) -> int:
    ids = [f"drtool-catchup{i}" for i in range(len(nodes))]
    sent = 0
    with qmp.subscribe(["BLOCK_JOB_COMPLETED"]) as events:
        for i, node in enumerate(nodes):
            qmp.execute("blockdev-backup", {
                "job-id": ids[i], "device": node, "target": nbd_node(i), "sync": "bitmap",
                "bitmap": bitmap, "bitmap-mode": "on-success", "auto-dismiss": True,
            })
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while pending:
            event = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if event is None:
                raise DrtoolError(f"catching up {manifest.vm} from its bitmap did not finish in {timeout:g} s")
            data = event.get("data", {})
            if data.get("device") in pending:
                if data.get("error"):
                    raise DrtoolError(f"catching up {manifest.vm} failed: {data['error']}",
                                      hint=f"check the link to {manifest.dr_host} and run drtool resync again")
                pending.discard(data["device"])
                sent += int(data.get("offset", 0))
    return sent
