"""`drtool check --repair`: re-send only the ranges found different, then check them again.

With the source paused (recorded first, mechanics/pausing.py) and its mirrors
drained, nothing else writes the replica's top: the source host's hasher reads
each range from the live disk (through the check's read-only export) and writes
it into the replica through the DR target's NBD export, over the replication
link and its TLS key. The source resumes; later guest writes reach the replica
through the mirror as usual, after the repair, so they are never overwritten
by it. Points already taken keep their content: they are frozen.
"""

from __future__ import annotations

from dataclasses import replace

from drtool.domain import Vm
from drtool.errors import DrtoolError
from drtool.mechanics import verify
from drtool.mechanics.compare import (
    compare_at_points,
    drop_points,
    replica_via_link,
    source_socket,
    source_view,
)
from drtool.mechanics.hasher import copy_ranges, live_disk
from drtool.mechanics.pausing import DRAIN_TIMEOUT, paused_source
from drtool.mechanics.replication import current_nodes, wait_drained
from drtool.state.checks import DiskCheck, VmCheck
from drtool.state.manifest import Manifest
from drtool.state.store import load_manifest
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession

REPAIR_BATCH = 64 << 20  # bytes copied per pause of the source
REPAIR_BY = "check --repair"  # how the pause record names the command


def repair_differences(reach: Reach, dr: RemoteShell, qmp: QmpSession, target: QmpSession, vm: Vm,
                       result: VmCheck, chunk: int) -> VmCheck:
    manifest = load_manifest(dr, vm)
    if manifest is None:
        raise DrtoolError(f"the manifest of {vm.name} vanished during the check")
    src = reach.shell(vm.host)
    nodes = current_nodes(qmp, manifest)
    with source_view(src, qmp, vm, nodes):
        for i, disk in enumerate(result.disks):
            for batch in repair_batches(list(disk.differing)):
                copy_paused(reach, dr, qmp, manifest, vm, i, batch)
    only = {i: verify.chunks_touched(d.differing, chunk) for i, d in enumerate(result.disks) if d.differing}
    outcome = compare_at_points(reach, dr, qmp, target, vm, manifest, chunk, only, by=REPAIR_BY)
    earlier = [result.point] if result.point else []
    manifest = drop_points(target, dr, vm, outcome.manifest, [*earlier, *outcome.taken[:-1]])
    tallies = outcome.tallies
    disks: list[DiskCheck] = []
    for i, disk in enumerate(result.disks):
        if i not in only:
            disks.append(disk)
            continue
        tally = tallies[i]
        still = tally.differ | (tally.pending or set())
        disks.append(replace(
            disk, differing=tuple(verify.ranges_of(still, chunk, tally.size)),
            repaired=tuple(verify.ranges_of(only[i] - still, chunk, tally.size))))
    return replace(result, point=manifest.points[-1].id, disks=tuple(disks))


def repair_batches(ranges: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    batches: list[list[tuple[int, int]]] = [[]]
    size = 0
    for offset, length in ranges:
        while length > 0:
            part = min(length, REPAIR_BATCH - size)
            batches[-1].append((offset, part))
            offset, length, size = offset + part, length - part, size + part
            if size >= REPAIR_BATCH:
                batches.append([])
                size = 0
    return [b for b in batches if b]


def copy_paused(reach: Reach, dr: RemoteShell, qmp: QmpSession, manifest: Manifest, vm: Vm, index: int,
                ranges: list[tuple[int, int]]) -> None:
    """Copy ranges of disk `index` from the source into the replica's top, the source paused meanwhile."""
    disk = manifest.disks[index]
    nodes = current_nodes(qmp, manifest)
    with paused_source(reach, dr, vm, manifest, qmp, REPAIR_BY):
        if not wait_drained(qmp, manifest, nodes, DRAIN_TIMEOUT):
            raise DrtoolError(f"the mirrors of {vm.name} did not drain within {DRAIN_TIMEOUT:g} s; nothing repaired",
                              hint=f"see drtool status {vm.name}: the link or the DR storage may be stalled")
        copy_ranges(reach.shell(vm.host), live_disk(str(source_socket(vm)), verify.disk_export(index)),
                    replica_via_link(vm, manifest, index), ranges, f"repair of {disk.device}")
