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

from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, Refused, UsageError
from drtool.mechanics.block_hashes import (
    CHUNK,
    ZERO,
    copy_chunks,
    differing_offsets,
    hash_image,
)
from drtool.mechanics.dr_target import (
    TargetLayout,
    free_nbd_port,
    new_psk,
    push_psk,
    qemu_opt,
    start_target,
    stop_target,
)
from drtool.mechanics.old_site import qemu_on_images
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.remote import make_dirs, remove
from drtool.state.manifest import Manifest, ReplicaDisk
from drtool.state.store import require_protected, select_vm
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.ssh import resolve_endpoint

RESTORE_EXPORT = "restore"


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
            if create:  # a new image: qemu-img convert on the DR host into an NBD export of it (TLS)
                _convert_over_nbd(inventory, dr, target, vm, host_name, source_image, path, replica.virtual_size)
                sent = sum(CHUNK for c in ours.chunks if c != ZERO)  # zeros go as NBD write-zeroes, no data
            else:
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


def _convert_over_nbd(inventory: Inventory, dr: RemoteShell, target: RemoteShell, vm: Vm, host_name: str,
                      source_image: str, path: str, size: int) -> None:
    """The point's image into `path` on another host: an NBD export of it there (TLS with a fresh PSK),
    `qemu-img convert -n` on the DR host into it. Zeros travel as NBD write-zeroes, without data."""
    host = inventory.hosts[host_name]
    layout = TargetLayout(host.drtool_dir / "restore" / vm.name)
    address = host.replication_address or resolve_endpoint(host).hostname
    export = Manifest(vm.name, vm.dr_host, host_name, "async", "tls-psk", address, free_nbd_port(target),
                      (ReplicaDisk(RESTORE_EXPORT, "", "qcow2", size, source_image, path, RESTORE_EXPORT),))
    client_dir = vm.replica_dir / "restore-tls"
    psk = new_psk()
    make_dirs(target, layout.replica_dir)
    push_psk(target, layout.tls_dir, psk)
    push_psk(dr, client_dir, psk)
    try:
        start_target(target, export, layout)
        nbd = (f"driver=nbd,server.type=inet,server.host={address},server.port={export.nbd_port},"
               f"export={RESTORE_EXPORT},tls-creds=drtool-restore-tls")
        creds = f"tls-creds-psk,id=drtool-restore-tls,endpoint=client,dir={qemu_opt(str(client_dir))},username=drtool"
        result = dr.run(["qemu-img", "convert", "-n", "--object", creds, "-f", "qcow2", "--target-image-opts",
                         "--", source_image, nbd], check=False, timeout=24 * 3600)
        if not result.ok:
            detail = [line for line in result.err.strip().splitlines() if line.strip()]
            raise DrtoolError(f"copying point image {source_image} to {host_name}:{path} failed"
                              + (f": {detail[-1]}" if detail else ""), hint="run the restore again (--overwrite)")
    finally:
        stop_target(target, layout)
        remove(target, layout.replica_dir)
        remove(dr, client_dir)
