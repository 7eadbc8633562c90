"""Resync's last tier: compare digests, send only the chunks that differ.

After an unclean source restart no bitmap says what the replica misses. As
DRBD's checksum-based resync does, each host hashes its side and only
differing chunks are sent, instead of every allocated block:

1. A mirror starts with sync=none: from now on every guest write reaches the
   replica as well.
2. Rounds: a dirty bitmap starts; the mirrors drain (every write before the
   bitmap is on the replica); both sides are hashed live (the source through a
   read-only export of its QEMU, the replica through the DR target's own
   export). A chunk the bitmap shows unwritten was stable on both sides while
   hashed, so its digests decide; differing chunks are copied from the source
   into the replica (through the replication link) after the next round's
   bitmap has started, and are checked again in that round with the chunks
   the guest wrote meanwhile.
3. Chunks still open after MAX_ROUNDS are copied with the source paused and
   its mirrors drained: nothing can overtake them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from drtool.domain import Vm
from drtool.errors import DrtoolError
from drtool.mechanics import verify
from drtool.mechanics.dr_target import PSK_USER, TargetLayout
from drtool.mechanics.hasher import ChunkHashes, copy_ranges, dirty_extents, hash_chunks, live_disk
from drtool.mechanics.replication import start_mirrors, wait_quiet
from drtool.services.check import MAX_ROUNDS, source_socket
from drtool.services.check_repair import repair_batches, copy_paused, replica_via_link
from drtool.services.checkpoint import DRAIN_TIMEOUT
from drtool.services.concurrent import map_concurrently
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


def replica_export(vm: Vm, manifest: Manifest, index: int) -> dict[str, object]:
    """The replica's top as the DR host reaches it: its target's NBD export."""
    spec: dict[str, object] = {"tcp": manifest.nbd_address, "port": manifest.nbd_port,
                               "export": manifest.disks[index].export}
    if manifest.transport == "tls-psk":
        spec |= {"tls_psk_file": str(TargetLayout(vm.replica_dir).tls_dir / "keys.psk"), "tls_username": PSK_USER}
    return spec


def hash_resync(reach: Reach, qmp: QmpSession, manifest: Manifest, vm: Vm, nodes: list[str],
                chunk: int = RESYNC_CHUNK) -> HashResync:
    src, dr = reach.shell(vm.host), reach.shell(vm.dr_host)
    start_mirrors(qmp, manifest, nodes, sync="none")
    socket_path = source_socket(vm)
    src.run(["mkdir", "-p", "-m", "700", "--", str(vm.source_state_dir)], timeout=30)
    verify.open_view(qmp, nodes, socket_path)
    pending: dict[int, set[int] | None] = {i: None for i in range(len(nodes))}
    to_copy: dict[int, set[int]] = {}
    sent = digests = rounds = 0
    try:
        for rounds in range(1, MAX_ROUNDS + 1):
            bitmap = verify.add_bitmap(qmp, nodes)
            for i, offsets in to_copy.items():  # after the bitmap: a write racing the copy is seen
                ranges = verify.ranges_of(offsets, chunk, manifest.disks[i].virtual_size)
                sent += copy_ranges(src, live_disk(str(socket_path), verify.disk_export(i)),
                                    replica_via_link(vm, manifest, i), ranges, f"resync of {manifest.disks[i].device}")
                pending[i] = (pending[i] or set()) | offsets
            if not wait_quiet(qmp, manifest, DRAIN_TIMEOUT):
                raise DrtoolError(f"the mirrors of {vm.name} did not drain within {DRAIN_TIMEOUT:g} s",
                                  hint=f"run drtool resync {vm.name} again")
            to_copy = {}
            for i in range(len(nodes)):
                todo = pending[i]
                if todo is not None and not todo:
                    continue
                differ, moved, wire = _round(src, dr, qmp, vm, manifest, nodes[i], i, bitmap, chunk,
                                             None if todo is None else sorted(todo))
                digests += wire
                pending[i] = moved
                if differ:
                    to_copy[i] = differ
            verify.drop_bitmap(qmp, nodes, bitmap)
            log.info("%s hash resync round %d: to copy %s, to look at again %s", vm.name, rounds,
                     {i: len(c) for i, c in to_copy.items()}, [len(p or ()) for p in pending.values()])
            if not to_copy and all(not p for p in pending.values()):
                return HashResync(sent, digests, rounds)
        for i in range(len(nodes)):  # still open: copy them with nothing running beside
            left = to_copy.get(i, set()) | (pending[i] or set())
            for batch in repair_batches(verify.ranges_of(left, chunk, manifest.disks[i].virtual_size)):
                copy_paused(src, qmp, manifest, vm, i, batch)
                sent += sum(n for _, n in batch)
    finally:
        verify.close_view(qmp, nodes)
        src.run(["rm", "-f", "--", str(socket_path)], check=False, timeout=30)
    return HashResync(sent, digests, rounds)


def _round(src: RemoteShell, dr: RemoteShell, qmp: QmpSession, vm: Vm, manifest: Manifest, node: str, i: int,
           bitmap: str, chunk: int, offsets: list[int] | None) -> tuple[set[int], set[int], int]:
    """Hash disk i on both sides; (chunks that differ, chunks written meanwhile, digest bytes)."""
    device = manifest.disks[i].device
    jobs = [lambda: hash_chunks(src, live_disk(str(source_socket(vm)), verify.disk_export(i)), chunk, offsets,
                                f"{device} on {vm.host}"),
            lambda: hash_chunks(dr, replica_export(vm, manifest, i), chunk, offsets,
                                f"replica of {device} on {vm.dr_host}")]
    source_side, replica_side = map_concurrently(lambda job: job(), jobs)
    verify.freeze_bitmap(qmp, [node], bitmap)
    verify.export_bitmap(qmp, i, node, bitmap)
    try:
        moved = verify.chunks_touched(dirty_extents(src, live_disk(str(source_socket(vm)), verify.bitmap_export(i)),
                                                    bitmap, f"written blocks of {device}"), chunk)
    finally:
        verify.unexport(qmp, verify.bitmap_export(i))
    verdicts = verify.judge(source_side, replica_side, chunk, moved)
    return set(verdicts.differ), set(verdicts.moved), _wire(source_side, replica_side)


def _wire(*sides: ChunkHashes) -> int:
    return sum(s.wire_bytes for s in sides)
