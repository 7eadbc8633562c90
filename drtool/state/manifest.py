"""The DR-side manifest: everything failover needs, kept beside the replicas.

It lives at <replica_dir>/manifest.json on the DR host and is rewritten
atomically at every step, so that with the primary site and drtool's own
machine both gone, the DR host still describes the VM: its disks, where their
replicas are, how to start it, and what state protection was in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from drtool.errors import DrtoolError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ManifestError(DrtoolError):
    """A manifest could not be read: not drtool's, or from a newer drtool."""


@dataclass(frozen=True)
class ReplicaDisk:
    device: str  # device id on the source VM
    node_name: str  # the source's format node that is mirrored
    format: str  # the source image's format
    virtual_size: int
    source_image: str
    replica_image: str  # path on the DR host
    export: str  # NBD export name on the replication target


@dataclass(frozen=True)
class RecoveryPoint:
    """A point in time on the DR side, consistent across all the VM's disks.

    Its images are the frozen tops of each replica's chain when it was taken:
    read-only from then on, since replication writes to the overlay above.
    """

    id: str
    time: str
    quiesce: str  # frozen (guest agent fsfreeze) | paused (QMP stop) | final (failover)
    quiesce_seconds: float
    images: dict[str, str]  # device id -> the point's image on the DR host
    tested_at: str | None = None


@dataclass(frozen=True)
class Manifest:
    vm: str
    source_host: str
    dr_host: str
    mode: str  # "async" | "sync"
    transport: str  # "tls-psk" | "plain"
    nbd_address: str  # where the source reaches the target
    nbd_port: int
    disks: tuple[ReplicaDisk, ...]
    hardware: dict[str, Any] = field(default_factory=dict)  # source QEMU argv and what maps it
    state: str = "seeding"  # seeding | protected | unprotected
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    history: tuple[dict[str, str], ...] = ()
    points: tuple[RecoveryPoint, ...] = ()
    pending_point: dict[str, Any] = field(default_factory=dict)  # see points.py: written before the snapshot
    failover: dict[str, Any] = field(default_factory=dict)  # the failover under way or done, step by step
    drill: dict[str, Any] = field(default_factory=dict)  # a test failover that is running
    # The persistent dirty bitmap resync may trust (replication.py): the replicas held every
    # write made before it began. Empty while none is trusted (seeding, a full copy running).
    bitmap_name: str = ""
    bitmap_generation: int = 0
    version: int = FORMAT_VERSION

    def point(self, point_id: str) -> RecoveryPoint | None:
        return next((p for p in self.points if p.id == point_id), None)

    def with_state(self, state: str, note: str = "") -> Manifest:
        stamp = now()
        entry = {"time": stamp, "state": state} | ({"note": note} if note else {})
        return replace(self, state=state, updated_at=stamp, history=(*self.history, entry)[-50:])

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("version", 0) > FORMAT_VERSION:
                raise ManifestError(
                    f"{where} was written by a newer drtool (format {raw['version']})",
                    hint="upgrade drtool on this machine",
                )
            raw["disks"] = tuple(ReplicaDisk(**d) for d in raw["disks"])
            raw["history"] = tuple(raw.get("history", ()))
            raw["points"] = tuple(RecoveryPoint(**p) for p in raw.get("points", ()))
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ManifestError(f"{where} is not a drtool manifest: {err}") from err


def manifest_path(replica_dir: PurePosixPath) -> PurePosixPath:
    return replica_dir / MANIFEST_NAME
