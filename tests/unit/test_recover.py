"""drtool recover against the fake world: the old site coming back (split brain)."""

from __future__ import annotations

import json

import pytest

from drtool.errors import ExitCode, Refused
from drtool.mechanics import old_site, pausing, replication
from drtool.mechanics.old_site import SplitBrain
from drtool.services import failover
from drtool.services.failover import planned
from drtool.services.recover import reprotect
from drtool.services.status import vm_status
from drtool.state.protection import Health, Protection

from .recover_world import RecoverWorld, failed_over_world
from .world import REPLICAS, SOURCE_IMAGE, Killed, World, WorldReach, protected_world


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "QUIET", 0.0)
    monkeypatch.setattr(pausing, "DRAIN_TIMEOUT", 0.2)
    monkeypatch.setattr(pausing, "RESUME_BACKOFF", 0.0)
    monkeypatch.setattr(planned, "SOURCE_QUIT_TIMEOUT", 0.5)


def unplanned_failover() -> tuple[World, WorldReach, object]:
    world, reach, inv = protected_world()
    world.tick()
    world.source_alive = False  # the primary died
    failover.failover(inv, reach, "web", force=True, point_id="latest")
    return world, reach, inv


def test_status_marks_the_old_images_when_the_old_host_answers_and_no_qemu_runs() -> None:
    world, reach, inv = unplanned_failover()
    report = vm_status(inv, reach, ["web"])  # type: ignore[arg-type]  # the world's inventory
    assert report.vms[0].protection is Health.FAILED_OVER
    assert "split brain" not in report.vms[0].error
    assert world.old_images_marked, "the first command reaching the old host leaves its marker"


def test_status_reports_split_brain_when_the_old_vm_restarts() -> None:
    world, reach, inv = unplanned_failover()
    world.source_alive, world.source_status = True, "running"  # an init script restarted it
    report = vm_status(inv, reach, ["web"])  # type: ignore[arg-type]
    vm = report.vms[0]
    assert vm.protection is Health.SPLIT_BRAIN
    assert vm.error.startswith("split brain: VM runs on both sites")
    assert "pid 7" in vm.error
    assert report.exit_code is ExitCode.FAILED


# --- reprotect, killed after each step and run again (the reverse-direction world) --------------

STEPS = ("reprotecting", "rewound", "target-started", "mirrors-started", "reprotected")


def saved(step: str):
    def pred(raw: dict) -> bool:
        if step in ("reprotecting", "reprotected"):
            return raw.get("state") == step
        return bool(raw.get("reprotect")) and step in raw["reprotect"]["steps"]
    return pred


def assert_home_equals_the_dr_copy(world: RecoverWorld) -> None:
    assert world.manifest.state is Protection.REPROTECTED
    assert world.home == world.dr_view(), "the old image differs from the DR copy"
    assert "newer9" not in world.home.values(), "the old primary's newer write survived"
    assert world.rev_target and world.rev_link and world.rev_job == "running"


def test_reprotect_uninterrupted_sends_the_top_and_rewinds_the_newer_write() -> None:
    world, reach, inv = failed_over_world()
    result = reprotect(inv, reach, "web")
    assert_home_equals_the_dr_copy(world)
    assert result.rewound_bytes == 1 << 20 and result.sent_bytes == 1 << 20 and not result.resumed
    again = reprotect(inv, reach, "web")
    assert again.already and world.started_targets == 1


@pytest.mark.parametrize("step", STEPS)
def test_reprotect_killed_after_each_step_finishes_when_run_again(step: str) -> None:
    world, reach, inv = failed_over_world()
    world.kill_after_save(saved(step))
    with pytest.raises(Killed):
        reprotect(inv, reach, "web")
    world.revive()
    world.dr_guest_writes(7, "dr7-meanwhile")  # the DR copy writes on meanwhile
    result = reprotect(inv, reach, "web")
    assert_home_equals_the_dr_copy(world)
    assert result.resumed or step == "reprotected"
    world.dr_guest_writes(8, "dr8-after")
    assert world.home[8] == "dr8-after", "a write after reprotect is not replicated home"


def test_reprotect_after_the_link_broke_resumes_the_paused_mirror_without_starting_over() -> None:
    world, reach, inv = failed_over_world()
    reprotect(inv, reach, "web")
    world.rev_link = False  # the relay died: the mirror pauses and tracks writes
    world.dr_guest_writes(11, "dr11-during-cut")
    assert world.home.get(11) != "dr11-during-cut"
    hashed = world.hashed
    result = reprotect(inv, reach, "web")
    assert result.resumed and world.hashed == hashed, "a resumed reprotect must not hash or rewind again"
    assert_home_equals_the_dr_copy(world)


def test_reprotect_refuses_a_split_brain_and_changes_nothing() -> None:
    world, reach, inv = failed_over_world()
    original = world.home_run

    def with_qemu(argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[:3] == ["python3", "-c", old_site._FIND_SCRIPT]:
            return 0, json.dumps([{"pid": 4242, "program": "qemu-system-x86_64", "images": [SOURCE_IMAGE]}]), ""
        return original(argv, stdin)

    world.home_run = with_qemu  # type: ignore[method-assign]  # the old VM restarted at home
    before = world.files[str(REPLICAS / "manifest.json")]
    with pytest.raises(SplitBrain, match="pid 4242"):
        reprotect(inv, reach, "web")
    assert world.files[str(REPLICAS / "manifest.json")] == before and not world.rev_target


def test_failover_and_rollback_refuse_a_vm_that_recover_is_bringing_home() -> None:
    world, reach, inv = failed_over_world()
    reprotect(inv, reach, "web")
    with pytest.raises(Refused, match="already failed over"):
        failover.failover(inv, reach, "web")
    with pytest.raises(Refused, match="reprotected"):
        failover.rollback(inv, reach, "web")
    assert world.manifest.state is Protection.REPROTECTED and world.dr_vm is not None
