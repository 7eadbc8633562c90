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
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath

from drtool.dr_target import TargetLayout
from drtool.errors import DrtoolError
from drtool.manifest import Manifest, RecoveryPoint, now
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


def prepare_point(manifest: Manifest, layout: TargetLayout, quiesce: str, quiesce_seconds: float) -> Manifest:
    """The manifest with a pending point: write it to the DR host before take_point."""
    point_id = new_point_id()
    point = RecoveryPoint(point_id, now(), quiesce, round(quiesce_seconds, 3),
                          {d.device: d.replica_image for d in manifest.disks})
    tops = {d.device: str(overlay_path(layout, d.device, point_id)) for d in manifest.disks}
    return replace(manifest, pending_point={"point": asdict(point), "tops": tops})


def take_point(target: QmpSession, manifest: Manifest) -> Manifest:
    """Run the pending point's snapshot transaction on the target; the settled manifest."""
    pending = manifest.pending_point
    point_id = pending["point"]["id"]
    actions = []
    for i, disk in enumerate(manifest.disks):
        actions.append({"type": "blockdev-snapshot-sync", "data": {
            "node-name": node_of_image(target, disk.replica_image),
            "snapshot-file": pending["tops"][disk.device],
            "snapshot-node-name": f"d{i}-{point_id}",
            "format": "qcow2",
            "mode": "absolute-paths",
        }})
    target.execute("transaction", {"actions": actions})
    return settled(manifest)


def settled(manifest: Manifest) -> Manifest:
    """The manifest with its pending point made real: new tops, point listed."""
    pending = manifest.pending_point
    point = RecoveryPoint(**pending["point"])
    disks = tuple(replace(d, replica_image=pending["tops"][d.device]) for d in manifest.disks)
    return replace(manifest, disks=disks, points=(*manifest.points, point), pending_point={})


def settle_pending(shell: RemoteShell, manifest: Manifest) -> tuple[Manifest, bool]:
    """Resolve a point left pending by a drtool that died mid-way; (manifest, changed).

    The snapshot transaction is atomic: either every new overlay exists with
    the old top as its backing file, or none is in use. Only then is the
    point adopted; otherwise it is dropped (and any stray overlay file removed).
    """
    pending = manifest.pending_point
    if not pending:
        return manifest, False
    adopted = all(
        _backing_of(shell, pending["tops"][d.device]) == d.replica_image for d in manifest.disks
    )
    if adopted:
        return settled(manifest), True
    shell.run(["rm", "-f", "--", *pending["tops"].values()], timeout=30)
    return replace(manifest, pending_point={}), True


def _backing_of(shell: RemoteShell, image: str) -> str | None:
    result = shell.run(["qemu-img", "info", "-U", "--output=json", "--", image], check=False, timeout=30)
    if not result.ok:
        return None
    info = json.loads(result.out)
    return info.get("full-backing-filename") or info.get("backing-filename")
