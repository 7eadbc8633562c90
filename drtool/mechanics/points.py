"""Points in time on the DR target: frozen images under the replication overlay.

A point is taken on the replication target (qemu-storage-daemon) with one QMP
transaction of blockdev-snapshot-sync, one per disk: each replica's current
top becomes read-only and frozen (the point), a new empty overlay above it
takes replication's writes, and the NBD export follows the overlay.

The rule that keeps points sound: replication never writes into an image that
has become the base of a point. The manifest therefore names each disk's
active top, and it is updated in two phases: the new overlays are recorded as
pending before the transaction, and settled after it. A drtool killed in
between leaves a pending point that `settle_pending` resolves from what is on
disk, so a restarted target always exports the true top, never a point.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import DrtoolError, Refused, UsageError
from drtool.mechanics.dr_target import TargetLayout, target_pid
from drtool.mechanics.dr_vm import dr_copy_pid
from drtool.state.manifest import Manifest, RecoveryPoint, now
from drtool.state.protection import Protection
from drtool.state.records import PendingPoint
from drtool.state.store import load_manifest, save_manifest
from drtool.transport.connections import RemoteShell
from drtool.transport.qmp import QmpSession


def new_point_id() -> str:
    return "p" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")[:-3]


def overlay_path(layout: TargetLayout, device: str, point_id: str) -> PurePosixPath:
    """The image that takes replication's writes after point_id."""
    return layout.replica_dir / f"{device}.after-{point_id}.qcow2"


def node_of_image(target: QmpSession, image: str) -> str:
    """The node on the target whose qcow2 image is this file."""
    for node in target.execute("query-named-block-nodes", {"flat": True}):
        if node.get("drv") == "qcow2" and node.get("file") == image:
            return str(node["node-name"])
    raise DrtoolError(f"the replication target has no node for {image}",
                      hint="the target and its manifest disagree; check drtool status")


def missing_disks(manifest: Manifest, point: RecoveryPoint) -> tuple[str, ...]:
    """The VM's disks a point does not hold: added to its protection after the point was taken."""
    return tuple(d.device for d in manifest.disks if d.device not in point.images)


def lacking_note(missing: Sequence[str], point: RecoveryPoint) -> str:
    return (f"point {point.id} was taken before disk{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'were' if len(missing) > 1 else 'was'} protected")


def prepare_point(manifest: Manifest, layout: TargetLayout, quiesce: str, quiesce_seconds: float) -> Manifest:
    """The manifest with a pending point: write it to the DR host before take_point."""
    point_id = new_point_id()
    point = RecoveryPoint(point_id, now(), quiesce, round(quiesce_seconds, 3),
                          {d.device: d.replica_image for d in manifest.disks})
    tops = {d.device: str(overlay_path(layout, d.device, point_id)) for d in manifest.disks}
    return replace(manifest, pending_point=PendingPoint(point, tops))


def point_transaction(target: QmpSession, manifest: Manifest) -> list[dict]:
    """The pending point's snapshot transaction, built (node names asked) before the source pauses."""
    pending = manifest.pending_point
    if pending is None:
        raise DrtoolError(f"{manifest.vm} has no pending point to take")
    point_id = pending.point.id
    return [{"type": "blockdev-snapshot-sync", "data": {
        "node-name": node_of_image(target, disk.replica_image),
        "snapshot-file": pending.tops[disk.device],
        "snapshot-node-name": f"d{i}-{point_id}",
        "format": "qcow2",
        "mode": "absolute-paths",
    }} for i, disk in enumerate(manifest.disks)]


def take_point(target: QmpSession, manifest: Manifest, actions: list[dict] | None = None) -> Manifest:
    """Run the pending point's snapshot transaction on the target; the settled manifest."""
    target.execute("transaction", {"actions": actions if actions is not None else point_transaction(target, manifest)})
    return settled(manifest)


