"""The DR-side manifest: everything failover needs, kept beside the replicas.

It lives at <replica_dir>/manifest.json on the DR host and is rewritten
atomically at every step, so that with the primary site and drtool's own
machine both gone, the DR host still describes the VM: its disks, where their
replicas are, how to start it, and what state protection was in.

Format 2 (this drtool) stores the typed records of records.py, absent ones as
null; format 1 (earlier drtools) stored them as dicts, empty when absent. Both
load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from drtool.errors import DrtoolError
from drtool.state.protection import Protection, check_transition
from drtool.state.records import (
    DrillRecord,
    FailoverRecord,
    PendingPoint,
    RecoveryPoint,
    ReprotectRecord,
    SourcePause,
)

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
PREVIOUS_SUFFIX = ".prev"  # the manifest before the last write: read when the current one is damaged

__all__ = ["FORMAT_VERSION", "Manifest", "ManifestError", "RecoveryPoint", "ReplicaDisk", "manifest_path", "now"]


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
    state: Protection = Protection.SEEDING
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    history: tuple[dict[str, str], ...] = ()
    points: tuple[RecoveryPoint, ...] = ()
    pending_point: PendingPoint | None = None  # see points.py: written before the snapshot
    failover: FailoverRecord | None = None  # the failover under way or done, step by step
    drill: DrillRecord | None = None  # a test failover that is running
    source_pause: SourcePause | None = None  # drtool paused the source and has not resumed it yet
    reprotect: ReprotectRecord | None = None  # drtool recover: replication back to the original host
    # The persistent dirty bitmap resync may trust (replication.py): the replicas held every
    # write made before it began. Empty while none is trusted (seeding, a full copy running).
    bitmap_name: str = ""
    bitmap_generation: int = 0
    version: int = FORMAT_VERSION

    def point(self, point_id: str) -> RecoveryPoint | None:
        return next((p for p in self.points if p.id == point_id), None)

    def transition(self, state: Protection, note: str = "") -> Manifest:
        """The manifest in `state`; raises ForbiddenTransition on an edge protection.ALLOWED does not list."""
        check_transition(self.state, state, self.vm)
        stamp = now()
        entry = {"time": stamp, "state": state.value} | ({"note": note} if note else {})
        return replace(self, state=state, updated_at=stamp, history=(*self.history, entry)[-50:])

    def with_state(self, state: Protection | str, note: str = "") -> Manifest:
        """The name before typed states: the same guarded transition, the state given by its value."""
        return self.transition(Protection(state), note)

    def to_json(self) -> bytes:
        data = asdict(self)
        for point in data["points"]:  # written only when set: a drtool from before --keep still reads the file
            if not point.get("kept"):
                point.pop("kept", None)
        data["version"] = FORMAT_VERSION
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("version", 0) > FORMAT_VERSION:
                raise ManifestError(
                    f"{where} was written by a newer drtool (format {raw['version']})",
                    hint="upgrade drtool on this machine",
                )
            raw["state"] = Protection(raw.get("state", Protection.SEEDING.value))
            raw["disks"] = tuple(ReplicaDisk(**d) for d in raw["disks"])
            raw["history"] = tuple(raw.get("history", ()))
            raw["points"] = tuple(RecoveryPoint(**p) for p in raw.get("points", ()))
            # format 1 wrote {} for an absent record
            raw["pending_point"] = PendingPoint.load(raw["pending_point"]) if raw.get("pending_point") else None
            raw["failover"] = FailoverRecord.load(raw["failover"]) if raw.get("failover") else None
            raw["drill"] = DrillRecord.load(raw["drill"]) if raw.get("drill") else None
            raw["source_pause"] = SourcePause.load(raw["source_pause"]) if raw.get("source_pause") else None
            raw["reprotect"] = ReprotectRecord.load(raw["reprotect"]) if raw.get("reprotect") else None
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ManifestError(f"{where} is not a drtool manifest: {err}") from err


def manifest_path(replica_dir: PurePosixPath) -> PurePosixPath:
    return replica_dir / MANIFEST_NAME
