"""`drtool failover --live` in the fake world: uninterrupted, killed at every step, refused, rolled back.

Whatever happens: never two running copies, and when the VM ends on the DR
host, it has every record the guest wrote at the source.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from drtool.errors import DrtoolError, Refused
from drtool.services import failover
from drtool.services.failover import live
from drtool.services.status import vm_status
from drtool.state.ages import ROLLBACK_FORCE_AFTER
from drtool.state.protection import Health, Protection
from drtool.state.records import LIVE_STEPS, FailoverKind, Step

from .live_world import LiveWorld, protected_live_world
from .world import REPLICAS, Killed


@pytest.fixture(autouse=True)
def catch_up(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """resync's catch-up after an undo (the lab test runs the real one): mirrors again, calls counted."""
    calls: list[str] = []

    def fake(inventory: Any, reach: Any, name: str) -> str:
        world = reach.world
        assert world.source_status == "running" and world.target_running, "catch-up before the undo finished"
        world.jobs, world.jobs_broken = True, False
        calls.append(name)
        return "replication caught up (bitmap: 64 KiB sent)"

    monkeypatch.setattr(live, "catch_up_replication", fake)
    monkeypatch.setattr(live, "SOURCE_QUIT_TIMEOUT", 0.5)
    return calls


def assert_live_on_dr_with_every_write(world: LiveWorld) -> None:
    assert world.manifest.state is Protection.FAILED_OVER
    assert not world.source_alive, "the source still runs: two copies"
    assert world.dr_vm_status == "running" and world.running_copies() == 1
    assert world.dr_sees() == world.written, f"the DR copy lacks {world.written - world.dr_sees()} records"
    assert not world.target_running and not world.link_up


def assert_back_at_source(world: LiveWorld) -> None:
    assert world.manifest.state is Protection.PROTECTED and world.manifest.failover is None
    assert world.source_status == "running" and world.dr_vm is None and world.running_copies() == 1
    assert world.target_running


def test_live_failover_uninterrupted_moves_the_running_vm_with_every_write() -> None:
    world, reach, inv = protected_live_world()
    result = failover.live_failover(inv, reach, "web")
    assert (result.kind, result.rpo_seconds, result.run_state) == ("live", 0.0, "running")
    assert result.live is not None and result.live.ram_bytes == 123 << 20 and result.live.qemu_downtime_seconds
    assert_live_on_dr_with_every_write(world)
    record = world.manifest.failover
    assert record is not None and record.kind is FailoverKind.LIVE and record.steps == LIVE_STEPS
    # the order that keeps the replicas whole: mirrors complete, then the target stops, then the switch
    log = world.log
    assert log.index("block-job-cancel") < log.index("source migrate-continue") < log.index("dest cont")
    assert log.index("source migrate") < log.index("block-job-cancel")
    # reverse protection: a persistent bitmap was on the disk before the DR copy ran, and it is recorded
    assert world.bitmaps_at_cont and record.migration is not None
    assert record.migration["reverse_bitmap"] == world.bitmaps_at_cont[0]


def test_status_after_a_live_failover_says_the_vm_moved_without_a_reboot() -> None:
    world, reach, inv = protected_live_world()
    failover.live_failover(inv, reach, "web")
    [vm] = vm_status(inv, reach, ["web"]).vms
    assert vm.protection is Health.FAILED_OVER and "(live, without a reboot)" in (vm.reason or ""), vm.reason


@pytest.mark.parametrize("step", LIVE_STEPS)
def test_killed_after_each_step_is_recorded_a_rerun_ends_with_one_copy_and_every_write(step: Step,
                                                                                      catch_up: list[str]) -> None:
    world, reach, inv = protected_live_world()
    world.kill_after_save(lambda raw: bool(raw.get("failover")) and step.value in raw["failover"]["steps"])
    with pytest.raises(Killed):
        failover.live_failover(inv, reach, "web")
    world.revive()
    assert world.running_copies() <= 1
    world.tick()
    result = failover.live_failover(inv, reach, "web")
    assert_live_on_dr_with_every_write(world)
    undone = step in (Step.DESTINATION_STARTED, Step.MIGRATION_STARTED)
    assert any("undone" in n for n in result.notes) == undone, result.notes


