"""Check results kept on the DR host, beside the manifest: <replica_dir>/checks/check-<time>.json.

Each file is written atomically (temp file, fsync, rename); the newest
HISTORY_KEEP are kept. `drtool check --history VM` lists them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from drtool.domain import Inventory, Vm
from drtool.errors import RemoteCommandError
from drtool.mechanics.remote import make_dirs, write_file
from drtool.state.store import select_vm
from drtool.transport.connections import Reach, RemoteShell

if TYPE_CHECKING:
    from drtool.services.check import VmCheck

HISTORY_KEEP = 60
_PRUNE = 'ls -1 -- "$1"/check-*.json 2>/dev/null | sort | head -n -"$2" | while read -r f; do rm -f -- "$f"; done'
_LIST = 'for f in $(ls -1 -- "$1"/check-*.json 2>/dev/null | sort); do cat -- "$f"; echo; done'


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


@dataclass(frozen=True)
class CheckHistory:
    vm: str
    entries: tuple[HistoryEntry, ...]


def _entry(raw: dict[str, Any]) -> HistoryEntry:
    disks = raw.get("disks", [])
    return HistoryEntry(
        str(raw.get("started_at", "?")), str(raw.get("status_name", raw.get("status", "?"))),
        str(raw.get("summary", "")), float(raw.get("seconds", 0.0)), raw.get("point"),
        sum(int(d.get("compared_bytes", 0)) for d in disks),
        sum(int(n) for d in disks for _, n in d.get("differing", [])),
        sum(int(n) for d in disks for _, n in d.get("repaired", [])))


def check_history(inventory: Inventory, reach: Reach, name: str) -> CheckHistory:
    vm = select_vm(inventory, name)
    dr = reach.shell(vm.dr_host)
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
    return CheckHistory(vm.name, tuple(entries))
