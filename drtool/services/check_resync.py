"""Resync's last tier: compare digests, send only the chunks that differ.

After an unclean source restart no bitmap says what the replica misses. As
DRBD's checksum-based resync does, each host hashes its side and only
differing chunks are sent, instead of every allocated block. No mirror runs
until the end, so a resync killed half-way leaves the replication jobs gone
and the next resync starts this tier again (never "in sync" by mistake):

1. Rounds while the VM runs: a dirty bitmap starts, the chunks still to look
   at are hashed on both sides (the source through a read-only export of its
   QEMU, the replica through the DR target's export, which nothing else
   writes now), the bitmap is frozen and read. A chunk the guest did not write
   meanwhile was stable while hashed, so its digests decide; the differing
   ones are copied into the replica (through the replication link) once the
   next round's bitmap runs. The next round looks at what the guest wrote.
2. Then, with the source paused: the chunks written since the last bitmap
   began, and any left after MAX_ROUNDS, are copied; the mirrors start with
   sync=none (in sync at once); the source resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.mechanics import verify
from drtool.mechanics.hasher import ChunkHashes, copy_ranges, live_disk
from drtool.mechanics.replication import start_mirrors
from drtool.services.check import MAX_ROUNDS, hash_both, replica_export, source_socket, source_view
from drtool.services.check_repair import replica_via_link
from drtool.state.manifest import Manifest
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession

log = logging.getLogger(__name__)
RESYNC_CHUNK = 64 << 10  # the qcow2 cluster: what differs is sent nearly byte for byte


@dataclass(frozen=True)
class HashResync:
    sent_bytes: int  # chunk bytes copied into the replica
    digest_bytes: int  # what the digests and requests took on the network
    rounds: int


def hash_resync(reach: Reach, qmp: QmpSession, manifest: Manifest, vm: Vm, nodes: list[str],
                chunk: int = RESYNC_CHUNK) -> HashResync:
    src, dr = reach.shell(vm.host), reach.shell(vm.dr_host)
    look: dict[int, set[int] | None] = {i: None for i in range(len(nodes))}  # None: every chunk
    sent = digests = rounds = 0
    with source_view(src, qmp, vm, nodes) as socket_path:
        bitmap = verify.add_bitmap(qmp, nodes)
        for rounds in range(1, MAX_ROUNDS + 1):
            to_copy: dict[int, set[int]] = {}
            written: dict[int, set[int]] = {}
            for i in range(len(nodes)):
                todo = look[i]
                differ, written[i], wire = _round(src, dr, qmp, vm, manifest, nodes[i], i, bitmap, chunk,
                                                  None if todo is None else sorted(todo))
                digests += wire
                if differ:
                    to_copy[i] = differ
            verify.drop_bitmap(qmp, nodes, bitmap)
            bitmap = verify.add_bitmap(qmp, nodes)  # before the copy: a write racing it is seen
            for i, offsets in to_copy.items():
                sent += _copy(src, vm, manifest, i, offsets, chunk, socket_path)
            look = {i: written[i] for i in range(len(nodes))}
            log.info("%s hash resync round %d: copied %s chunks, %s written meanwhile", vm.name, rounds,
                     {i: len(c) for i, c in to_copy.items()}, [len(w) for w in written.values()])
            if not any(written.values()):
                break
        sent += _finish_paused(src, qmp, vm, manifest, nodes, bitmap, look, chunk, socket_path)
    return HashResync(sent, digests, rounds)


def _copy(src: RemoteShell, vm: Vm, manifest: Manifest, i: int, offsets: set[int], chunk: int,
          socket_path: PurePosixPath) -> int:
    ranges = verify.ranges_of(offsets, chunk, manifest.disks[i].virtual_size)
    return copy_ranges(src, live_disk(str(socket_path), verify.disk_export(i)), replica_via_link(vm, manifest, i),
                       ranges, f"resync of {manifest.disks[i].device}")


def _finish_paused(src: RemoteShell, qmp: QmpSession, vm: Vm, manifest: Manifest, nodes: list[str], bitmap: str,
                   look: dict[int, set[int] | None], chunk: int, socket_path: PurePosixPath) -> int:
    """Source paused: copy what was written since the last bitmap began (and what is still open), start mirrors."""
    sent = 0
    running = qmp.execute("query-status")["status"] == "running"
    if running:
        qmp.execute("stop")
    try:
        for i, node in enumerate(nodes):
            written = verify.written_chunks(qmp, src, socket_path, i, node, bitmap, chunk)
            left = written | (look[i] or set())
            if left:
                sent += _copy(src, vm, manifest, i, left, chunk, socket_path)
        verify.drop_bitmap(qmp, nodes, bitmap)
        start_mirrors(qmp, manifest, nodes, sync="none")
    finally:
        if running:
            qmp.execute("cont")
    return sent


def _round(src: RemoteShell, dr: RemoteShell, qmp: QmpSession, vm: Vm, manifest: Manifest, node: str, i: int,
           bitmap: str, chunk: int, offsets: list[int] | None) -> tuple[set[int], set[int], int]:
    """Hash disk i on both sides; (chunks that differ and were not written, chunks written, digest bytes)."""
    nothing = ChunkHashes(manifest.disks[i].virtual_size, {}, 0, 0.0)
    source_side, replica_side = (nothing, nothing) if offsets == [] else hash_both(
        src, dr, live_disk(str(source_socket(vm)), verify.disk_export(i)), replica_export(vm, manifest, i), chunk,
        offsets, f"{vm.name} {manifest.disks[i].device}")
    # the bitmap is read even when nothing was hashed: it holds the writes the next round looks at
    moved = verify.written_chunks(qmp, src, source_socket(vm), i, node, bitmap, chunk)
    verdicts = verify.judge(source_side, replica_side, chunk, moved)
    return set(verdicts.differ), moved, _wire(source_side, replica_side)


def _wire(*sides: ChunkHashes) -> int:
    return sum(s.wire_bytes for s in sides)
