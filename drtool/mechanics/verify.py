"""The source side of `drtool check`: a read-only view of the live disks, and what moved.

QEMU 7.2 cannot fleece a disk that a mirror job runs on: blockdev-backup and
blockdev-snapshot refuse the node ("busy"), and a copy-before-write filter
added with blockdev-add cannot be put into the guest's write path. So the
source is read live, and a dirty bitmap started before the DR point's pause
tells which chunks the guest wrote since: only chunks it did not write are
judged (their content while read is their content at the point); the others
are compared again in a later round against a newer point.

QEMU objects drtool owns here (all removed after a check, or by the next one):
  an NBD server on a UNIX socket in the VM's source dir (nbd-server-start),
  exports drtool-check<i> (a disk, read-only) and drtool-check-bm<i> (a frozen bitmap),
  bitmaps drtool-check-<n> on the disks' nodes (not persistent).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.errors import DrtoolError, QmpError
from drtool.mechanics.hasher import (
    DIGEST_SIZE,
    ZERO,
    ChunkHashes,
    dirty_extents,
    live_disk,
)
from drtool.transport.connections import RemoteShell
from drtool.transport.qmp import QmpSession

EXPORT_PREFIX = "drtool-check"
BITMAP_PREFIX = "drtool-check-"


class CheckUnavailable(DrtoolError):
    """The comparison could not be set up (not a verdict on the replica)."""


def disk_export(i: int) -> str:
    return f"{EXPORT_PREFIX}{i}"


def bitmap_export(i: int) -> str:
    return f"{EXPORT_PREFIX}-bm{i}"


def open_view(qmp: QmpSession, nodes: Sequence[str], socket_path: PurePosixPath, leftover: bool) -> None:
    """Export each disk node read-only on an NBD server bound to socket_path.

    leftover: drtool's socket exists, so an NBD server a killed check started
    may still run: it is stopped first. A server drtool did not start is never
    stopped (QEMU runs one at a time: then the check cannot run now).
    """
    close_view(qmp, nodes, stop_server=leftover)
    try:
        qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket_path)}}})
    except QmpError as err:
        raise CheckUnavailable(f"cannot start an NBD server in the source QEMU: {err.qemu_desc}",
                               hint="QEMU runs one NBD server at a time: is a backup or migration using it? "
                               "try again later") from err
    try:
        for i, node in enumerate(nodes):
            qmp.execute("block-export-add", {"type": "nbd", "id": disk_export(i), "node-name": node,
                                             "name": disk_export(i), "writable": False})
    except QmpError:
        close_view(qmp, nodes, stop_server=True)
        raise


def close_view(qmp: QmpSession, nodes: Sequence[str], stop_server: bool, timeout: float = 10) -> None:
    """Remove drtool's check exports and bitmaps; stop the NBD server if drtool started it and no one else uses it."""
    exports = qmp.execute("query-block-exports")
    for export_id in [e["id"] for e in exports if str(e.get("id", "")).startswith(EXPORT_PREFIX)]:
        unexport(qmp, export_id, timeout)
    others = [e for e in qmp.execute("query-block-exports") if not str(e.get("id", "")).startswith(EXPORT_PREFIX)]
    if stop_server and not others:
        _quietly(qmp, "nbd-server-stop", {})
    remove_bitmaps(qmp, nodes)


def add_bitmap(qmp: QmpSession, nodes: Sequence[str]) -> str:
    """A new (transient) bitmap on every disk: from now on it records every write."""
    name = f"{BITMAP_PREFIX}{time.time_ns()}"
    qmp.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": n, "name": name, "persistent": False}} for n in nodes]})
    return name


def freeze_bitmap(qmp: QmpSession, nodes: Sequence[str], name: str) -> None:
    """Stop recording; the transaction drains in-flight writes first, so every completed write is in it."""
    qmp.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-disable", "data": {"node": n, "name": name}} for n in nodes]})


def export_bitmap(qmp: QmpSession, i: int, node: str, name: str) -> None:
    """Export disk i's (frozen) bitmap, for the hasher to read its dirty ranges."""
    qmp.execute("block-export-add", {"type": "nbd", "id": bitmap_export(i), "node-name": node,
                                     "name": bitmap_export(i), "writable": False, "bitmaps": [name]})


