"""Points and retention on a failed-over VM's own chain, taken by its QEMU on the DR host (dr_points.py).

The fake world (world.py) gains what the DR copy's QEMU does with points: a
snapshot transaction moves its top to a new overlay, block-commit merges an
intermediate image, and each image knows its backing file, as qemu-img reads it.
The guest on the DR copy writes a record on every command sent to its monitor.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

import pytest

from drtool.errors import DrtoolError, QmpError, Refused
from drtool.mechanics import pausing, replication
from drtool.mechanics.dr_points import DRAINED, dr_copy_transaction
from drtool.mechanics.dr_target import TargetLayout
from drtool.mechanics.migration import reverse_bitmap_on
from drtool.mechanics.points import prepare_point
from drtool.services import checkpoint, failover
from drtool.services.failover import planned
from drtool.services.failover.rollback import rollback
from drtool.services.recover.failback import forward_manifest
from drtool.services.recover.reprotect import point_below_tops
from drtool.services.status import problems, vm_status
from drtool.state.protection import Health, Protection
from drtool.state.records import FailoverKind
from drtool.transport.qmp import EventSubscription

from .world import PIDS, REPLICAS, Killed, World, WorldQmp, WorldReach, protected_world

DR_COPY_PID = PIDS[("qemu-system", str(REPLICAS / "vm" / "qemu.pid"))]


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "QUIET", 0.0)
    monkeypatch.setattr(pausing, "DRAIN_TIMEOUT", 0.2)
    monkeypatch.setattr(planned, "SOURCE_QUIT_TIMEOUT", 0.5)


@dataclass
class ChainWorld(World):
    backing: dict[str, str] = field(default_factory=dict)  # image -> its backing file
    bitmaps: dict[str, list[str]] = field(default_factory=dict)  # image -> persistent bitmaps on its node
    dr_faults: dict[str, str] = field(default_factory=dict)  # DR copy command -> "kill-after" (one shot)
    dr_transactions: list[list[dict[str, Any]]] = field(default_factory=list)
    commits: int = 0
    subscriptions: list[EventSubscription] = field(default_factory=list)

    def dr_writes(self) -> None:
        if self.dr_vm is not None and self.dr_vm_status == "running":
            self.images[self.dr_vm] = self.images.get(self.dr_vm, 0) + 1

    def chain(self, top: str) -> list[str]:
        out = [top]
        while out[-1] in self.backing:
            out.append(self.backing[out[-1]])
        return out[::-1]

    def target_qmp(self, command: str, args: dict[str, Any]) -> Any:
        old = self.active_top
        answer = super().target_qmp(command, args)
        if command == "transaction":
            self.backing[self.active_top] = old
        return answer

    def dr_vm_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if self.dr_vm is None:
            return super().dr_vm_qmp(command, args)
        self.dr_writes()
        fault = self.dr_faults.pop(command, None)
        if command == "query-named-block-nodes":
            return [{"node-name": f"n-{image}", "drv": "qcow2", "file": image,
                     "dirty-bitmaps": [{"name": b, "persistent": True, "granularity": 65536}
                                       for b in self.bitmaps.get(image, [])]}
                    for image in self.chain(self.dr_vm)]
        if command == "transaction":
            self.dr_transactions.append(args["actions"])
            for action in args["actions"]:
                data = action["data"]
                if action["type"] == "blockdev-snapshot-sync":
                    old, new = data["node-name"].removeprefix("n-"), data["snapshot-file"]
                    self.frozen.add(old)
                    self.images[new], self.backing[new] = self.images[old], old
                    self.bitmaps[new] = self.bitmaps.pop(old, [])  # add, merge, remove: carried up
                    self.dr_vm = new
            if fault == "kill-after":
                self.killed = True
                raise Killed()
            return {}
        if command == "query-block-jobs":
            return []
        if command == "query-block":
            return [{"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
                     "inserted": {"node-name": f"n-{self.dr_vm}", "drv": "qcow2", "file": self.dr_vm,
                                  "image": {"virtual-size": 1 << 26, "filename": self.dr_vm}}}]
        if command == "block-commit":
            top, base = args["top-node"].removeprefix("n-"), args["base-node"].removeprefix("n-")
            above = next(i for i, b in self.backing.items() if b == top)
            self.images[base] = self.images[top]
            self.backing[above] = base
            del self.backing[top]
            self.commits += 1
            for events in self.subscriptions:
                events._put({"event": "BLOCK_JOB_COMPLETED", "data": {"device": args["job-id"]}})
            return {}
        return super().dr_vm_qmp(command, args)

    def dr_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[0] == "qemu-img" and argv[1] == "info" and "--backing-chain" in argv:
            return 0, json.dumps([{"filename": f} for f in reversed(self.chain(argv[-1]))]), ""
        if argv[0] == "readlink":
            return 0, "".join(p + "\n" for p in argv[argv.index("--") + 1:]), ""
        if argv[0] == "du":
            return 0, "", ""
        if argv[0] == "rm":
            for path in argv[argv.index("--") + 1:]:
                self.images.pop(path, None)
        return super().dr_run(argv, stdin)

    def _dr_script(self, script: str, args: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if "/proc/" in script and "fd" in script:  # the witness's open files
            open_files = self.chain(self.dr_vm) if self.dr_vm and args[0] == str(DR_COPY_PID) else []
            return 0, "".join(f + "\n" for f in open_files), ""
        return super()._dr_script(script, args, stdin)


class ChainQmp(WorldQmp):
    world: ChainWorld

    @contextlib.contextmanager
    def subscribe(self, names: Iterable[str] = ()) -> Iterator[EventSubscription]:
        events = EventSubscription()
        self.world.subscriptions.append(events)
        try:
            yield events
        finally:
            self.world.subscriptions.remove(events)


class ChainReach(WorldReach):
    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> WorldQmp:
        session = super().qmp_at(host_name, socket_path, label)
        return ChainQmp(self.world, session.handler)


def failed_over() -> tuple[ChainWorld, WorldReach, Any]:
    """A VM failed over (planned, cold) with a point taken before; its DR copy runs and writes."""
    world, reach, inv = protected_world()
    chain_world = ChainWorld(**{f: getattr(world, f) for f in World.__dataclass_fields__})
    reach = ChainReach(chain_world)
    checkpoint.checkpoint(inv, reach, ["web"])
    failover.failover(inv, reach, "web")
    assert chain_world.manifest.state is Protection.FAILED_OVER and chain_world.dr_vm_status == "running"
    return chain_world, reach, inv


def test_a_checkpoint_after_a_planned_failover_is_taken_by_the_dr_copy_and_moves_its_top() -> None:
    world, reach, inv = failed_over()
    before = world.manifest
    old_top = before.disks[0].replica_image
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.error is None and result.point is not None
    after = world.manifest
    assert result.point.quiesce == DRAINED and result.point.images == {"vd0": old_top}
    assert after.disks[0].replica_image == world.dr_vm != old_top  # the manifest follows the DR copy
    kept = after.points[-1].images["vd0"]  # re-pointed to the image its view was merged into
    assert world.images[kept] > world.written  # what the DR copy wrote before the point is in it
    assert after.pending_point is None and after.state is Protection.FAILED_OVER
    assert "transaction" in world.log and world.target_running is False  # no replication target was needed
    # retention (one point an hour kept) let the older points go: merged through the DR copy's QEMU
    assert len(result.deleted) == 2 and world.commits == 1  # the two older, one run of images: one commit
    assert [p.id for p in after.points] == [result.point.id]
    assert world.chain(world.dr_vm) == [kept, world.dr_vm]  # every other image merged and removed


def test_points_lists_and_keeps_points_taken_on_the_dr_copy() -> None:
    world, reach, inv = failed_over()
    [taken] = checkpoint.checkpoint(inv, reach, ["web"], keep=True).results
    assert taken.point is not None and taken.point.kept
    listed = checkpoint.list_points(inv, reach, "web")
    assert taken.point.id in [p.id for p in listed.points]
    checkpoint.keep_point(inv, reach, "web", taken.point.id, kept=False)
    assert not world.manifest.point(taken.point.id).kept


def test_checkpoint_all_includes_a_failed_over_vm() -> None:
    _, reach, inv = failed_over()
    [result] = checkpoint.checkpoint(inv, reach, all_vms=True).results
    assert result.point is not None and result.error is None


def test_killed_between_the_recorded_pending_point_and_the_transaction_the_next_run_drops_it() -> None:
    world, reach, inv = failed_over()
    world.kill_after_save(lambda raw: bool(raw.get("pending_point")))
    with pytest.raises(Killed):
        checkpoint.checkpoint(inv, reach, ["web"])
    world.revive()
    pending = world.manifest.pending_point
    assert pending is not None and not world.dr_transactions
    top = world.dr_vm
    time.sleep(0.002)  # point ids are stamped to the millisecond
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results  # settles (dropped), then a point of its own
    assert result.point is not None and result.point.id != pending.point.id
    assert world.manifest.point(pending.point.id) is None and world.manifest.pending_point is None
    assert result.point.images["vd0"] == top and world.manifest.disks[0].replica_image == world.dr_vm


def test_killed_after_the_transaction_the_next_run_adopts_the_point_from_the_dr_copys_open_files() -> None:
    world, reach, inv = failed_over()
    world.dr_faults["transaction"] = "kill-after"
    with pytest.raises(Killed):
        checkpoint.checkpoint(inv, reach, ["web"])
    world.revive()
    pending = world.manifest.pending_point
    assert pending is not None and world.dr_vm == pending.tops["vd0"]  # it happened; drtool died before saving
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.point is not None
    ids = [p.id for p in world.manifest.points]
    assert pending.point.id in ids or pending.point.id in result.deleted  # adopted (then retention may merge it)
    assert world.manifest.disks[0].replica_image == world.dr_vm
    assert world.chain(world.dr_vm)[-2] == world.manifest.points[-1].images["vd0"]


def test_a_refused_transaction_leaves_no_pending_point_and_no_file() -> None:
    world, reach, inv = failed_over()
    real = world.dr_vm_qmp

    def refusing(command: str, args: dict[str, Any]) -> Any:
        if command == "transaction":
            world.images["left-behind"] = 0
            raise QmpError(command, "GenericError", "Could not create file")
        return real(command, args)

    world.dr_vm_qmp = refusing  # type: ignore[method-assign]
    points = world.manifest.points
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.point is None and "Could not create file" in str(result.error)
    assert world.manifest.pending_point is None and world.manifest.points == points


def test_unplanned_and_reprotected_vms_are_refused_with_one_line_and_skipped_by_all() -> None:
    world, reach, inv = failed_over()
    record = world.manifest.failover
    assert record is not None
    world.files[str(REPLICAS / "manifest.json")] = replace(
        world.manifest, failover=replace(record, kind=FailoverKind.UNPLANNED)).to_json()
    [refused] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert refused.point is None and refused.exit_code == 4 and "abandoned timeline" in str(refused.error)
    [skipped] = checkpoint.checkpoint(inv, reach, all_vms=True).results
    assert skipped.exit_code == 0 and str(skipped.error).endswith(": skipped")
    world.files[str(REPLICAS / "manifest.json")] = replace(
        world.manifest, state=Protection.REPROTECTED, failover=record).to_json()
    [refused] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert refused.exit_code == 4 and "reverse mirrors" in str(refused.error)


def test_rollback_refuses_once_points_were_taken_on_the_dr_copy() -> None:
    world, reach, inv = failed_over()
    checkpoint.checkpoint(inv, reach, ["web"])
    with pytest.raises(Refused, match="points taken on its DR copy"):
        rollback(inv, reach, "web", force=True)
    assert world.manifest.state is Protection.FAILED_OVER


def test_reprotect_rewinds_to_the_point_right_below_the_tops() -> None:
    world, reach, inv = failed_over()
    final = world.manifest.failover.point if world.manifest.failover else None
    assert point_below_tops(world.manifest) == final
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.point is not None and point_below_tops(world.manifest) == result.point.id


def test_the_transaction_carries_persistent_bitmaps_to_the_new_top() -> None:
    world, reach, inv = failed_over()
    world.bitmaps[world.dr_vm] = ["drtool-reverse-1"]
    checkpoint.checkpoint(inv, reach, ["web"])
    [actions] = world.dr_transactions
    kinds = [a["type"] for a in actions]
    assert kinds == ["blockdev-snapshot-sync", "block-dirty-bitmap-add", "block-dirty-bitmap-merge",
                     "block-dirty-bitmap-remove"]
    new_node = actions[0]["data"]["snapshot-node-name"]
    assert actions[1]["data"] == {"node": new_node, "name": "drtool-reverse-1", "persistent": True,
                                  "granularity": 65536}
    with WorldQmp(world, world.dr_vm_qmp) as qmp:
        assert reverse_bitmap_on(qmp, [f"n-{world.dr_vm}"]) == "drtool-reverse-1"


def test_the_transaction_names_a_disk_the_dr_copy_lacks() -> None:
    world, _, _ = failed_over()
    pending = replace(world.manifest, disks=(replace(world.manifest.disks[0], replica_image="/dr/web/gone.qcow2"),))
    with WorldQmp(world, world.dr_vm_qmp) as qmp, pytest.raises(DrtoolError, match="no node for /dr/web/gone"):
        dr_copy_transaction(qmp, prepare_point(pending, TargetLayout(REPLICAS), DRAINED, 0))


def test_failback_keeps_the_points_taken_on_the_dr_copy_and_the_tops_they_moved_to() -> None:
    world, reach, inv = failed_over()
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.point is not None
    home, dropped = forward_manifest(world.manifest, REPLICAS)  # what the target restarts on, cold or live
    assert dropped == () and home.points == world.manifest.points
    assert home.disks[0].replica_image == world.dr_vm  # the top the DR copy ran on, above the new point


def test_status_shows_the_dr_copys_points_without_calling_them_a_problem() -> None:
    world, reach, inv = failed_over()
    checkpoint.checkpoint(inv, reach, ["web"])
    report = vm_status(inv, reach)
    [vm] = report.vms
    assert vm.protection is Health.FAILED_OVER and vm.run_state == "running" and vm.error is None
    assert vm.newest_point_age is not None and vm.newest_point_age < 60
    assert [d.image for d in vm.disks] == [world.manifest.disks[0].replica_image]
    assert problems(report) == []
