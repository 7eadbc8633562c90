"""`drtool recover VM --restore --point ID [--disk DEV] (--to HOST:PATH | --in-place)`: a point's content, back.

The point's image (on the DR host, with its backing chain) and the target
image are hashed in chunks, each on its own host; only the chunks that differ
travel, streamed over SSH through drtool (block_hashes.py). A new image is a
sparse qcow2 of the disk's size: its chunks all read as zeros, so only the
point's non-zero chunks are sent and holes stay holes. In place, the VM's own
disks on its host get only what changed since the point. At the end both are
hashed again and must be equal: the result says so.

Everything is checked before anything is written: an unknown point or disk,
a host not in the inventory, a relative path (exit 2); an existing path
without --overwrite, a QEMU on the disk for --in-place (exit 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.domain import Inventory
from drtool.errors import DrtoolError, Refused, UsageError
from drtool.mechanics.block_hashes import copy_chunks, differing_offsets, hash_image
from drtool.mechanics.old_site import qemu_on_images
from drtool.mechanics.points import load_settled_manifest
from drtool.state.store import require_protected, select_vm
from drtool.transport.connections import Reach


@dataclass(frozen=True)
class RestoredDisk:
    device: str
    host: str
    path: str
    virtual_size: int
    sent_bytes: int  # chunks that crossed (holes and equal chunks did not)
    seconds: float
    verified: bool  # hashed on both hosts afterwards: equal


@dataclass(frozen=True)
class RestoreResult:
    vm: str
    point: str
    disks: tuple[RestoredDisk, ...]
    in_place: bool


def parse_destination(value: str) -> tuple[str, PurePosixPath]:
    host, sep, path = value.partition(":")
    if not sep or not host or not path.startswith("/"):
        raise UsageError(f"--to {value!r} is not HOST:/ABSOLUTE/PATH", hint="for example --to kvm3:/srv/web-vd0.qcow2")
    return host, PurePosixPath(path)


def restore(inventory: Inventory, reach: Reach, name: str, *, point_id: str, disk: str | None = None,
            to: str | None = None, in_place: bool = False, overwrite: bool = False) -> RestoreResult:
    vm = select_vm(inventory, name)
    if (to is None) == (not in_place):
        raise UsageError("say where to restore to: one of --to HOST:PATH, --in-place")
    destination = parse_destination(to) if to is not None else None
    if destination is not None and destination[0] not in inventory.hosts:
        raise UsageError(f"--to names host {destination[0]!r}, which is not in the inventory",
                         hint=f"hosts: {', '.join(sorted(inventory.hosts))}")
    dr = reach.shell(vm.dr_host)
    with reach.lock(vm):
        manifest = require_protected(load_settled_manifest(dr, vm), vm, during_failover=True)
        point = manifest.point(point_id)
        if point is None:
            raise UsageError(f"{vm.name} has no point {point_id!r}", hint=f"see drtool points {vm.name}")
        disks = [d for d in manifest.disks if disk is None or d.device == disk]
        if not disks:
            raise UsageError(f"{vm.name} has no disk {disk!r}",
                             hint=f"disks: {', '.join(d.device for d in manifest.disks)}")
        if destination is not None and len(disks) > 1:
            raise UsageError(f"{vm.name} has {len(disks)} disks: --to takes one, name it with --disk")
        host_name = destination[0] if destination else vm.host
        target = reach.shell(host_name)
        if destination is not None:
            path = str(destination[1])
            exists = target.run(["test", "-e", path], check=False, timeout=30).ok
            if exists and not overwrite:
                raise Refused(f"{host_name}:{path} exists", hint="choose a new path, or add --overwrite")
            plan = [(disks[0], path, "qcow2", True)]
        else:
            images = [d.source_image for d in disks]
            running = qemu_on_images(target, images)
            if running:
                raise Refused(f"{vm.name} runs on {host_name} ({running[0].describe(host_name)}): --in-place "
                              "needs the VM stopped", hint="shut the VM down, then restore")
            if manifest.state.failing_over:
                raise Refused(f"{vm.name} has failed over: its own disks on {vm.host} are not what runs",
                              hint="restore --to a new path instead")
            plan = [(d, d.source_image, d.format, False) for d in disks]
        restored = []
        for replica, path, fmt, create in plan:
            started = time.monotonic()
            if create:
                target.run(["qemu-img", "create", "-q", "-f", "qcow2", "--", path, str(replica.virtual_size)],
                           timeout=120)
            source_image = point.images[replica.device]
            ours = hash_image(dr, source_image, "qcow2", f"point {point.id} {replica.device}")
            theirs = hash_image(target, path, fmt, f"{host_name}:{path}")
            sent = copy_chunks(dr, source_image, "qcow2", target, path, fmt, differing_offsets(ours, theirs))
            after = hash_image(target, path, fmt, f"{host_name}:{path}")
            left = differing_offsets(ours, after)
            if left:
                raise DrtoolError(f"restore of {vm.name} {replica.device} to {host_name}:{path}: {len(left)} chunk(s) "
                                  "still differ from the point after the copy", hint="run the restore again")
            restored.append(RestoredDisk(replica.device, host_name, path, replica.virtual_size, sent,
                                         round(time.monotonic() - started, 3), True))
    return RestoreResult(vm.name, point.id, tuple(restored), in_place)