def unexport(qmp: QmpSession, export_id: str, timeout: float = 10) -> None:
    """Remove an export and wait until it is gone (its bitmap is busy until then)."""
    _quietly(qmp, "block-export-del", {"id": export_id, "mode": "hard"})
    deadline = time.monotonic() + timeout
    while export_id in {e["id"] for e in qmp.execute("query-block-exports")}:
        if time.monotonic() > deadline:
            raise DrtoolError(f"the source QEMU did not remove its export {export_id} within {timeout:g} s")
        time.sleep(0.05)


def written_chunks(qmp: QmpSession, shell: RemoteShell, socket_path: PurePosixPath, i: int, node: str,
                   bitmap: str, chunk: int) -> set[int]:
    """Freeze disk i's bitmap (in-flight writes drain into it first) and read which chunks it marks."""
    freeze_bitmap(qmp, [node], bitmap)
    export_bitmap(qmp, i, node, bitmap)
    try:
        extents = dirty_extents(shell, live_disk(str(socket_path), bitmap_export(i)), bitmap,
                                f"the blocks written to disk {i}")
    finally:
        unexport(qmp, bitmap_export(i))
    return chunks_touched(extents, chunk)


def drop_bitmap(qmp: QmpSession, nodes: Sequence[str], name: str) -> None:
    for node in nodes:
        _quietly(qmp, "block-dirty-bitmap-remove", {"node": node, "name": name})


def remove_bitmaps(qmp: QmpSession, nodes: Sequence[str]) -> None:
    wanted = set(nodes)
    for node in qmp.execute("query-named-block-nodes", {"flat": True}):
        if node.get("node-name") in wanted:
            for bitmap in node.get("dirty-bitmaps", []):
                if str(bitmap.get("name", "")).startswith(BITMAP_PREFIX):
                    _quietly(qmp, "block-dirty-bitmap-remove", {"node": node["node-name"], "name": bitmap["name"]})


def _quietly(qmp: QmpSession, command: str, args: dict[str, object]) -> None:
    try:
        qmp.execute(command, args)
    except QmpError:
        pass


# ----------------------------------------------------------------------------- comparing digests


def zero_digest(length: int) -> str:
    return hashlib.blake2b(bytes(length), digest_size=DIGEST_SIZE).hexdigest()


@dataclass(frozen=True)
class Verdicts:
    same: frozenset[int]
    differ: frozenset[int]
    moved: frozenset[int]  # written since the bitmap began: compare again against a newer point
    compared_bytes: int  # bytes of the chunks judged that were not zeros on both sides


def chunks_touched(extents: Iterable[tuple[int, int]], chunk: int) -> set[int]:
    """Offsets of the chunks that any of these ranges touches."""
    touched: set[int] = set()
    for offset, length in extents:
        if length > 0:
            touched.update(range(offset // chunk * chunk, offset + length, chunk))
    return touched


def judge(source: ChunkHashes, replica: ChunkHashes, chunk: int, moved: set[int]) -> Verdicts:
    """Compare two sides' digests chunk by chunk; a chunk written since the point is not judged."""
    same: set[int] = set()
    differ: set[int] = set()
    later: set[int] = set()
    compared = 0
    size = min(source.size, replica.size)
    for offset in sorted(set(source.chunks) | set(replica.chunks)):
        if offset >= size:
            continue
        if offset in moved:
            later.add(offset)
            continue
        length = min(chunk, size - offset)
        a, b = source.chunks.get(offset), replica.chunks.get(offset)
        if a is None or b is None:
            raise DrtoolError(f"chunk {offset} was hashed on one side only")
        if a == ZERO and b == ZERO:
            same.add(offset)
            continue
        compared += length
        zero = zero_digest(length)
        (same if (zero if a == ZERO else a) == (zero if b == ZERO else b) else differ).add(offset)
    return Verdicts(frozenset(same), frozenset(differ), frozenset(later), compared)


def ranges_of(offsets: Iterable[int], chunk: int, size: int) -> list[tuple[int, int]]:
    """Adjacent chunks merged into (offset, length) ranges."""
    ranges: list[tuple[int, int]] = []
    for offset in sorted(offsets):
        length = min(chunk, size - offset)
        if ranges and ranges[-1][0] + ranges[-1][1] == offset:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
        else:
            ranges.append((offset, length))
    return ranges
