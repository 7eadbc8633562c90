"""`drtool recover --failback --live` in the fake world: uninterrupted, killed at every step, refused, undone.

Whatever happens: never two running copies (the world asserts it on every monitor command), and when the
VM ends at home, the old images hold every write the DR copy made.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from drtool.errors import DrtoolError, Refused
from drtool.services import failover
from drtool.services.recover.failback import DR_STOPPED
from drtool.state.protection import Protection

from .failback_live_world import FailbackLiveWorld, reprotected_world
from .recover_world import failed_over_world
from .world import Killed

# the modules (the package exports the functions under their names)
failback_live = importlib.import_module("drtool.services.recover.failback_live")
failback = importlib.import_module("drtool.services.recover.failback")
LIVE_FAILBACK_STEPS = (failback_live.LIVE_HOME_STARTED, failback_live.LIVE_MIGRATING, DR_STOPPED)


Reprotected = tuple[FailbackLiveWorld, Any, Any]
Calls = dict[str, list[str]]


@pytest.fixture
def reprotected(monkeypatch: pytest.MonkeyPatch) -> Reprotected:
    return reprotected_world(monkeypatch)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """resync after the move and reprotect after an undo (the lab tests run the real ones), calls counted."""
    made: dict[str, list[str]] = {"resync": [], "reprotect": []}

    def resync(inventory: Any, reach: Any, name: str) -> None:
        world = reach.world
        assert world.home_qemu == "running" and world.dr_vm is None, "resync before the DR copy quit"
        made["resync"].append(name)

    def reprotect(inventory: Any, reach: Any, name: str) -> None:
        world = reach.world
        assert world.manifest.state is Protection.REPROTECTED and world.home_qemu == "gone"
        assert world.dr_vm_status == "running" and world.rev_target and world.rev_link, "reprotect before the undo"
        world.rev_job = "running"  # mirrors again (from the pause's bitmap when they had gone)
        world.rev_mirror()
        made["reprotect"].append(name)

    monkeypatch.setattr(failback_live, "resync", resync)
    monkeypatch.setattr(failback_live, "reprotect", reprotect)
    monkeypatch.setattr(failback_live, "QUIT_TIMEOUT", 0.2)
    return made


def assert_home_with_every_write(world: FailbackLiveWorld) -> None:
    assert world.manifest.state is Protection.PROTECTED and world.manifest.reprotect is None
    assert world.home_qemu == "running" and world.dr_vm is None and world.running_copies() == 1
    assert world.home_has_every_dr_write() == [], "writes of the DR copy missing at home"
    assert world.writes > 0 and not world.rev_target and not world.rev_link and not world.target_running


def assert_undone(world: FailbackLiveWorld) -> None:
    assert world.manifest.state is Protection.REPROTECTED and world.manifest.reprotect is not None
    assert world.dr_vm_status == "running" and world.home_qemu == "gone" and world.running_copies() == 1
    assert world.rev_target and world.rev_link


def killed_then_revived(world: FailbackLiveWorld, inv: Any, reach: Any) -> None:
    """A live failback SIGKILLed where the world's fault says; the next process starts."""
    with pytest.raises(Killed):
        failback_live.failback_live(inv, reach, "web")
    world.revive()


def saved_step(step: str):  # noqa: ANN201
    def pred(raw: dict[str, Any]) -> bool:
        return bool(raw.get("reprotect")) and step in raw["reprotect"]["steps"]
    return pred


def test_live_failback_uninterrupted_brings_the_running_vm_home_with_every_write(calls: Calls,
                                                                                reprotected: Reprotected) -> None:
    world, reach, inv = reprotected
    result = failback_live.failback_live(inv, reach, "web")
    assert (result.vm, result.host, result.rpo_seconds, result.resumed) == ("web", "kvm1", 0.0, False)
    assert_home_with_every_write(world)
    assert calls == {"resync": ["web"], "reprotect": []}
    log = world.log
    # the order that keeps the old images whole: mirrors complete, the target stops, then the switch
    assert log.index("dr migrate") < log.index("dr block-job-cancel") < log.index("dr migrate-continue")
    assert log.index("dr migrate-continue") < log.index("home cont")
    # the forward direction's bitmap was on the home disks before home ran, and the manifest trusts it
    assert world.home_bitmaps and world.home_qemu_starts == 1
    assert world.manifest.bitmap_name in world.home_bitmaps


@pytest.mark.parametrize("step", ["failing-back", *LIVE_FAILBACK_STEPS])
def test_killed_after_each_recorded_step_a_rerun_brings_it_home_with_one_copy(step: str, calls: Calls,
                                                                              reprotected: Reprotected) -> None:
    world, reach, inv = reprotected
    world.kill_after_save((lambda raw: raw.get("state") == "failing-back") if step == "failing-back"
                          else saved_step(step))
    killed_then_revived(world, inv, reach)
    assert world.manifest.state is Protection.FAILING_BACK
    assert world.running_copies() == 1
    world.dr_guest_writes(7, "dr7-meanwhile") if world.dr_vm_status == "running" else None
    failback_live.failback_live(inv, reach, "web")
    assert_home_with_every_write(world)
    undone = step != DR_STOPPED  # before the switch: undone, caught up, moved afresh
    assert calls["reprotect"] == (["web"] if undone else []) and calls["resync"] == ["web"]


