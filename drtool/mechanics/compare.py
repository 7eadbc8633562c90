"""Comparing a replica with its source without copying either: `drtool check`'s rounds.

Shared by `drtool check`, its --repair and resync's hash tier. Round by round:
a dirty bitmap starts on each source disk, then a point is taken on the DR side
exactly as `drtool checkpoint` takes one (mechanics/pausing.py). Each host
hashes its own side in chunks (mechanics/hasher.py): the DR host the point's
image, the source host the live disk through a read-only NBD export of its
QEMU. Only digests cross the network. A chunk the bitmap shows unwritten since
before the pause held, while it was read, exactly its content at the point: its
digests decide. The chunks the guest wrote meanwhile are compared again, in
further rounds while more than PAUSED_LIMIT of them are left (at most
MAX_ROUNDS), then with the source paused (recorded first, see paused_source)
and its mirrors drained, source disk against the replica's top.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import DrtoolError
from drtool.mechanics import verify
from drtool.mechanics.dr_target import PSK_USER, TargetLayout, source_tls_dir
from drtool.mechanics.hasher import ChunkHashes, hash_chunks, image_file, live_disk
from drtool.mechanics.link import link_socket
from drtool.mechanics.pausing import DRAIN_TIMEOUT, paused_source, take_consistent_point
from drtool.mechanics.points import delete_points
from drtool.mechanics.replication import current_nodes, wait_drained
from drtool.state.manifest import Manifest
from drtool.state.store import save_manifest
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession

log = logging.getLogger(__name__)
MAX_ROUNDS = 4
PAUSED_LIMIT = 64 << 20  # bytes of chunks still open that are compared with the source paused


def source_socket(vm: Vm) -> PurePosixPath:
    return vm.source_state_dir / "check.nbd.sock"


@contextlib.contextmanager
def source_view(src: RemoteShell, qmp: QmpSession, vm: Vm, nodes: Sequence[str]) -> Iterator[PurePosixPath]:
    """The source disks exported read-only on drtool's socket while the block runs; its path."""
    socket_path = source_socket(vm)
    src.run(["mkdir", "-p", "-m", "700", "--", str(vm.source_state_dir)], timeout=30)
    leftover = src.run(["test", "-S", str(socket_path)], check=False, timeout=30).ok
    verify.open_view(qmp, nodes, socket_path, leftover)
    try:
        yield socket_path
    finally:
        verify.close_view(qmp, nodes, stop_server=True)
        src.run(["rm", "-f", "--", str(socket_path)], check=False, timeout=30)


def replica_export(vm: Vm, manifest: Manifest, index: int) -> dict[str, object]:
    """The replica's top as the DR host reaches it: its target's NBD export."""
    spec: dict[str, object] = {"tcp": manifest.nbd_address, "port": manifest.nbd_port,
                               "export": manifest.disks[index].export}
    if manifest.transport == "tls-psk":
        spec |= {"tls_psk_file": str(TargetLayout(vm.replica_dir).tls_dir / "keys.psk"), "tls_username": PSK_USER}
    return spec


def replica_via_link(vm: Vm, manifest: Manifest, index: int) -> dict[str, object]:
    """The replica's top as the source host reaches it: the DR target's export, through the link and its TLS key."""
    target: dict[str, object] = {"unix": str(link_socket(vm)), "export": manifest.disks[index].export}
    if manifest.transport == "tls-psk":
        target |= {"tls_psk_file": str(source_tls_dir(vm) / "keys.psk"), "tls_username": PSK_USER}
    return target


def hash_both(src: RemoteShell, dr: RemoteShell, source: dict[str, object], replica: dict[str, object], chunk: int,
              offsets: list[int] | None, what: str) -> tuple[ChunkHashes, ChunkHashes]:
    """Each host hashes its own side of one disk, both at once."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        source_job = pool.submit(hash_chunks, src, source, chunk, offsets, f"{what} on the source host")
        replica_job = pool.submit(hash_chunks, dr, replica, chunk, offsets, f"{what} on the DR host")
        return source_job.result(), replica_job.result()


@dataclass
class DiskTally:
    same: set[int] = field(default_factory=set)
    differ: set[int] = field(default_factory=set)
    pending: set[int] | None = None  # chunks still to judge; None: all of them
    compared: int = 0
    src_read: int = 0
    dr_read: int = 0
    wire: int = 0
    size: int = 0
    src_seconds: float = 0.0
    dr_seconds: float = 0.0

    def add(self, verdicts: verify.Verdicts, source_side: ChunkHashes, replica_side: ChunkHashes) -> None:
        """One round's verdicts: what the guest wrote meanwhile stays pending."""
        self.size = min(source_side.size, replica_side.size)
        self.same |= verdicts.same
        self.differ |= verdicts.differ
        self.pending = set(verdicts.moved)
        self.compared += verdicts.compared_bytes
        self.src_read += source_side.bytes_read
        self.dr_read += replica_side.bytes_read
        self.wire += source_side.wire_bytes + replica_side.wire_bytes
        self.src_seconds += source_side.seconds
        self.dr_seconds += replica_side.seconds


