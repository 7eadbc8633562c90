"""Disks added to a protected VM (hot-plugged after protect): replicated without touching the others.

`drtool protect VM` on a VM already protected runs this for the disks it has
that the manifest does not list. The intent is written first: the disks join
the manifest, each with what starts it on the DR side (a hot-plugged disk is
not on QEMU's command line: its -blockdev and -device are recorded), no
bitmap is trusted, and the state is resyncing (the new replica is no image of
anything until it is in sync). Then, each part only if missing, so that a run
killed half-way is finished by the next `protect`: the replica image, its
node and NBD export on the running target, the NBD client node and a fresh
bitmap generation on the source, and the disk's mirror; the other disks'
mirrors go on as they were. Once every job is ready the state is protected
again and the new bitmap trusted. A failure before the new mirror starts
undoes the parts and the manifest together.

Points taken before the add hold nothing of the new disk (their images name
no such device): failover and drills never start from them silently (see
points.missing_disks).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from drtool.domain import Vm
from drtool.errors import DrtoolError, QmpError, Refused
from drtool.mechanics.blockinfo import BlockDevice
from drtool.mechanics.dr_target import TargetLayout, export_replica, unexport_replica
from drtool.mechanics.dr_vm import added_disk_options, check_mapping
from drtool.mechanics.link import link_socket
from drtool.mechanics.pausing import target_session
from drtool.mechanics.remote import remove
from drtool.mechanics.replication import (
    ProgressCallback,
    add_bitmaps,
    attach_disk,
    current_nodes,
    distrusting_bitmaps,
    drtool_bitmaps,
    job_id,
    nbd_node,
    query_jobs,
    start_mirror,
    trusting_bitmap,
    wait_until_ready,
)
from drtool.state.manifest import Manifest, ReplicaDisk
from drtool.state.protection import Protection
from drtool.state.store import save_manifest
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession

ADDED = "added_disks"  # hardware key: the disks protect added, as their DR copy's -blockdev and -device need them


def seeding_disks(manifest: Manifest) -> list[int]:
    """Indexes of added disks whose first copy has not been seen through (a protect killed or --no-wait)."""
    seeding = {a["device"] for a in manifest.hardware.get(ADDED, ()) if a.get("seeding")}
    return [i for i, d in enumerate(manifest.disks) if d.device in seeding]


def add_disks(reach: Reach, vm: Vm, dr: RemoteShell, qmp: QmpSession, manifest: Manifest,
              new: list[BlockDevice], wait: bool, on_progress: ProgressCallback | None) -> Manifest:
    """Replicate the disks `new` beside the ones replicated already; the manifest after."""
    if vm.libvirt_domain is not None:
        raise Refused(f"{vm.name} is a libvirt domain: adding a disk to its protection is not supported yet",
                      hint=f"unprotect it and protect it again (drtool unprotect {vm.name}; drtool protect {vm.name})")
    if manifest.state is not Protection.PROTECTED:
        raise Refused(f"{vm.name} is {manifest.state.value}: a disk is added only to a protection in sync",
                      hint=f"run drtool resync {vm.name} first")
    layout = TargetLayout(vm.replica_dir)
    disks = tuple(ReplicaDisk(d.device, d.node_name, d.format, d.virtual_size, d.image,
                              str(layout.replica_image(d.device)), d.device) for d in new)
    entries = [{"device": d.device, "driver": _driver(qmp, d), "node": d.node_name, "format": d.format,
                "image": d.image, "seeding": True} for d in new]
    hardware = manifest.hardware | {ADDED: [*manifest.hardware.get(ADDED, ()), *entries]}
    everything = (*manifest.disks, *disks)
    check_mapping(hardware, everything, vm.replica_dir, str(vm.qmp_socket or ""))  # a DR copy can start them
    names = ", ".join(d.device for d in new)
    intent = distrusting_bitmaps(replace(manifest, disks=everything, hardware=hardware)).transition(
        Protection.RESYNCING, f"disk(s) {names} added: seeding their replicas")
    save_manifest(dr, vm, intent)
    indexes = list(range(len(manifest.disks), len(everything)))
    try:
        return finish_adding(reach, vm, dr, qmp, intent, indexes, wait, on_progress)
    except DrtoolError:
        if not _any_job(qmp, intent, indexes):  # nothing copies yet: back to how it was, record and all
            _undo(reach, vm, dr, qmp, intent, indexes)
            save_manifest(dr, vm, manifest)
        raise


def finish_adding(reach: Reach, vm: Vm, dr: RemoteShell, qmp: QmpSession, manifest: Manifest, indexes: list[int],
                  wait: bool, on_progress: ProgressCallback | None) -> Manifest:
    """Every part of the disks at `indexes` that is missing; with wait, until in sync (then protected)."""
    for i in indexes:  # a replica an earlier run created stays (the full copy rewrites it)
        image = manifest.disks[i].replica_image
        dr.run(["sh", "-c", 'i=$1; shift; [ -e "$i" ] || exec "$@"', "sh", image,
                "qemu-img", "create", "-q", "-f", "qcow2", "--", image, str(manifest.disks[i].virtual_size)],
               timeout=120)
    with target_session(reach, vm) as target:
        for i in indexes:
            export_replica(target, manifest, i)
    have = {n["node-name"] for n in qmp.execute("query-named-block-nodes", {"flat": True})}
    for i in indexes:
        if nbd_node(i) not in have:
            attach_disk(qmp, manifest, i, link_socket(vm))
    nodes = current_nodes(qmp, manifest)
    jobs = query_jobs(qmp, manifest)
    missing = [i for i in indexes if job_id(i) not in jobs]
    # a fresh generation on every disk before a new copy starts: trusted once all are in sync
    bitmap = add_bitmaps(qmp, manifest, nodes) if missing else _common_bitmap(qmp, nodes)
    if bitmap is None:
        bitmap = add_bitmaps(qmp, manifest, nodes)
    for i in missing:
        start_mirror(qmp, manifest, i, nodes[i])
    if not wait:
        return manifest
    wait_until_ready(qmp, manifest, on_progress)
    added = [a | {"seeding": False} if a["device"] in {manifest.disks[i].device for i in indexes} else a
             for a in manifest.hardware.get(ADDED, ())]
    done = replace(trusting_bitmap(manifest, bitmap), hardware=manifest.hardware | {ADDED: added})
    if done.state is not Protection.PROTECTED:  # (a resync may have seen the copy through meanwhile)
        done = done.transition(Protection.PROTECTED, "added disks in sync")
    save_manifest(dr, vm, done)
    return done


def _driver(qmp: QmpSession, device: BlockDevice) -> str:
    """The device model of a disk (virtio-blk-pci, scsi-hd, ...), as its DR copy's -device names it."""
    path = device.qdev.rsplit("/virtio-backend", 1)[0] if device.qdev else f"/machine/peripheral/{device.device}"
    try:
        return str(qmp.execute("qom-get", {"path": path, "property": "type"}))
    except QmpError as err:
        raise Refused(f"{device.device}: cannot tell its device model ({err})",
                      hint="give it an id (device_add ...,id=NAME) so drtool can find it") from err


