"""Resync's hash tier: compare digests, send only the chunks that differ.

After an unclean source restart no bitmap says what the replica misses. As
DRBD's checksum-based resync does, each host hashes its side and only
differing chunks are sent, instead of every allocated block. No mirror runs
until the end, so a resync killed half-way leaves the replication jobs gone
(and the manifest RESYNCING, no bitmap trusted) and the next resync starts
this tier again (never "in sync" by mistake):

1. Rounds while the VM runs: a dirty bitmap starts, the chunks still to look
   at are hashed on both sides (the source through a read-only export of its
   QEMU, the replica through the DR target's export, which nothing else
   writes now), the bitmap is frozen and read. A chunk the guest did not write
   meanwhile was stable while hashed, so its digests decide; the differing
   ones are copied into the replica (through the replication link) once the
   next round's bitmap runs. The next round looks at what the guest wrote.
2. Then, with the source paused (recorded first, mechanics/pausing.py): the
   chunks written since the last bitmap began, and any left after MAX_ROUNDS,
   are copied; the mirrors start with sync=none (in sync at once); the source
   resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.mechanics import verify
from drtool.mechanics.compare import (
    MAX_ROUNDS,
    hash_both,
    replica_export,
    replica_via_link,
    source_view,
)
from drtool.mechanics.hasher import ChunkHashes, copy_ranges, live_disk
from drtool.mechanics.pausing import paused_source
from drtool.mechanics.replication import start_mirrors
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
    paused_seconds: float  # how long the source was paused for the last chunks


@dataclass(frozen=True)
class _Sides:
    """Where one resync reads and writes."""

    reach: Reach
    src: RemoteShell
    dr: RemoteShell
    qmp: QmpSession
    vm: Vm
    manifest: Manifest
    socket_path: PurePosixPath
    chunk: int


def hash_resync(reach: Reach, qmp: QmpSession, manifest: Manifest, vm: Vm, nodes: list[str],
                chunk: int = RESYNC_CHUNK) -> HashResync:
    """Bring the replicas level with the source by digests; the mirrors run (sync=none) when it returns.

    `manifest` is the current one (saved around the final pause).
    """
    src, dr = reach.shell(vm.host), reach.shell(vm.dr_host)
    look: dict[int, set[int] | None] = dict.fromkeys(range(len(nodes)))  # None: every chunk
    sent = digests = rounds = 0
    with source_view(src, qmp, vm, nodes) as socket_path:
        sides = _Sides(reach, src, dr, qmp, vm, manifest, socket_path, chunk)
        bitmap = verify.add_bitmap(qmp, nodes)
        for rounds in range(1, MAX_ROUNDS + 1):
            to_copy: dict[int, set[int]] = {}
            written: dict[int, set[int]] = {}
            for i in range(len(nodes)):
                todo = look[i]
                differ, written[i], wire = _round(sides, nodes[i], i, bitmap, None if todo is None else sorted(todo))
                digests += wire
                if differ:
                    to_copy[i] = differ
            verify.drop_bitmap(qmp, nodes, bitmap)
            bitmap = verify.add_bitmap(qmp, nodes)  # before the copy: a write racing it is seen
            for i, offsets in to_copy.items():
                sent += _copy(sides, i, offsets)
            look = {i: written[i] for i in range(len(nodes))}
            log.info("%s hash resync round %d: copied %s chunks, %s written meanwhile", vm.name, rounds,
                     {i: len(c) for i, c in to_copy.items()}, [len(w) for w in written.values()])
            if not any(written.values()):
                break
        paused_at = time.monotonic()
        sent += _finish_paused(sides, nodes, bitmap, look)
        paused = time.monotonic() - paused_at
    return HashResync(sent, digests, rounds, round(paused, 3))


def _copy(sides: _Sides, i: int, offsets: set[int]) -> int:
    manifest = sides.manifest
    ranges = verify.ranges_of(offsets, sides.chunk, manifest.disks[i].virtual_size)
    return copy_ranges(sides.src, live_disk(str(sides.socket_path), verify.disk_export(i)),
                       replica_via_link(sides.vm, manifest, i), ranges, f"resync of {manifest.disks[i].device}")


def _finish_paused(sides: _Sides, nodes: list[str], bitmap: str, look: dict[int, set[int] | None]) -> int:
    """Source paused: copy what was written since the last bitmap began (and what is still open), start mirrors."""
    sent = 0
    qmp = sides.qmp
    with paused_source(sides.reach, sides.dr, sides.vm, sides.manifest, qmp, "resync"):
        for i, node in enumerate(nodes):
            written = verify.written_chunks(qmp, sides.src, sides.socket_path, i, node, bitmap, sides.chunk)
            left = written | (look[i] or set())
            if left:
                sent += _copy(sides, i, left)
        verify.drop_bitmap(qmp, nodes, bitmap)
        start_mirrors(qmp, sides.manifest, nodes, sync="none")
    return sent


def _round(sides: _Sides, node: str, i: int, bitmap: str,
           offsets: list[int] | None) -> tuple[set[int], set[int], int]:
    """Hash disk i on both sides; (chunks that differ and were not written, chunks written, digest bytes)."""
    manifest, vm = sides.manifest, sides.vm
    nothing = ChunkHashes(manifest.disks[i].virtual_size, {}, 0, 0.0)
    source_side, replica_side = (nothing, nothing) if offsets == [] else hash_both(
        sides.src, sides.dr, live_disk(str(sides.socket_path), verify.disk_export(i)),
        replica_export(vm, manifest, i), sides.chunk, offsets, f"{vm.name} {manifest.disks[i].device}")
    # the bitmap is read even when nothing was hashed: it holds the writes the next round looks at
    moved = verify.written_chunks(sides.qmp, sides.src, sides.socket_path, i, node, bitmap, sides.chunk)
    verdicts = verify.judge(source_side, replica_side, sides.chunk, moved)
    return set(verdicts.differ), moved, _wire(source_side, replica_side)


def _wire(*sides: ChunkHashes) -> int:
    return sum(s.wire_bytes for s in sides)
