"""The manifest on disk: format 1 still loads, writes are verified, a damaged one gives way to the last good one.

LocalShell runs drtool's real remote scripts with this machine's sh (a
RemoteShell on localhost); CutShell is one whose channel closes mid-write,
which `cat` reads as an early EOF and exits 0 on.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import pytest

from drtool.cli.output import to_jsonable
from drtool.domain import Vm
from drtool.errors import RemoteCommandError
from drtool.mechanics.remote import write_file
from drtool.state.manifest import FORMAT_VERSION, Manifest, ManifestError, ReplicaDisk
from drtool.state.protection import ALLOWED, Protection, allowed
from drtool.state.records import FailoverKind, PendingPoint, Step
from drtool.state.store import load_manifest, save_manifest
from drtool.transport.ssh import CommandResult


@dataclass
class LocalShell:
    host_key: str | None = None
    cut_after: int | None = None  # bytes of stdin that arrive before the channel closes

    def run(self, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> CommandResult:
        data = stdin if stdin is None or self.cut_after is None else stdin[: self.cut_after]
        done = subprocess.run(argv, input=data or b"", capture_output=True, timeout=timeout)
        result = CommandResult(tuple(argv), done.returncode, done.stdout, done.stderr)
        if check and not result.ok:
            raise RemoteCommandError(f"{argv[0]} exited {done.returncode}: {done.stderr.decode().strip()}")
        return result


DISK = ReplicaDisk("vd0", "vd0-fmt", "qcow2", 1 << 26, "/srv/vd0.qcow2", "/dr/web/vd0.qcow2", "vd0")

FORMAT_1 = {  # as drtool wrote it before typed records: a planned failover killed after two steps
    "vm": "web", "source_host": "kvm1", "dr_host": "kvm2", "mode": "async", "transport": "tls-psk",
    "nbd_address": "10.0.0.2", "nbd_port": 10809, "disks": [DISK.__dict__],
    "hardware": {"argv": ["qemu-system-x86_64"]}, "state": "failing-over",
    "created_at": "2026-11-26T10:00:00+00:00", "updated_at": "2026-11-26T10:05:00+00:00",
    "history": [{"time": "2026-11-26T10:05:00+00:00", "state": "failing-over", "note": "planned failover started"}],
    "points": [{"id": "p1", "time": "2026-11-26T10:04:00+00:00", "quiesce": "final", "quiesce_seconds": 0.2,
                "images": {"vd0": "/dr/web/vd0.qcow2"}, "tested_at": None}],
    "pending_point": {"point": {"id": "p2", "time": "t", "quiesce": "paused", "quiesce_seconds": 0.0,
                                "images": {"vd0": "/dr/web/vd0.after-p1.qcow2"}},
                      "tops": {"vd0": "/dr/web/vd0.after-p2.qcow2"}},
    "failover": {"kind": "planned", "started_at": "t", "steps": ["source-paused", "final-point"], "point": "p1",
                 "source_was": "running", "step_seconds": {"source-paused": 0.1}},
    "drill": {},
    "version": 1,
}


def vm_in(tmp_path: Path) -> Vm:
    return Vm("web", "kvm1", PurePosixPath("/run/web.qmp"), "kvm2", PurePosixPath(str(tmp_path)))


def test_a_format_1_manifest_loads_into_typed_records_and_is_written_back_as_format_2(tmp_path: Path) -> None:
    manifest = Manifest.from_json(json.dumps(FORMAT_1).encode(), "old")
    assert manifest.state is Protection.FAILING_OVER
    assert manifest.failover is not None and manifest.failover.kind is FailoverKind.PLANNED
    assert manifest.failover.steps == (Step.SOURCE_PAUSED, Step.FINAL_POINT) and manifest.failover.point == "p1"
    assert manifest.drill is None
    assert isinstance(manifest.pending_point, PendingPoint) and manifest.pending_point.point.id == "p2"
    again = json.loads(manifest.to_json())
    assert again["version"] == FORMAT_VERSION == 2 and again["state"] == "failing-over"
    assert again["failover"]["steps"] == ["source-paused", "final-point"] and again["drill"] is None
    assert Manifest.from_json(manifest.to_json(), "new") == replace(manifest, version=FORMAT_VERSION)


def _newer(version: int, minor: int) -> dict:
    newer = json.loads(Manifest.from_json(json.dumps(FORMAT_1).encode(), "old").to_json())
    newer |= {"version": version, "minor": minor, "replication_network": {"mtu": 9000}}
    newer["disks"][0]["discard"] = "unmap"
    newer["points"][0]["label"] = "before upgrade"
    newer["failover"]["operator"] = "ops@site"
    newer["pending_point"]["point"]["label"] = "pending"
    return newer


def test_a_newer_minor_format_loads_and_its_unknown_fields_are_written_back(tmp_path: Path) -> None:
    newer = _newer(FORMAT_VERSION, 3)
    manifest = Manifest.from_json(json.dumps(newer).encode(), "newer")
    assert manifest.points[0].id == "p1" and manifest.disks[0].device == "vd0"
    changed = manifest.transition(Protection.FAILED_OVER, "done")  # this drtool changes what it knows
    again = json.loads(changed.to_json())
    assert again["state"] == "failed-over" and (again["version"], again["minor"]) == (FORMAT_VERSION, 3)
    assert again["replication_network"] == {"mtu": 9000} and again["disks"][0]["discard"] == "unmap"
    assert again["points"][0]["label"] == "before upgrade" and again["failover"]["operator"] == "ops@site"
    assert again["pending_point"]["point"]["label"] == "pending"
    assert "unknown_fields" not in json.dumps(again)
    assert "unknown_fields" not in to_jsonable(manifest.points[0])  # --json shows what the docs list
    vm = vm_in(tmp_path)  # and through the store, as on a DR host
    save_manifest(LocalShell(), vm, changed)
    stored = load_manifest(LocalShell(), vm)
    assert stored is not None and json.loads(stored.to_json())["points"][0]["label"] == "before upgrade"


def test_this_drtools_own_manifest_has_no_minor_field_earlier_drtools_would_refuse() -> None:
    assert "minor" not in json.loads(Manifest.from_json(json.dumps(FORMAT_1).encode(), "old").to_json())


def test_a_newer_major_format_is_refused_with_what_to_do() -> None:
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(json.dumps(_newer(FORMAT_VERSION + 1, 0)).encode(), "kvm2:/dr/web/manifest.json")
    message = err.value.message
    assert "kvm2:/dr/web/manifest.json was written by a newer drtool in format 3" in message
    assert f"reads format {FORMAT_VERSION} and older" in message and "upgrade drtool" in (err.value.hint or "")


def test_transitions_follow_the_table_and_staying_put_is_allowed() -> None:
    assert allowed(Protection.PROTECTED, Protection.FAILING_OVER)
    assert not allowed(Protection.UNPROTECTED, Protection.PROTECTED)
    assert not allowed(Protection.FAILED_OVER, Protection.FAILING_OVER)
    assert all(allowed(s, s) for s in Protection)
    assert set(ALLOWED) == set(Protection)


def test_defect7_a_write_cut_short_keeps_the_previous_manifest(tmp_path: Path) -> None:
    vm = vm_in(tmp_path)
    first = Manifest("web", "kvm1", "kvm2", "async", "plain", "10.0.0.2", 10809, (DISK,), state=Protection.PROTECTED)
    save_manifest(LocalShell(), vm, first)
    second = first.transition(Protection.RESYNCING, "resync started")
    with pytest.raises(RemoteCommandError, match="left as it was"):
        save_manifest(LocalShell(cut_after=100), vm, second)  # the channel closes after 100 bytes
    assert load_manifest(LocalShell(), vm) == first
    assert not list(tmp_path.glob("*.tmp.*")), "the partial temp file stays behind"


def test_defect7_a_damaged_manifest_gives_way_to_the_last_good_one(tmp_path: Path) -> None:
    vm = vm_in(tmp_path)
    first = Manifest("web", "kvm1", "kvm2", "async", "plain", "10.0.0.2", 10809, (DISK,), state=Protection.PROTECTED)
    save_manifest(LocalShell(), vm, first)
    second = first.transition(Protection.RESYNCING)
    save_manifest(LocalShell(), vm, second)
    assert (tmp_path / "manifest.json.prev").read_bytes() == first.to_json()
    assert load_manifest(LocalShell(), vm) == second
    (tmp_path / "manifest.json").write_bytes(second.to_json()[:80])  # truncated by some other means
    assert load_manifest(LocalShell(), vm) == first


def test_write_file_replaces_whole_files_and_checks_what_arrived(tmp_path: Path) -> None:
    path = PurePosixPath(str(tmp_path / "f"))
    write_file(LocalShell(), path, b"x" * 5000)
    assert Path(path).read_bytes() == b"x" * 5000 and oct(Path(path).stat().st_mode & 0o777) == "0o600"
    with pytest.raises(RemoteCommandError):
        write_file(LocalShell(cut_after=0), path, b"y" * 10)
    assert Path(path).read_bytes() == b"x" * 5000