def settled(manifest: Manifest) -> Manifest:
    """The manifest with its pending point made real: new tops, point listed."""
    pending = manifest.pending_point
    if pending is None:
        return manifest
    disks = tuple(replace(d, replica_image=pending.tops[d.device]) for d in manifest.disks)
    return replace(manifest, disks=disks, points=(*manifest.points, pending.point), pending_point=None)


def settle_pending(shell: RemoteShell, manifest: Manifest, target_pid: int | None) -> tuple[Manifest, bool]:
    """Resolve a point left pending by a drtool that died mid-way; (manifest, changed).

    The snapshot transaction is atomic: every new overlay is in use, or none.
    A running target is the witness: the point happened iff it has every new
    overlay open. (QEMU leaves the file of a refused snapshot behind, so a file
    with the right backing proves nothing while the target runs.) With the
    target down, the files decide: every overlay exists with the old top as
    its backing file. Otherwise the point is dropped and stray files removed.
    """
    pending = manifest.pending_point
    if pending is None:
        return manifest, False
    if target_pid is not None:
        open_files = set(shell.run(["sh", "-c", 'for f in /proc/"$1"/fd/*; do readlink -- "$f"; done', "sh",
                                    str(target_pid)], check=False, timeout=30).out.splitlines())
        tops = [pending.tops[d.device] for d in manifest.disks]
        # the fd links are canonical paths; the manifest's may go through a symlink
        canonical = shell.run(["readlink", "-m", "--", *tops], check=False, timeout=30).out.splitlines()
        adopted = len(canonical) == len(tops) and all(c in open_files for c in canonical)
    else:
        adopted = all(_backing_of(shell, pending.tops[d.device]) == d.replica_image for d in manifest.disks)
    if adopted:
        return settled(manifest), True
    shell.run(["rm", "-f", "--", *pending.tops.values()], timeout=30)
    return replace(manifest, pending_point=None), True


def pin_point(dr: RemoteShell, vm: Vm, manifest: Manifest, point_id: str, kept: bool) -> Manifest:
    """Pin a point against retention (or unpin it); saved at once. The caller holds the VM's lock."""
    points = tuple(replace(p, kept=kept) if p.id == point_id else p for p in manifest.points)
    manifest = replace(manifest, points=points)
    save_manifest(dr, vm, manifest)
    return manifest


def load_settled_manifest(dr: RemoteShell, vm: Vm) -> Manifest | None:
    """The manifest, with a point a killed drtool left pending resolved (and saved). Under the VM's lock only."""
    manifest = load_manifest(dr, vm)
    if manifest is None or manifest.pending_point is None:
        return manifest
    # the witness: the QEMU that took the point, the DR copy's once the VM runs there (dr_points.py)
    witness = (dr_copy_pid(dr, vm, manifest) if runs_on_dr_copy(manifest)
               else target_pid(dr, TargetLayout(vm.replica_dir)))
    manifest, changed = settle_pending(dr, manifest, witness)
    if changed:
        save_manifest(dr, vm, manifest)
    return manifest


def runs_on_dr_copy(manifest: Manifest) -> bool:
    """The VM runs failed over on its DR host: its QEMU, not a replication target, holds the replicas."""
    return manifest.state is Protection.FAILED_OVER or manifest.state.reverse


def _backing_of(shell: RemoteShell, image: str) -> str | None:
    result = shell.run(["qemu-img", "info", "-U", "--output=json", "--", image], check=False, timeout=30)
    if not result.ok:
        return None
    info = json.loads(result.out)
    return info.get("full-backing-filename") or info.get("backing-filename")