@pytest.mark.parametrize(("where", "command", "undone"), [
    ("source", "migrate", True),  # the destination listens, nothing sent
    ("source", "block-job-cancel", True),  # inside the pause, the mirrors still running
    ("source", "migrate-continue", True),  # inside the pause, the mirrors completed and the target stopped
    ("dest", "cont", False),  # switched over: the destination has everything
])
def test_killed_inside_the_move_a_rerun_undoes_before_the_switch_and_finishes_after(
        where: str, command: str, undone: bool, catch_up: list[str]) -> None:
    world, reach, inv = protected_live_world()
    (world.qmp_faults if where == "source" else world.dest_faults)[command] = "kill"
    with pytest.raises(Killed):
        failover.live_failover(inv, reach, "web")
    world.revive()
    assert world.running_copies() == (1 if command == "migrate" else 0)  # else paused at the switch
    result = failover.live_failover(inv, reach, "web")
    assert_live_on_dr_with_every_write(world)
    assert any("undone" in n for n in result.notes) == undone and bool(catch_up) == undone
    record = world.manifest.failover
    assert record is not None and record.migration is not None
    assert world.bitmaps_at_cont and record.migration["reverse_bitmap"] in world.bitmaps_at_cont
    if undone:
        assert any("caught up" in n for n in result.notes)


@pytest.mark.parametrize("command", ["migrate", "block-job-cancel", "migrate-continue"])
def test_rollback_before_the_switch_gives_the_source_back_running_and_replicated(command: str) -> None:
    world, reach, inv = protected_live_world()
    world.qmp_faults[command] = "kill"
    with pytest.raises(Killed):
        failover.live_failover(inv, reach, "web")
    world.revive()
    result = failover.rollback(inv, reach, "web")
    assert result.source_state == "running" and "migration-started" in result.undone
    assert_back_at_source(world)
    assert world.images[world.manifest.disks[0].replica_image] <= world.written


def test_rollback_refused_once_the_destination_runs() -> None:
    world, reach, inv = protected_live_world()
    world.kill_after_save(lambda raw: bool(raw.get("failover")) and "dr-started" in raw["failover"]["steps"])
    with pytest.raises(Killed):
        failover.live_failover(inv, reach, "web")
    world.revive()
    with pytest.raises(Refused, match="already runs on kvm2") as err:
        failover.rollback(inv, reach, "web")
    # dr-started is written with source-stopped (one write once the destination runs): the record says the
    # failover is done, so the way out is home
    assert err.value.hint == ("bring it home without a reboot: drtool recover web --reprotect, "
                              "then drtool recover web --failback --live")
    assert world.dr_vm_status == "running" and world.running_copies() == 1


@pytest.mark.parametrize("force", [False, True])
def test_rollback_of_a_live_failover_done_long_ago_is_refused_before_any_force_question(force: bool) -> None:
    """The refusal comes first: no plan, no "add --force" for a rollback that would be refused anyway."""
    world, reach, inv = protected_live_world()
    failover.live_failover(inv, reach, "web")
    long_ago = (datetime.now(UTC) - timedelta(seconds=ROLLBACK_FORCE_AFTER + 3600)).isoformat(timespec="seconds")
    done = world.manifest
    assert done.failover is not None
    world.files[str(REPLICAS / "manifest.json")] = replace(
        done, failover=replace(done.failover, finished_at=long_ago)).to_json()
    asked: list[object] = []
    with pytest.raises(Refused, match="web already runs on kvm2 after its live failover") as err:
        failover.rollback(inv, reach, "web", force=force, confirm=lambda plan: not asked.append(plan))
    assert asked == [] and "--force" not in str(err.value)
    assert err.value.hint == ("bring it home without a reboot: drtool recover web --reprotect, "
                              "then drtool recover web --failback --live")
    assert world.dr_vm_status == "running" and world.running_copies() == 1
    assert world.manifest.failover == replace(done.failover, finished_at=long_ago)