def _common_bitmap(qmp: QmpSession, nodes: list[str]) -> str | None:
    """The newest drtool bitmap every node has (added by a run killed during the copy)."""
    by_node = [{b["name"] for b in bitmaps} for bitmaps in drtool_bitmaps(qmp, nodes).values()]
    common = set.intersection(*by_node) if by_node else set()
    return max(common) if common else None


def _any_job(qmp: QmpSession, manifest: Manifest, indexes: list[int]) -> bool:
    try:
        jobs = query_jobs(qmp, manifest)
    except DrtoolError:
        return True  # cannot tell: leave everything for the next protect to finish
    return any(job_id(i) in jobs for i in indexes)


def _undo(reach: Reach, vm: Vm, dr: RemoteShell, qmp: QmpSession, manifest: Manifest, indexes: list[int]) -> None:
    for i in indexes:
        with contextlib.suppress(DrtoolError):
            qmp.execute("blockdev-del", {"node-name": nbd_node(i)})
    with contextlib.suppress(DrtoolError), target_session(reach, vm) as target:
        for i in indexes:
            unexport_replica(target, i)
    with contextlib.suppress(DrtoolError):
        remove(dr, *(TargetLayout(vm.replica_dir).replica_image(manifest.disks[i].device) for i in indexes))


def with_added_disks(manifest: Manifest, argv: list[str]) -> list[str]:
    """The source's own command line (to start it again where it ran) with the disks hot-added since it
    started, on their own images."""
    own = {a["image"]: a["image"] for a in manifest.hardware.get(ADDED, ())}
    return [*argv, *added_disk_options(manifest.hardware | {"argv": argv}, own)]
