"""What `drtool check` finds, and the results it keeps on the DR host.

Kept beside the manifest: <replica_dir>/checks/check-<time>.json. Each file is
written atomically (temp file, fsync, rename); the newest HISTORY_KEEP are
kept. `drtool check --history VM` lists them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import PurePosixPath
from typing import Any

from drtool.domain import Vm
from drtool.errors import RemoteCommandError
from drtool.mechanics.remote import make_dirs, write_file
from drtool.state.manifest import now
from drtool.state.protection import Health
from drtool.transport.connections import RemoteShell

HISTORY_KEEP = 60
_PRUNE = 'ls -1 -- "$1"/check-*.json 2>/dev/null | sort | head -n -"$2" | while read -r f; do rm -f -- "$f"; done'
_LIST = 'for f in $(ls -1 -- "$1"/check-*.json 2>/dev/null | sort); do cat -- "$f"; echo; done'


class CheckStatus(IntEnum):
    """Exit statuses of `drtool check` (monitoring-plugin convention, unlike other commands)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class DiskCheck:
    device: str
    size: int
    replication: Health
    lag_bytes: int | None
    compared_bytes: int = 0  # bytes of chunks judged that were not zeros on both sides
    differing: tuple[tuple[int, int], ...] = ()  # (offset, length) ranges whose content differs
    not_compared: tuple[tuple[int, int], ...] = ()  # rewritten by the guest in every round
    seconds: float = 0.0
    source_read_bytes: int = 0
    replica_read_bytes: int = 0
    wire_bytes: int = 0  # what the digests and requests took on the network
    source_hash_seconds: float = 0.0  # time each host's hasher took (they run at the same time)
    replica_hash_seconds: float = 0.0
    repaired: tuple[tuple[int, int], ...] = ()

    @property
    def differing_bytes(self) -> int:
        return sum(n for _, n in self.differing)

    @property
    def rate(self) -> float:
        return self.compared_bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class VmCheck:
    vm: str
    status: CheckStatus
    summary: str  # why this status, in a few words
    started_at: str = field(default_factory=now)
    seconds: float = 0.0
    replication: Health = Health.UNKNOWN  # the worst of its disks' replication health
    lag_bytes: int | None = None
    newest_point_age: float | None = None  # s, as it was before the check took its own point
    point: str | None = None  # the point the replica was compared at (the newest after the check)
    rounds: int = 0
    disks: tuple[DiskCheck, ...] = ()
    repair_error: str = ""  # --repair was asked and failed: the differences stand
    paused_seconds: float = 0.0  # how long the check paused the source, in all

    @property
    def differing_bytes(self) -> int:
        return sum(d.differing_bytes for d in self.disks)


@dataclass(frozen=True)
class CheckReport:
    vms: tuple[VmCheck, ...]

    @property
    def exit_code(self) -> CheckStatus:
        return max((v.status for v in self.vms), default=CheckStatus.OK)


def history_dir(vm: Vm) -> PurePosixPath:
    return vm.replica_dir / "checks"


def keep_result(dr: RemoteShell, vm: Vm, result: VmCheck) -> None:
    directory = history_dir(vm)
    make_dirs(dr, directory)
    stamp = result.started_at.replace(":", "").replace("-", "").replace("+0000", "Z")
    data = asdict(result) | {"status_name": result.status.name}
    write_file(dr, directory / f"check-{stamp}.json", json.dumps(data).encode(), mode=0o600)
    dr.run(["sh", "-c", _PRUNE, "sh", str(directory), str(HISTORY_KEEP)], check=False, timeout=30)


@dataclass(frozen=True)
class HistoryEntry:
    started_at: str
    status: str  # OK, WARNING, CRITICAL, UNKNOWN
    summary: str
    seconds: float
    point: str | None
    compared_bytes: int
    differing_bytes: int
    repaired_bytes: int


def _entry(raw: dict[str, Any]) -> HistoryEntry:
    disks = raw.get("disks", [])
    return HistoryEntry(
        str(raw.get("started_at", "?")), str(raw.get("status_name", raw.get("status", "?"))),
        str(raw.get("summary", "")), float(raw.get("seconds", 0.0)), raw.get("point"),
        sum(int(d.get("compared_bytes", 0)) for d in disks),
        sum(int(n) for d in disks for _, n in d.get("differing", [])),
        sum(int(n) for d in disks for _, n in d.get("repaired", [])))


def kept_results(dr: RemoteShell, vm: Vm) -> tuple[HistoryEntry, ...]:
    """The results kept for `vm`, oldest first; files that are not check results are skipped."""
    result = dr.run(["sh", "-c", _LIST, "sh", str(history_dir(vm))], check=False, timeout=60)
    if not result.ok:
        raise RemoteCommandError(f"cannot read the check history of {vm.name}: {result.err.strip()}")
    entries = []
    for line in result.out.splitlines():
        if line.strip():
            try:
                entries.append(_entry(json.loads(line)))
            except (ValueError, TypeError, AttributeError):
                continue  # a file from elsewhere: not a check result
    return tuple(entries)
