"""Points on the DR copy's own chain: `drtool checkpoint` while the VM runs failed over on its DR host.

After a planned failover (cold, or live with `--live`) the DR copy is a QEMU on
the DR host running on the replica tops; the points are its backing files and
no replication target runs there. So the DR copy's QEMU takes the point: one
QMP transaction with a blockdev-snapshot-sync per disk, each top frozen into
the point and a new empty overlay above it (the manifest's replica tops move
there, recorded pending before the transaction as for the target's points:
points.py). Retention deletes points through the same session (block-commit of
intermediate images, the guest writing on above).

No QMP stop: QEMU drains every disk of a transaction before any of them
switches and lets the guest's I/O go on only once all have, so the point is
a crash-consistent cut across the disks (a write the guest saw complete before
it is in the point; one issued during it waits and lands above). The vCPUs run
on; only disk I/O waits, for the transaction's time, recorded as the point's
pause (quiesce "drained").

A persistent dirty bitmap on a top (the reverse bitmap of a live failover,
from which `recover --reprotect` sends only what the DR copy wrote) moves to
the new top in the same transaction (added there, merged, removed from the
frozen image), so it goes on recording every write.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any

from drtool.domain import Vm
from drtool.errors import DrtoolError, QmpError, Refused
from drtool.mechanics.dr_target import TargetLayout
from drtool.mechanics.dr_vm import dr_domain, dr_run_layout
from drtool.mechanics.libvirt_migration import make_persistent
from drtool.mechanics.pausing import drop_pending
from drtool.mechanics.points import prepare_point, settled
from drtool.mechanics.remote import make_dirs
from drtool.state.manifest import Manifest, now
from drtool.state.protection import Protection
from drtool.state.records import FailoverKind
from drtool.state.store import save_manifest
from drtool.transport.connections import RemoteShell
from drtool.transport.qmp import QmpSession

DRAINED = "drained"  # a point's quiesce: QEMU's transaction drained the disks, the guest ran on


def on_dr_copy_chain(manifest: Manifest) -> bool:
    """Points are taken and deleted on the DR copy's own chain: failed over, planned (cold or live)."""
    return (manifest.state is Protection.FAILED_OVER and manifest.failover is not None
            and manifest.failover.kind is not FailoverKind.UNPLANNED)


def dr_copy_refusal(vm: Vm, manifest: Manifest) -> Refused | None:
    """Why no point can be taken on the DR copy now (None: it can)."""
    record = manifest.failover
    where = f"{vm.name} runs on {vm.dr_host}"
    if manifest.state.reverse:
        return Refused(f"{where}, {manifest.state.value} to {vm.host}: a point would need its reverse mirrors "
                       "stopped (QEMU refuses a snapshot of a mirrored disk)",
                       hint=f"take points again once it has failed back (drtool recover {vm.name} --failback)")
    if record is not None and record.kind is FailoverKind.UNPLANNED:
        return Refused(f"{where} on overlays of point {record.point} (unplanned failover): the points after it "
                       "belong to the abandoned timeline, so no point is taken on the DR copy",
                       hint=f"points start again once it is protected: drtool recover {vm.name} --reprotect, "
                            "then --failback")
    return None


def let_qemu_create_overlays(dr: RemoteShell, vm: Vm, manifest: Manifest) -> None:
    """A DR copy libvirt runs: its QEMU (libvirt's user, not root) creates the point's overlays next to the
    tops, so the group libvirt runs it with may create files in the replica directory (not in the others)."""
    gid = manifest.hardware.get("gid")
    if dr_domain(manifest) is not None and gid:
        dr.run(["sh", "-c", 'chgrp -- "$2" "$1" && chmod g+wx -- "$1"', "sh", str(vm.replica_dir), str(gid)],
               timeout=30)