# ----------------------------------------------------------------------------- deleting points
#
# Each disk's chain on the target is, bottom to top, the images of the points
# in the order they were taken, then the active top:
#     P1.images[dev] <- P2.images[dev] <- ... <- Pn.images[dev] <- replica_image
# A point is deleted in two phases:
#   1. it leaves the manifest (saved) before any image changes, so a point the
#      manifest lists never has a modified image; its images become "orphans",
#      in the chain but no point's;
#   2. per disk, each run of orphans is merged with the point image right above
#      it: block-commit of that image into the lowest orphan, on the running
#      target (an intermediate commit: the export keeps writing to the top). The
#      lowest orphan then holds exactly the view of the point above, which is
#      re-pointed to it and saved before the committed files are removed.
# A commit into a base never changes what the images above it show, so every
# listed point stays right whatever fails or dies when: a failed commit leaves
# orphans (space, no harm), merged by the next deletion; a drtool killed between
# a commit and its manifest save leaves a point naming an image that left the
# chain but still shows the same data, repaired by the next deletion.

COMMIT_JOB_PREFIX = "drtool-commit"
COMMIT_TIMEOUT = 3600.0  # s one disk's commit may take (it copies one point's delta)
SaveManifest = Callable[[Manifest], None]


def delete_point(target: QmpSession, shell: RemoteShell, manifest: Manifest, point_id: str, *,
                 save: SaveManifest) -> Manifest:
    """Delete one point (not the newest) on the target; save() is called at each consistent step."""
    return delete_points(target, shell, manifest, [point_id], save=save)


def delete_points(target: QmpSession, shell: RemoteShell, manifest: Manifest, point_ids: Sequence[str], *,
                  save: SaveManifest) -> Manifest:
    """Delete these points (never the newest); the final manifest, already saved with save().

    save(manifest) must write the manifest atomically to the DR host: it is
    called once the points leave the manifest, then after each commit. On a
    failure a DrtoolError is raised; what was saved before it is consistent.
    """
    ids = list(dict.fromkeys(point_ids))
    if not ids:
        return manifest
    if manifest.pending_point is not None:
        raise DrtoolError(f"{manifest.vm} has a point pending; settle it before deleting points")
    known = {p.id for p in manifest.points}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UsageError(f"{manifest.vm} has no point {unknown[0]}",
                         hint=f"its points: {', '.join(sorted(known)) or 'none'}")
    if manifest.points[-1].id in ids:
        raise Refused(f"{manifest.points[-1].id} is the newest point of {manifest.vm}: it is never deleted",
                      hint="it holds the base of the replica drtool writes to; take a newer point first")
    busy = [j["device"] for j in target.execute("query-block-jobs")
            if str(j.get("device", "")).startswith(COMMIT_JOB_PREFIX)]
    if busy:
        raise Refused(f"the replication target of {manifest.vm} is still merging points ({busy[0]})",
                      hint="an earlier deletion was interrupted; try again when it has finished")
    manifest = replace(manifest, points=tuple(p for p in manifest.points if p.id not in ids))
    save(manifest)
    for i in range(len(manifest.disks)):
        manifest = merge_orphans(target, shell, manifest, i, save=save)
    return manifest


def backing_chain(shell: RemoteShell, top: str) -> list[str]:
    """The images of top's chain, bottom (the full image) first, as qemu-img reads them from disk."""
    result = shell.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", "--", top], timeout=60)
    try:
        infos = json.loads(result.out)
        return [str(info["filename"]) for info in reversed(infos)]
    except (ValueError, TypeError, KeyError) as err:
        raise DrtoolError(f"cannot read the backing chain of {top}: {err}") from err


def merge_orphans(target: QmpSession, shell: RemoteShell, manifest: Manifest, index: int, *,
                  save: SaveManifest) -> Manifest:
    """Merge every image of disk `index`'s chain that no point names into the point image above it."""
    disk = manifest.disks[index]
    chain = backing_chain(shell, disk.replica_image)
    if not chain or chain[-1] != disk.replica_image:
        raise DrtoolError(f"the chain of {disk.device} does not end at its replica {disk.replica_image}: {chain}")
    manifest = _repair_detached(shell, manifest, index, chain, save)
    named = {p.images[disk.device] for p in manifest.points if disk.device in p.images}
    orphans: list[str] = []
    for image in list(chain[:-1]):
        if image not in named:
            orphans.append(image)
            continue
        if orphans:  # chain is re-read and checked after each commit
            manifest, chain = _commit_into(target, shell, manifest, index, chain, image, orphans[0], save)
        orphans = []
    expected = [p.images[disk.device] for p in manifest.points if disk.device in p.images] + [disk.replica_image]
    if chain != expected:
        raise DrtoolError(f"the chain of {disk.device} on {manifest.dr_host} is {' <- '.join(chain)}; "
                          f"its points expect {' <- '.join(expected)}",
                          hint="nothing more is deleted while they disagree; check the replica directory")
    return manifest


