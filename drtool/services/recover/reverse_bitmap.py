"""Protection back home after a live failover: send only what the DR copy wrote since the switch.

A live failover leaves the old source disks exactly as the replicas were at
the switch (the source stopped in its pause, the mirrors completed, it quit
cleanly in postmigrate), and a persistent bitmap on each of the DR copy's
disks, added before it first ran, holds every block it wrote since. So the
reverse protection needs no rewind and no hashing: the bitmap's blocks are
copied while the DR copy runs, once more with it paused (a few ms), and mirrors
start with sync=none, in sync at once; as drtool resync's bitmap tier does in
the forward direction.
"""

from __future__ import annotations

from collections.abc import Callable

from drtool.errors import Refused
from drtool.mechanics.migration import reverse_bitmap_on
from drtool.mechanics.replication import start_mirrors
from drtool.services.resync import bitmap_backup_round
from drtool.state.manifest import Manifest
from drtool.transport.qmp import QmpSession

BITMAP_METHOD = "bitmap"
PAUSED = "catch-up-paused"  # a reprotect step: the DR copy is paused by drtool (a re-run resumes it)


def live_reverse_bitmap(manifest: Manifest) -> str | None:
    """The reverse bitmap a live failover (or an undone live failback) recorded, if any."""
    failover = manifest.failover
    if failover is None or not failover.migration:
        return None
    name = failover.migration.get("reverse_bitmap")
    return str(name) if name else None


def catch_up_from_bitmap(qmp: QmpSession, reverse: Manifest, nodes: list[str], bitmap: str,
                         record_pause: Callable[[bool], None]) -> int:
    """Copy the bitmap's blocks to the old disks, then mirror from now on; bytes sent.

    record_pause(True) is called before the DR copy is paused, record_pause(False) after it runs again.
    """
    if reverse_bitmap_on(qmp, nodes) != bitmap:
        raise Refused(f"the DR copy of {reverse.vm} no longer has the change tracking its live failover started "
                      f"({bitmap}; its QEMU was restarted uncleanly?)",
                      hint="protect the VM anew from its DR host, or fail back with drtool recover --failback "
                           "after a reprotect from a point")
    sent = bitmap_backup_round(qmp, reverse, nodes, bitmap)
    record_pause(True)
    qmp.execute("stop")
    try:
        sent += bitmap_backup_round(qmp, reverse, nodes, bitmap)
        start_mirrors(qmp, reverse, nodes, sync="none")
    finally:
        qmp.execute("cont")
    record_pause(False)
    return sent


def drop_reverse_bitmap(qmp: QmpSession, nodes: list[str], bitmap: str) -> None:
    """Once the mirrors are recorded: the bitmap was emptied by the rounds, and they carry every write now."""
    for node in nodes:
        qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": bitmap})