def define_on_tops(dr: RemoteShell, vm: Vm, manifest: Manifest) -> str:
    """A DR copy libvirt runs: its persistent definition re-defined on the manifest's tops; what failed, or "".

    libvirt does not see a transaction sent through qemu-monitor-command: its definition still names the top
    the domain started on, which a point froze. `virsh define` of the running domain changes only its next
    boot, which then opens the newest top (and through its backing chain every point below it).
    """
    if dr_domain(manifest) is None:
        return ""
    run_dir = dr_run_layout(vm.replica_dir).run_dir
    try:
        make_dirs(dr, run_dir)
        make_persistent(dr, vm, manifest, run_dir)
    except DrtoolError as err:
        return (f"libvirt's definition of {vm.name} on {vm.dr_host} still names the old tops ({err}): "
                "the next checkpoint defines it again")
    return ""


def dr_copy_transaction(qmp: QmpSession, manifest: Manifest) -> list[dict[str, Any]]:
    """The pending point's transaction on the DR copy: a snapshot per disk, its persistent bitmaps carried up."""
    pending = manifest.pending_point
    if pending is None:
        raise DrtoolError(f"{manifest.vm} has no pending point to take")
    nodes = {str(n.get("file")): n for n in qmp.execute("query-named-block-nodes", {"flat": True})
             if n.get("drv") == "qcow2"}
    snapshots: list[dict[str, Any]] = []
    carried: list[dict[str, Any]] = []
    for i, disk in enumerate(manifest.disks):
        node = nodes.get(disk.replica_image)
        if node is None:
            raise DrtoolError(f"the DR copy of {manifest.vm} has no node for {disk.replica_image}",
                              hint="it and its manifest disagree; check drtool status")
        old, new = str(node["node-name"]), f"d{i}-{pending.point.id}"
        snapshots.append({"type": "blockdev-snapshot-sync", "data": {
            "node-name": old, "snapshot-file": pending.tops[disk.device], "snapshot-node-name": new,
            "format": "qcow2", "mode": "absolute-paths"}})
        for bitmap in node.get("dirty-bitmaps") or ():
            if not bitmap.get("persistent"):
                continue
            name = str(bitmap["name"])
            carried += [
                {"type": "block-dirty-bitmap-add", "data": {"node": new, "name": name, "persistent": True,
                                                            "granularity": int(bitmap["granularity"])}},
                {"type": "block-dirty-bitmap-merge", "data": {"node": new, "target": name,
                                                              "bitmaps": [{"node": old, "name": name}]}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": old, "name": name}},
            ]
    return snapshots + carried  # the new nodes exist once the snapshots' part has run


def take_dr_copy_point(qmp: QmpSession, dr: RemoteShell, vm: Vm, manifest: Manifest) -> tuple[Manifest, float]:
    """A point of every disk on the DR copy's chain; (the saved manifest, seconds its disk I/O waited).

    The pending point is saved before the transaction: a drtool killed around it
    leaves a record the next command settles from the DR copy's open files.
    """
    pending = prepare_point(manifest, TargetLayout(vm.replica_dir), DRAINED, 0.0)
    save_manifest(dr, vm, pending)
    try:
        actions = dr_copy_transaction(qmp, pending)
    except DrtoolError:  # the transaction was never sent
        with contextlib.suppress(DrtoolError):
            drop_pending(dr, vm, pending)
        raise
    started = time.monotonic()
    try:
        qmp.execute("transaction", {"actions": actions})
    except QmpError:  # refused: nothing switched, but QEMU may have left the new files behind
        with contextlib.suppress(DrtoolError):
            drop_pending(dr, vm, pending)
        raise
    # any other failure (the session lost): it may have run; the next load settles it from the open files
    took = time.monotonic() - started
    taken = settled(pending)
    point = replace(taken.points[-1], time=now(), quiesce_seconds=round(took, 3))
    manifest = replace(taken, points=(*taken.points[:-1], point))
    save_manifest(dr, vm, manifest)
    return manifest, took

