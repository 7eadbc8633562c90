"""The JSON contract: docs/json.md lists exactly the fields each command's --json has, and absent is null."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from drtool.cli.output import to_jsonable
from drtool.cli.render import RolledBack
from drtool.services import checkpoint, failover, status
from drtool.services.checkpoint import CheckpointResult, PointsReport
from drtool.services.concurrent import VmOutcome
from drtool.services.dr_inventory import ExportResult
from drtool.services.drill import DrillCleanup, DrillResult
from drtool.services.failover import FailoverResult
from drtool.services.hosts import HostCheck
from drtool.services.protect import ProtectResult, UnprotectResult
from drtool.services.resync import ResyncResult
from drtool.services.status import VmStatus
from drtool.state.protection import Protection

from .world import REPLICAS, protected_world

DOC = Path(__file__).resolve().parents[2] / "docs" / "json.md"


def _inner(hint: object) -> tuple[type | None, str]:
    """The dataclass a field holds (directly, optionally, or as items of a sequence) and "[]" for items."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _inner(args[0]) if len(args) == 1 else (None, "")
    if origin in (tuple, list):
        return _inner(typing.get_args(hint)[0])[0], "[]"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint, ""
    return None, ""


def field_paths(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    paths = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):  # kept in the manifest, never in --json (cli/output.py)
            continue
        path = prefix + f.name
        paths.add(path)
        inner, items = _inner(hints[f.name])
        if inner is not None:
            paths |= field_paths(inner, path + items + ".")
    return paths


# a command over several VMs (services/concurrent.py's FleetReport); results[].result's fields are the one-VM
# command's (documented there)
MANY = {"results"} | {f"results[].{f.name}" for f in dataclasses.fields(VmOutcome)}

EXPECTED: dict[str, set[str]] = {
    "error": {"exit_code", "error", "hint"},
    "status": {"vms", "problems", "problems[].vm", "problems[].problem"} | field_paths(VmStatus, "vms[]."),
    "hosts check": {"hosts"} | field_paths(HostCheck, "hosts[]."),
    "protect": field_paths(ProtectResult),
    "protect (several VMs, --all)": MANY,
    "unprotect": field_paths(UnprotectResult),
    "resync": field_paths(ResyncResult),
    "resync (several VMs, --all)": MANY,
    "checkpoint": {"results"} | field_paths(CheckpointResult, "results[]."),
    "points": field_paths(PointsReport),
    "failover": field_paths(FailoverResult),
    "failover --test": field_paths(DrillResult),
    "failover --test --cleanup": field_paths(DrillCleanup),
    "failover --rollback": field_paths(RolledBack),
    "inventory export": field_paths(ExportResult),
}


def documented() -> dict[str, set[str]]:
    """Per `### section` of docs/json.md: the backquoted names before a bullet's colon (values sit in parentheses)."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            current = sections.setdefault(line[4:].strip(), set())
        elif current is not None and line.startswith("- "):
            head = re.sub(r"\([^)]*\)", "", line[2:]).split(":", 1)[0]
            current |= set(re.findall(r"`([^`]+)`", head))
    return sections


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_docs_list_exactly_the_fields_of_each_command(command: str) -> None:
    docs = documented()
    assert command in docs, f"docs/json.md has no section for {command}"
    assert docs[command] == EXPECTED[command], (
        f"only in the code: {sorted(EXPECTED[command] - docs[command])}; "
        f"only in the docs: {sorted(docs[command] - EXPECTED[command])}"
    )


def test_a_dry_run_has_no_rto_and_absent_texts_are_null() -> None:
    _world, reach, inv = protected_world()
    checkpoint.checkpoint(inv, reach, ["web"])
    dry = to_jsonable(failover.failover(inv, reach, "web", dry_run=True))
    assert dry["dry_run"] is True and dry["run_state"] == "not started"
    assert dry["rto_seconds"] is None and dry["rpo_seconds"] is None and dry["rto_guest_seconds"] is None
    assert dry["plan"]["steps"] and dry["plan"]["start_reason"] is None
    assert "" not in (dry["rpo_reason"], dry["rto_guest_reason"], dry["start_reason"])


def test_status_and_checkpoint_in_json_use_machine_values_and_null() -> None:
    world, reach, inv = protected_world()
    [taken] = to_jsonable(checkpoint.checkpoint(inv, reach, ["web"]))["results"]
    assert taken["error"] is None and taken["quiesced_seconds"] > 0 and taken["point"]["tested_at"] is None
    [vm] = to_jsonable(status.vm_status(inv, reach, ["web"]))["vms"]
    assert vm["protection"] == "in-sync" and vm["state"] == "protected"
    assert vm["error"] is None and vm["reason"] is None and vm["drill"] is None
    assert [d["protected"] for d in vm["disks"]] == [True]
    unprotected = dataclasses.replace(world.manifest, state=Protection.UNPROTECTED)  # as unprotect leaves it
    world.files[str(REPLICAS / "manifest.json")] = unprotected.to_json()
    [vm] = to_jsonable(status.vm_status(inv, reach, ["web"]))["vms"]
    assert vm["protection"] == "unprotected" and vm["state"] == "unprotected"
    assert [d["protected"] for d in vm["disks"]] == [False] and [d["lag_bytes"] for d in vm["disks"]] == [None]
    skipped = to_jsonable(checkpoint.checkpoint(inv, reach, all_vms=True))["results"][0]
    assert skipped["point"] is None and skipped["quiesced_seconds"] is None