@dataclass
class Compared:
    manifest: Manifest  # with the points the comparison took
    tallies: list[DiskTally]
    rounds: int
    taken: list[str]  # ids of the points taken, oldest first
    paused_seconds: float  # how long the source was paused in all


def compare_at_points(reach: Reach, dr: RemoteShell, qmp: QmpSession, target: QmpSession, vm: Vm,
                      manifest: Manifest, chunk: int, only: dict[int, set[int]] | None = None,
                      by: str = "check") -> Compared:
    """Rounds of (bitmap, point, hash both sides, judge), then the rest with the source paused."""
    src = reach.shell(vm.host)
    nodes = current_nodes(qmp, manifest)
    tallies = [DiskTally(pending=None if only is None else set(only.get(i, set())))
               for i in range(len(manifest.disks))]
    taken: list[str] = []
    rounds = 0
    paused_total = 0.0
    before = sum(d.virtual_size for d in manifest.disks) + 1
    with source_view(src, qmp, vm, nodes) as socket_path:
        for rounds in range(1, MAX_ROUNDS + 1):
            bitmap = verify.add_bitmap(qmp, nodes)
            manifest, paused = take_consistent_point(reach, qmp, target, manifest, vm, dr, "paused", by)
            point = manifest.points[-1]
            paused_total += paused
            log.info("%s round %d: point %s taken, source paused %.3f s", vm.name, rounds, point.id, paused)
            taken.append(point.id)
            for i, disk in enumerate(manifest.disks):
                tally = tallies[i]
                if tally.pending is not None and not tally.pending:
                    continue
                offsets = None if tally.pending is None else sorted(tally.pending)
                source_side, replica_side = hash_both(
                    src, dr, live_disk(str(socket_path), verify.disk_export(i)), image_file(point.images[disk.device]),
                    chunk, offsets, f"{vm.name} {disk.device}")
                log.info("%s %s: hashed %d bytes on the source in %.2f s, %d on the DR host in %.2f s", vm.name,
                         disk.device, source_side.bytes_read, source_side.seconds, replica_side.bytes_read,
                         replica_side.seconds)
                moved = verify.written_chunks(qmp, src, socket_path, i, nodes[i], bitmap, chunk)
                tally.add(verify.judge(source_side, replica_side, chunk, moved), source_side, replica_side)
            verify.drop_bitmap(qmp, nodes, bitmap)
            log.info("%s round %d judged; still to compare: %s", vm.name, rounds,
                     [len(t.pending or ()) for t in tallies])
            left = sum(len(t.pending or ()) for t in tallies) * chunk
            if left <= PAUSED_LIMIT or left >= before:  # small enough, or more rounds would not shrink it
                break
            before = left
        if any(t.pending for t in tallies) and sum(len(t.pending or ()) for t in tallies) * chunk <= PAUSED_LIMIT:
            paused_total += _compare_paused(reach, src, dr, qmp, vm, manifest, tallies, chunk, socket_path, by)
    return Compared(manifest, tallies, rounds, taken, round(paused_total, 3))


def _compare_paused(reach: Reach, src: RemoteShell, dr: RemoteShell, qmp: QmpSession, vm: Vm, manifest: Manifest,
                    tallies: list[DiskTally], chunk: int, socket_path: PurePosixPath, by: str) -> float:
    """The chunks the guest kept writing, compared with the source paused and its mirrors drained.

    Nothing moves on either side then: the source disk and the replica's top
    (read through the DR target's export) hold the same instant.
    """
    nodes = current_nodes(qmp, manifest)
    with paused_source(reach, dr, vm, manifest, qmp, by):
        started = time.monotonic()
        if not wait_drained(qmp, manifest, nodes, DRAIN_TIMEOUT):
            raise DrtoolError(f"the mirrors of {vm.name} did not drain within {DRAIN_TIMEOUT:g} s",
                              hint=f"see drtool status {vm.name}: the link or the DR storage may be stalled")
        for i, tally in enumerate(tallies):
            if tally.pending:
                source_side, replica_side = hash_both(
                    src, dr, live_disk(str(socket_path), verify.disk_export(i)), replica_export(vm, manifest, i),
                    chunk, sorted(tally.pending), f"{vm.name} {manifest.disks[i].device}")
                tally.add(verify.judge(source_side, replica_side, chunk, set()), source_side, replica_side)
    paused = time.monotonic() - started
    log.info("%s: compared the last chunks with the source paused for %.3f s", vm.name, paused)
    return paused


def drop_points(target: QmpSession, dr: RemoteShell, vm: Vm, manifest: Manifest, ids: list[str]) -> Manifest:
    """Delete the comparison's own earlier points (the newest stays: it is the base of the replica's top).

    As retention does, never while a drill or failover is recorded.
    """
    if not ids or manifest.drill or manifest.failover:
        return manifest
    saved: list[Manifest] = []

    def save(m: Manifest) -> None:
        save_manifest(dr, vm, m)
        saved.append(m)

    try:
        return delete_points(target, dr, manifest, ids, save=save)
    except DrtoolError:  # left as ordinary points; retention removes them later
        return saved[-1] if saved else manifest
