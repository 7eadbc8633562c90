"""Every failover kind and resync, killed or failed after each step, then run again (fake world).

What must hold whatever happens: the result equals an uninterrupted run, the
DR copy has every record the guest wrote while the source ran, and the
source is never left paused by drtool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from drtool.domain import ReplicationMode
from drtool.errors import DrtoolError, Refused
from drtool.mechanics import pausing, replication
from drtool.services import checkpoint, drill, failover
from drtool.services.failover import planned
from drtool.services.resync import resync
from drtool.state.protection import Protection
from drtool.state.records import PLANNED_STEPS, UNPLANNED_STEPS, FailoverKind, Step

from .world import Killed, World, WorldReach, protected_world


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "QUIET", 0.0)
    monkeypatch.setattr(pausing, "DRAIN_TIMEOUT", 0.2)
    monkeypatch.setattr(pausing, "RESUME_BACKOFF", 0.0)
    monkeypatch.setattr(planned, "SOURCE_QUIT_TIMEOUT", 0.5)


def step_recorded(step: Step) -> Callable[[dict[str, Any]], bool]:
    return lambda raw: bool(raw.get("failover")) and step.value in raw["failover"]["steps"]


def interrupt(world: World, how: str, pred: Callable[[dict[str, Any]], bool], run: Callable[[], object]) -> None:
    """Run once with a kill or a dropped channel right after the save that makes pred true."""
    (world.kill_after_save if how == "kill" else world.fail_after_save)(pred)
    with pytest.raises((Killed, DrtoolError)):
        run()
    world.revive()
    world.tick()  # time passes before the operator runs it again: a running guest writes


def assert_failed_over_with_every_write(world: World) -> None:
    assert world.manifest.state is Protection.FAILED_OVER
    assert not world.source_alive, "two copies would run"
    assert world.dr_vm_status == "running"
    assert world.dr_sees() == world.written, f"the DR copy lacks {world.written - world.dr_sees()} records"


def test_planned_failover_uninterrupted() -> None:
    world, reach, inv = protected_world()
    result = failover.failover(inv, reach, "web")
    assert (result.kind, result.rpo_seconds) == ("planned", 0.0)
    assert_failed_over_with_every_write(world)
    assert world.manifest.failover is not None and world.manifest.failover.steps == PLANNED_STEPS


@pytest.mark.parametrize("how", ["kill", "drop"])
@pytest.mark.parametrize("step", PLANNED_STEPS)
def test_planned_failover_interrupted_after_each_step_finishes_with_every_write(step: Step, how: str) -> None:
    world, reach, inv = protected_world()
    interrupt(world, how, step_recorded(step), lambda: failover.failover(inv, reach, "web"))
    if how == "drop" and step in (Step.SOURCE_PAUSED, Step.FINAL_POINT):
        # before the point of no return a failure gives the source back, running, and undoes the records
        assert world.source_status == "running"
        record = world.manifest.failover
        assert record is not None and not record.done(Step.SOURCE_PAUSED) and not record.done(Step.FINAL_POINT)
    failover.failover(inv, reach, "web")
    assert_failed_over_with_every_write(world)


def test_defect1_a_drain_that_times_out_resumes_the_source_and_the_rerun_keeps_every_write() -> None:
    """The DR storage stalls during the final point; the guest goes on; the re-run must not trust old records."""
    world, reach, inv = protected_world()
    world.target_stalled = True
    with pytest.raises(DrtoolError, match="did not drain"):
        failover.failover(inv, reach, "web")
    assert world.source_status == "running", "a failed failover left the source paused"
    record = world.manifest.failover
    assert record is not None and record.steps == (), record
    assert world.manifest.source_pause is None
    for _ in range(50):
        world.tick()  # the guest writes 50 more records
    world.target_stalled = False
    failover.failover(inv, reach, "web")
    assert_failed_over_with_every_write(world)


def test_defect1_a_rerun_with_the_source_running_pauses_it_again_even_if_recorded() -> None:
    """A record that says "paused" while the source runs (a resume whose record-undo was lost)."""
    world, reach, inv = protected_world()
    world.kill_after_save(step_recorded(Step.FINAL_POINT))
    with pytest.raises(Killed):
        failover.failover(inv, reach, "web")
    world.revive()
    world.source_status = "running"  # someone (or a lost undo) resumed it
    for _ in range(10):
        world.tick()
    failover.failover(inv, reach, "web")
    assert_failed_over_with_every_write(world)


@pytest.mark.parametrize("step", PLANNED_STEPS[:4])
def test_rollback_after_each_planned_step_gives_the_source_back_running(step: Step) -> None:
    world, reach, inv = protected_world()
    interrupt(world, "kill", step_recorded(step), lambda: failover.failover(inv, reach, "web"))
    world.kill_after_save(lambda raw: raw["state"] == "protected")
    with pytest.raises(Killed):
        failover.rollback(inv, reach, "web")  # killed once more, as it records its end
    world.revive()
    result = failover.rollback(inv, reach, "web") if world.manifest.state.failing_over else None
    assert world.manifest.state is Protection.PROTECTED and world.manifest.failover is None
    assert world.source_alive and world.source_status == "running"
    assert world.dr_vm is None and world.target_running
    assert result is None or result.source_state == "running"
    # what the source wrote before its pause is on the replica the target exports again
    assert world.images[world.manifest.disks[0].replica_image] <= world.written


@pytest.mark.parametrize("step", UNPLANNED_STEPS)
def test_unplanned_failover_killed_after_each_step_starts_from_the_same_point(step: Step) -> None:
    world, reach, inv = protected_world()
    checkpoint.checkpoint(inv, reach, ["web"])
    point = world.manifest.points[-1]
    world.source_alive = False
    world.source_host_up = False
    with pytest.raises(Refused, match="--force"):
        failover.failover(inv, reach, "web")
    interrupt(world, "kill", step_recorded(step), lambda: failover.failover(inv, reach, "web", force=True))
    result = failover.failover(inv, reach, "web", force=True)
    assert result.kind == "unplanned" and result.point == point.id
    assert world.manifest.state is Protection.FAILED_OVER
    assert world.dr_sees() == world.images[point.images["vd0"]]
    assert point.images["vd0"] in world.frozen and world.dr_vm != point.images["vd0"], "the point was written to"


def test_defect2_sync_mode_while_resyncing_starts_from_the_newest_point_and_says_why() -> None:
    world, reach, inv = protected_world(ReplicationMode.SYNC)
    checkpoint.checkpoint(inv, reach, ["web"])
    point = world.manifest.points[-1]
    world.jobs_broken = True  # the link broke; a resync started copying and was killed
    world.kill_after_save(lambda raw: raw["state"] == "resyncing")
    with pytest.raises(Killed):
        resync(inv, reach, "web")
    world.revive()
    assert world.manifest.state is Protection.RESYNCING
    world.source_alive = world.source_host_up = False
    dry = failover.failover(inv, reach, "web", force=True, dry_run=True)
    assert dry.point == point.id and "resynced" in dry.start_reason
    assert any("resynced" in w for w in dry.plan.warnings) if dry.plan else False
    result = failover.failover(inv, reach, "web", force=True)
    assert result.point == point.id and "newest point" in result.start_reason


def test_defect2_sync_mode_in_sync_starts_from_the_replicas() -> None:
    world, reach, inv = protected_world(ReplicationMode.SYNC)
    world.source_alive = world.source_host_up = False
    result = failover.failover(inv, reach, "web", force=True)
    assert result.point is not None and result.point.startswith("latest-") and "in sync" in result.start_reason


def test_defect2_seeding_in_sync_mode_has_no_consistent_start_without_a_point() -> None:
    world, reach, inv = protected_world(ReplicationMode.SYNC, Protection.SEEDING)
    world.source_alive = world.source_host_up = False
    with pytest.raises(Refused, match="seeded"):
        failover.failover(inv, reach, "web", force=True)


def test_defect3_a_checkpoint_killed_while_the_source_is_paused_is_resumed_by_the_next_command() -> None:
    world, reach, inv = protected_world()
    with pytest.raises(Killed):
        _checkpoint_killed_in_drain(world, reach, inv)  # after the QMP stop
    world.revive()
    assert world.source_status == "paused" and world.manifest.source_pause is not None
    report = checkpoint.checkpoint(inv, reach, ["web"])
    [result] = report.results
    assert world.source_status == "running"
    assert any("resumed web" in n and "checkpoint" in n for n in result.notes), result
    assert result.point is not None and world.manifest.source_pause is None


def _checkpoint_killed_in_drain(world: World, reach: WorldReach, inv: Any) -> None:
    calls = {"n": 0}
    original = world.source_qmp

    def dying(command: str, args: dict[str, Any]) -> Any:
        if command == "query-block-jobs":
            calls["n"] += 1
            if calls["n"] == 2:
                world.killed = True
                raise Killed()
        return original(command, args)

    world.source_qmp = dying  # type: ignore[method-assign]
    try:
        [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    finally:
        world.source_qmp = original  # type: ignore[method-assign]
    raise AssertionError(f"not killed: {result}")


def test_defect3_resume_goes_through_a_fresh_connection_when_the_pausing_one_broke() -> None:
    world, reach, inv = protected_world()
    world.qmp_faults["cont"] = "drop"
    [result] = checkpoint.checkpoint(inv, reach, ["web"]).results
    assert result.point is not None and result.error is None
    assert world.source_status == "running" and world.manifest.source_pause is None


def test_defect3_resync_and_failover_resume_a_pause_of_drtools_own() -> None:
    for command in ("resync", "failover"):
        world, reach, inv = protected_world()
        world.source_status = "paused"
        manifest = world.manifest
        from dataclasses import replace

        from drtool.state.records import SourcePause
        from drtool.state.store import save_manifest

        save_manifest(reach.shell("kvm2"), inv.vm("web"), replace(manifest, source_pause=SourcePause("checkpoint", "t")))
        if command == "resync":
            notes = resync(inv, reach, "web").notes
            assert world.source_status == "running"
        else:
            notes = failover.failover(inv, reach, "web").notes
            assert_failed_over_with_every_write(world)
        assert any("resumed web" in n for n in notes), (command, notes)


@pytest.mark.parametrize("step", [Step.SOURCE_PAUSED, Step.FINAL_POINT, Step.REPLICATION_STOPPED])
def test_defect4_force_finishes_a_planned_failover_whose_source_died_from_its_final_point(step: Step) -> None:
    world, reach, inv = protected_world()
    interrupt(world, "kill", step_recorded(step), lambda: failover.failover(inv, reach, "web"))
    written_at_pause = world.written
    world.source_alive = world.source_host_up = False  # the source dies, paused
    with pytest.raises(Refused, match="--force"):
        failover.failover(inv, reach, "web")
    if step is Step.SOURCE_PAUSED:  # no final point yet, and no other point: nothing consistent to start from
        with pytest.raises(Refused, match="no consistent place"):
            failover.failover(inv, reach, "web", force=True)
        result = failover.failover(inv, reach, "web", force=True, point_id="latest")
    else:
        result = failover.failover(inv, reach, "web", force=True)
        assert "final point" in result.start_reason
    record = world.manifest.failover
    assert result.kind == "unplanned" and record is not None and record.kind is FailoverKind.UNPLANNED
    assert record.converted_from is not None and step in record.converted_from
    assert world.manifest.state is Protection.FAILED_OVER and world.dr_vm_status == "running"
    assert world.dr_sees() == written_at_pause, "the final point holds every write up to the pause"


@pytest.mark.parametrize("how", ["kill", "drop"])
def test_drill_interrupted_after_its_record_runs_again(how: str) -> None:
    world, reach, inv = protected_world()
    checkpoint.checkpoint(inv, reach, ["web"])
    point = world.manifest.points[-1]
    interrupt(world, how, lambda raw: bool(raw.get("drill")), lambda: drill.test_failover(inv, reach, "web"))
    result = drill.test_failover(inv, reach, "web")
    assert result.point == point.id and world.drill_vm is not None
    assert point.images["vd0"] in world.frozen and world.drill_vm != point.images["vd0"]
    assert world.source_status == "running"
    drill.cleanup_test(inv, reach, "web")
    assert world.drill_vm is None and world.manifest.drill is None


@pytest.mark.parametrize("how", ["kill", "drop"])
def test_resync_interrupted_after_it_records_the_copy_runs_again_to_in_sync(how: str) -> None:
    world, reach, inv = protected_world()
    world.jobs_broken = True
    for _ in range(20):
        world.tick()
    interrupt(world, how, lambda raw: raw["state"] == "resyncing", lambda: resync(inv, reach, "web"))
    assert world.manifest.state is Protection.RESYNCING
    result = resync(inv, reach, "web")
    assert result.action == "resumed" and world.manifest.state is Protection.PROTECTED
    assert world.images[world.active_top] == world.written and world.source_status == "running"


def test_a_forbidden_transition_is_never_written() -> None:
    world, reach, inv = protected_world()
    before = world.files["/dr/web/manifest.json"]
    with pytest.raises(DrtoolError, match="cannot become"):
        world.manifest.transition(Protection.FAILED_OVER)
    assert world.files["/dr/web/manifest.json"] == before


def test_a_failure_while_stopping_replication_keeps_the_source_paused_and_says_so() -> None:
    world, reach, inv = protected_world()
    world.qmp_faults["blockdev-del"] = "drop"  # the mirrors are cancelled; the source's monitor then drops
    with pytest.raises(DrtoolError, match="stays paused") as err:
        failover.failover(inv, reach, "web")
    assert "--rollback" in (err.value.hint or "")
    assert world.source_status == "paused" and not world.jobs, "it would run unreplicated"
    failover.failover(inv, reach, "web")
    assert_failed_over_with_every_write(world)


def test_a_pause_recorded_by_a_killed_failover_is_taken_for_drtools_own() -> None:
    world, reach, inv = protected_world()
    original = world.source_qmp
    calls = {"stops": 0}

    def stop_then_die(command: str, args: dict[str, Any]) -> Any:
        """Killed after the pause record and the stop, before the step is recorded."""
        result = original(command, args)
        if command == "stop":
            calls["stops"] += 1
            world.killed = True
            raise Killed()
        return result

    world.source_qmp = stop_then_die  # type: ignore[method-assign]
    with pytest.raises(Killed):
        failover.failover(inv, reach, "web")
    world.source_qmp = original  # type: ignore[method-assign]
    world.revive()
    assert world.source_status == "paused" and world.manifest.source_pause is not None
    failover.rollback(inv, reach, "web")
    assert world.source_status == "running" and calls["stops"] == 1


def test_status_says_when_the_source_is_left_paused_by_drtool() -> None:
    from dataclasses import replace

    from drtool.services.status import vm_status
    from drtool.state.records import SourcePause
    from drtool.state.store import save_manifest

    world, reach, inv = protected_world()
    world.source_status = "paused"
    save_manifest(reach.shell("kvm2"), inv.vm("web"), replace(world.manifest, source_pause=SourcePause("resync", "t")))
    [web] = vm_status(inv, reach, ["web"]).vms
    assert web.run_state == "paused" and "interrupted drtool resync" in web.reason and "drtool resync web" in web.reason