def _commit_into(target: QmpSession, shell: RemoteShell, manifest: Manifest, index: int, chain: list[str],
                 top: str, base: str, save: SaveManifest) -> tuple[Manifest, list[str]]:
    """block-commit top (a point's image) and what lies between into base; re-point, save, remove files."""
    disk = manifest.disks[index]
    gone = chain[chain.index(base) + 1: chain.index(top) + 1]
    job = f"{COMMIT_JOB_PREFIX}{index}"
    with target.subscribe(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"]) as events:
        target.execute("block-commit", {
            "job-id": job,
            "device": node_of_image(target, disk.replica_image),
            "top-node": node_of_image(target, top),
            "base-node": node_of_image(target, base),
            "auto-dismiss": True,
        })
        deadline = time.monotonic() + COMMIT_TIMEOUT
        while True:
            event = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if event is None:
                raise DrtoolError(f"merging {top} into {base} did not finish within {COMMIT_TIMEOUT:g} s",
                                  hint="it goes on in the replication target; the next checkpoint finishes the job")
            data = event.get("data", {})
            if data.get("device") != job:
                continue
            if event.get("event") == "BLOCK_JOB_CANCELLED" or data.get("error"):
                raise DrtoolError(f"merging {top} into {base} on {manifest.dr_host} failed: "
                                  f"{data.get('error') or 'cancelled'}",
                                  hint="every listed point is intact; the next checkpoint tries again")
            break
    expected = [c for c in chain if c not in gone]
    now_chain = backing_chain(shell, disk.replica_image)
    if now_chain != expected:
        raise DrtoolError(f"after merging {top} into {base} the chain of {disk.device} is "
                          f"{' <- '.join(now_chain)}, not {' <- '.join(expected)}")
    manifest = _repoint(manifest, disk.device, top, base)
    save(manifest)
    shell.run(["rm", "-f", "--", *gone], timeout=60)
    return manifest, now_chain


def _repoint(manifest: Manifest, device: str, old: str, new: str) -> Manifest:
    points = tuple(replace(p, images=p.images | {device: new}) if p.images.get(device) == old else p
                   for p in manifest.points)
    return replace(manifest, points=points)


def _repair_detached(shell: RemoteShell, manifest: Manifest, index: int, chain: list[str],
                     save: SaveManifest) -> Manifest:
    """Points whose image left the chain: a commit finished but drtool died before saving the manifest.

    The image was committed into the highest chain image of its own backing
    chain, which now shows the same data: the point is re-pointed there, and
    the committed files (no longer in the chain) removed.
    """
    disk = manifest.disks[index]
    for point in manifest.points:
        image = point.images.get(disk.device)
        if image is None or image in chain:  # (a point taken before the disk was added holds none of it)
            continue
        own = backing_chain(shell, image)  # raises if the file is gone: then nothing can be repaired
        into = next((c for c in reversed(own) if c in chain), None)
        if into is None or any(p.images.get(disk.device) == into for p in manifest.points):
            raise DrtoolError(f"point {point.id}'s image {image} of {disk.device} is not in the replica's chain",
                              hint="the target and its manifest disagree; check the replica directory")
        manifest = _repoint(manifest, disk.device, image, into)
        save(manifest)
        named = {p.images[disk.device] for p in manifest.points if disk.device in p.images}
        stale = [c for c in own[own.index(into) + 1:] if c not in named]
        if stale:
            shell.run(["rm", "-f", "--", *stale], timeout=60)
    return manifest