def test_killed_in_the_resync_after_the_move_a_rerun_says_it_is_home_and_to_resync(calls: Calls,
                                                                                 reprotected: Reprotected) -> None:
    world, reach, inv = reprotected
    world.kill_after_save(lambda raw: raw.get("state") == "protected")
    killed_then_revived(world, inv, reach)
    with pytest.raises(Refused, match="web is protected and runs on kvm1: there is nothing to fail back") as err:
        failback_live.failback_live(inv, reach, "web")
    assert "drtool resync web" in (err.value.hint or "")
    assert world.home_qemu == "running" and world.dr_vm is None and world.running_copies() == 1
    assert world.home_has_every_dr_write() == []


@pytest.mark.parametrize(("where", "command", "undone"), [
    ("dr", "migrate", True),  # home listens, nothing sent
    ("dr", "block-job-cancel", True),  # inside the pause, the mirrors still running
    ("dr", "migrate-continue", True),  # inside the pause, the mirrors completed and the target stopped
    ("home", "transaction", False),  # switched, home paused without its resync bitmap yet
    ("home", "cont", False),  # switched: home has everything
])
def test_killed_inside_the_move_a_rerun_undoes_before_the_switch_and_finishes_after(
        where: str, command: str, undone: bool, calls: Calls, reprotected: Reprotected) -> None:
    world, reach, inv = reprotected
    (world.dr_faults if where == "dr" else world.home_faults)[command] = "kill"
    killed_then_revived(world, inv, reach)
    assert world.running_copies() == (1 if command == "migrate" else 0)  # else paused at the switch
    failback_live.failback_live(inv, reach, "web")
    assert_home_with_every_write(world)
    assert bool(calls["reprotect"]) == undone
    assert world.manifest.bitmap_name in world.home_bitmaps, "resync cannot trust a bitmap: it compares or copies"
    if command == "migrate-continue":  # the mirrors had gone: caught up from the bitmap taken in the pause
        assert world.dr_bitmaps


def test_a_home_that_cannot_run_is_killed_and_the_dr_copy_resumes(calls: Calls, reprotected: Reprotected) -> None:
    world, reach, inv = reprotected
    world.home_cannot_run = True
    with pytest.raises(DrtoolError, match="failed and was undone") as err:
        failback_live.failback_live(inv, reach, "web")
    assert "reprotected" in err.value.message
    assert_undone(world)
    record = world.manifest.reprotect
    assert record is not None and record.method == "bitmap", "the mirrors went: the catch-up must use the bitmap"
    assert world.manifest.failover is not None and world.manifest.failover.migration is not None
    assert world.manifest.failover.migration["reverse_bitmap"] in world.dr_bitmaps
    assert calls == {"resync": [], "reprotect": ["web"]}


def test_rollback_and_a_cold_failback_refuse_while_a_live_failback_is_under_way(calls: Calls,
                                                                                reprotected: Reprotected) -> None:
    world, reach, inv = reprotected
    world.dr_faults["migrate-continue"] = "kill"
    killed_then_revived(world, inv, reach)
    before = world.manifest.to_json()
    with pytest.raises(Refused, match="failing-back"):
        failover.rollback(inv, reach, "web")
    with pytest.raises(Refused, match="live failback of web is under way") as err:
        failback.failback(inv, reach, "web")
    assert "--live" in (err.value.hint or "")
    assert world.manifest.to_json() == before and world.dr_vm_status == "finish-migrate"
    failback_live.failback_live(inv, reach, "web")
    assert_home_with_every_write(world)


@pytest.mark.parametrize(("change", "says"), [
    ({"home_version": "QEMU emulator version 8.0.0\n"}, "QEMU versions differ: the VM runs QEMU 7.2.22 on kvm2, "
                                                         "kvm1 has QEMU 8.0.0"),
    ({"rev_job": "paused"}, "reverse replication of web is not in sync"),
])
def test_refusals_say_what_is_wrong_and_change_nothing(change: dict[str, Any], says: str, calls: Calls,
                                                        reprotected: Reprotected) -> None:
    world, reach, inv = reprotected
    for key, value in change.items():
        setattr(world, key, value)
    before = world.manifest.to_json()
    with pytest.raises(Refused) as err:
        failback_live.failback_live(inv, reach, "web")
    assert says in err.value.message
    assert world.manifest.to_json() == before and world.home_qemu == "gone" and world.dr_vm_status == "running"


def test_refused_before_reprotect() -> None:
    world, reach, inv = failed_over_world()
    with pytest.raises(Refused, match=r"not reprotected \(state failed-over\)") as err:
        failback_live.failback_live(inv, reach, "web")
    assert "--reprotect" in (err.value.hint or "")
    assert world.manifest.state is Protection.FAILED_OVER
