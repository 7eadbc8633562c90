"""A disk added to a protected VM (defect 6): its DR command line, and points taken before it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import PurePosixPath

import pytest

from drtool.errors import Refused
from drtool.mechanics.added_disks import ADDED, seeding_disks
from drtool.mechanics.dr_vm import RunLayout, map_recorded
from drtool.mechanics.points import missing_disks
from drtool.services import checkpoint, drill, failover
from drtool.state.manifest import ReplicaDisk
from drtool.state.store import save_manifest

from .world import HARDWARE_ARGV, QMP_SOCKET, REPLICAS, SOURCE_IMAGE, protected_world

ADDED_IMAGE = "/srv/web-vd1.qcow2"
ADDED_ENTRY = {"device": "vd1", "driver": "virtio-blk-pci", "node": "vd1-fmt", "format": "qcow2",
               "image": ADDED_IMAGE, "seeding": False}
LAYOUT = RunLayout(PurePosixPath("/dr/web/vm"))
HARDWARE = {"argv": HARDWARE_ARGV, "qmp_socket": str(QMP_SOCKET), ADDED: [ADDED_ENTRY]}


def test_a_hot_added_disk_is_started_with_its_device_on_the_dr_side() -> None:
    disks = {SOURCE_IMAGE: "/dr/web/vd0.qcow2", ADDED_IMAGE: "/dr/web/vd1.qcow2"}
    argv = map_recorded(HARDWARE, disks, LAYOUT, str(QMP_SOCKET)).argv
    blockdev = argv[argv.index("-device", argv.index('{"driver": "qcow2", "node-name": "vd1-fmt", "file": '
                                                     '{"driver": "file", "filename": "/dr/web/vd1.qcow2"}}')) + 1]
    assert blockdev == "virtio-blk-pci,drive=vd1-fmt,id=vd1"
    assert not any(ADDED_IMAGE in a or SOURCE_IMAGE in a for a in argv)


def test_a_copy_started_without_the_added_disk_has_no_device_for_it() -> None:
    argv = map_recorded(HARDWARE, {SOURCE_IMAGE: "/dr/web/vd0.qcow2"}, LAYOUT, str(QMP_SOCKET)).argv
    assert not any("vd1" in a for a in argv)


def test_a_vm_restarted_with_the_disk_on_its_command_line_gets_it_once_and_can_start_without_it() -> None:
    argv = [*HARDWARE_ARGV, "-blockdev", f"driver=qcow2,node-name=vd1-fmt,file.driver=file,file.filename={ADDED_IMAGE}",
            "-device", "virtio-blk-pci,drive=vd1-fmt,id=vd1"]
    hardware = HARDWARE | {"argv": argv}
    disks = {SOURCE_IMAGE: "/dr/web/vd0.qcow2", ADDED_IMAGE: "/dr/web/vd1.qcow2"}
    mapped = map_recorded(hardware, disks, LAYOUT, str(QMP_SOCKET)).argv
    assert sum("id=vd1" in a for a in mapped) == 1
    without = map_recorded(hardware, {SOURCE_IMAGE: "/dr/web/vd0.qcow2"}, LAYOUT, str(QMP_SOCKET),
                           leave_out=(ADDED_IMAGE,))
    assert not any("vd1" in a for a in without.argv)
    assert any("before it was protected" in change for change in without.changes)


def _with_added_disk(world, reach, inv) -> str:
    """A point of vd0 alone, then vd1 added to the protection as protect does; the point's id."""
    checkpoint.checkpoint(inv, reach, ["web"])
    manifest = world.manifest
    disk = ReplicaDisk("vd1", "vd1-fmt", "qcow2", 1 << 25, ADDED_IMAGE, str(REPLICAS / "vd1.qcow2"), "vd1")
    save_manifest(reach.shell("kvm2"), inv.vm("web"),
                  replace(manifest, disks=(*manifest.disks, disk), hardware=manifest.hardware | {ADDED: [ADDED_ENTRY]}))
    return manifest.points[-1].id


def test_an_unplanned_failover_never_starts_silently_from_a_point_without_an_added_disk() -> None:
    world, reach, inv = protected_world()
    old = _with_added_disk(world, reach, inv)
    assert missing_disks(world.manifest, world.manifest.points[-1]) == ("vd1",)
    world.source_alive = world.source_host_up = False
    with pytest.raises(Refused, match="before disk vd1 was protected") as refused:
        failover.failover(inv, reach, "web", force=True)
    assert f"--point {old}" in (refused.value.hint or "")
    assert world.dr_vm is None and not world.manifest.state.failing_over, "nothing may change before it is refused"
    dry = failover.failover(inv, reach, "web", force=True, point_id=old, dry_run=True)
    assert dry.plan is not None and any("WITHOUT disk(s) vd1" in w for w in dry.plan.warnings)
    result = failover.failover(inv, reach, "web", force=True, point_id=old)
    assert result.point == old and "WITHOUT vd1" in (result.start_reason or "")
    assert world.dr_vm is not None and world.dr_vm_status == "running"


def test_a_drill_of_a_point_without_an_added_disk_is_refused() -> None:
    world, reach, inv = protected_world()
    old = _with_added_disk(world, reach, inv)
    with pytest.raises(Refused, match="before disk vd1 was protected"):
        drill.test_failover(inv, reach, "web", old)
    assert world.drill_vm is None and world.manifest.drill is None


def test_only_added_disks_whose_first_copy_was_not_seen_through_are_finished_by_protect() -> None:
    world, reach, inv = protected_world()
    _with_added_disk(world, reach, inv)
    assert seeding_disks(world.manifest) == []
    seeding = replace(world.manifest, hardware=world.manifest.hardware | {ADDED: [ADDED_ENTRY | {"seeding": True}]})
    assert seeding_disks(seeding) == [1]


def test_a_rollback_relaunches_the_source_with_its_hot_added_disk() -> None:
    from drtool.services.failover.rollback import _relaunch_argv

    world, reach, inv = protected_world()
    _with_added_disk(world, reach, inv)
    argv = _relaunch_argv(world.manifest)
    assert f'"filename": "{ADDED_IMAGE}"' in " ".join(argv) and "virtio-blk-pci,drive=vd1-fmt,id=vd1" in argv
    assert argv[-2:] == ["-S", "-daemonize"]