def test_a_destination_that_cannot_run_is_killed_and_the_source_resumes(catch_up: list[str]) -> None:
    world, reach, inv = protected_live_world()
    world.dest_cannot_run = True
    with pytest.raises(DrtoolError, match="failed and was undone") as err:
        failover.live_failover(inv, reach, "web")
    assert "caught up" in err.value.message
    assert_back_at_source(world)
    assert catch_up == ["web"] and world.jobs


def test_plain_failover_refuses_while_a_live_one_is_under_way() -> None:
    world, reach, inv = protected_live_world()
    world.qmp_faults["migrate-continue"] = "kill"
    with pytest.raises(Killed):
        failover.live_failover(inv, reach, "web")
    world.revive()
    with pytest.raises(Refused, match="live failover of web is under way") as err:
        failover.failover(inv, reach, "web")
    assert "--live" in (err.value.hint or "")


@pytest.mark.parametrize(("change", "says"), [
    ({"dr_version": "QEMU emulator version 8.0.0\n"}, "QEMU versions differ: the VM runs QEMU 7.2.22 on kvm1, "
                                                       "kvm2 has QEMU 8.0.0"),
    ({"dr_machines": "Supported machines are:\npc-i440fx-7.1  Standard PC\n"}, "machine types differ: the VM runs "
                                                                               "pc-i440fx-7.2"),
    ({"jobs_broken": True}, "disk vd0 is not in sync (broken)"),
    ({"jobs": False}, "disk vd0 is not in sync (no replication job)"),
    ({"source_status": "paused"}, "is paused on kvm1, not running"),
])
def test_refusals_say_what_differs_and_change_nothing(change: dict[str, Any], says: str) -> None:
    world, reach, inv = protected_live_world()
    for key, value in change.items():
        setattr(world, key, value)
    before = world.manifest.to_json()
    with pytest.raises(Refused) as err:
        failover.live_failover(inv, reach, "web")
    assert says in err.value.message
    assert world.manifest.to_json() == before and world.manifest.failover is None
    assert world.dr_vm is None and world.target_running


def test_dry_run_lists_the_steps_and_changes_nothing() -> None:
    world, reach, inv = protected_live_world()
    result = failover.live_failover(inv, reach, "web", dry_run=True)
    assert result.dry_run and result.plan is not None
    assert [line.split(":")[0] for line in result.plan.steps] == [s.value for s in LIVE_STEPS]
    assert world.manifest.failover is None and world.dr_vm is None


def test_a_source_that_dies_in_the_pause_is_undone_for_an_unplanned_failover() -> None:
    world, reach, inv = protected_live_world()
    world.qmp_faults["block-job-cancel"] = "kill"
    with pytest.raises(Killed):
        failover.live_failover(inv, reach, "web")
    world.revive()
    world.source_alive = False  # the source host crashed while the guest was paused at pre-switchover
    with pytest.raises(DrtoolError, match="undone") as err:
        failover.live_failover(inv, reach, "web")
    assert "--force" in (err.value.hint or "")
    assert world.manifest.state is Protection.PROTECTED and world.dr_vm is None and world.target_running
    result = failover.failover(inv, reach, "web", force=True, point_id="latest")
    assert result.kind == "unplanned" and world.dr_vm_status == "running" and world.running_copies() == 1
    assert world.dr_sees() == world.written  # the mirrors had carried every write before the pause


def test_a_pause_a_killed_checkpoint_left_is_resumed_before_the_refusals() -> None:
    from dataclasses import replace

    from drtool.state.records import SourcePause
    from drtool.state.store import save_manifest

    world, reach, inv = protected_live_world()
    world.source_status = "paused"
    save_manifest(reach.shell("kvm2"), inv.vm("web"), replace(world.manifest, source_pause=SourcePause("checkpoint",
                                                                                                       "t")))
    result = failover.live_failover(inv, reach, "web")
    assert any("resumed web" in n for n in result.notes), result.notes
    assert_live_on_dr_with_every_write(world)
