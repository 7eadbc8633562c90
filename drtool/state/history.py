"""The history a DR host keeps of what drtool did to each VM: who, what, when, result.

One JSON object per line in `<drtool_dir>/history/<vm>.jsonl` on the VM's DR
host (outside the replica dir, so `unprotect --delete-replicas` keeps it),
rewritten atomically like the manifest (remote.write_file): a cut connection
leaves the old history or the new one, never half a line. The newest
HISTORY_LINES entries are kept.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from drtool.domain import Host
from drtool.mechanics.remote import make_dirs, read_file, write_file
from drtool.transport.connections import RemoteShell

HISTORY_LINES = 5000


def history_path(dr_host: Host, vm_name: str) -> PurePosixPath:
    return dr_host.drtool_dir / "history" / f"{vm_name}.jsonl"


def append_history(dr: RemoteShell, path: PurePosixPath, entry: dict[str, Any]) -> None:
    """Add one entry; the caller holds the VM's lock (two drtools never rewrite it at once)."""
    make_dirs(dr, path.parent)
    old = (read_file(dr, path) or b"").decode("utf-8", "replace").splitlines()
    lines = [*old, json.dumps(entry, sort_keys=True)][-HISTORY_LINES:]
    write_file(dr, path, ("\n".join(lines) + "\n").encode(), 0o600)


def read_history(dr: RemoteShell, path: PurePosixPath) -> list[dict[str, Any]]:
    text = (read_file(dr, path) or b"").decode("utf-8", "replace")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
