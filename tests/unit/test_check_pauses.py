"""drtool check on the typed state, against the fake world: its pauses and its early verdicts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from drtool.mechanics import pausing
from drtool.mechanics.pausing import paused_source, resume_own_pause
from drtool.services.check import CheckStatus, Thresholds, check_vm
from drtool.state.protection import Health, Protection
from drtool.state.records import FailoverKind, FailoverRecord
from drtool.state.store import save_manifest

from .world import Killed, protected_world


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pausing, "RESUME_BACKOFF", 0.0)


def test_the_pause_is_recorded_before_the_stop_and_cleared_after_the_resume() -> None:
    world, reach, inv = protected_world()
    vm = inv.vms["web"]
    dr = reach.shell(vm.dr_host)
    with reach.qmp(vm) as qmp, paused_source(reach, dr, vm, world.manifest, qmp, "check") as paused:
        assert paused and world.source_status == "paused"
        assert world.manifest.source_pause is not None and world.manifest.source_pause.by == "check"
    assert world.source_status == "running" and world.manifest.source_pause is None
    # killed right after the record was saved: the VM was not stopped yet, and the record says so to the next one
    world.kill_after_save(lambda raw: bool(raw.get("source_pause")))
    with pytest.raises(Killed), reach.qmp(vm) as qmp, paused_source(reach, dr, vm, world.manifest, qmp, "check"):
        pytest.fail("the block ran although drtool was killed before the stop")
    world.revive()
    assert world.source_status == "running" and world.manifest.source_pause is not None
    manifest, said = resume_own_pause(reach, dr, vm, world.manifest)
    assert manifest.source_pause is None and world.manifest.source_pause is None and said == ""


def test_a_source_that_is_not_running_is_neither_stopped_nor_recorded() -> None:
    world, reach, inv = protected_world()
    world.source_status = "paused"  # paused by its operator: drtool must not resume it
    vm = inv.vms["web"]
    with reach.qmp(vm) as qmp, paused_source(reach, reach.shell(vm.dr_host), vm, world.manifest, qmp, "check") as p:
        assert not p and world.manifest.source_pause is None
    assert world.source_status == "paused"


def test_a_check_killed_inside_its_pause_leaves_the_source_to_the_next_check() -> None:
    world, reach, inv = protected_world()
    vm = inv.vms["web"]
    world.qmp_faults["cont"] = "kill"  # drtool dies as it resumes
    with pytest.raises(Killed), reach.qmp(vm) as qmp, \
            paused_source(reach, reach.shell(vm.dr_host), vm, world.manifest, qmp, "check --repair"):
        pass
    world.revive()
    assert world.source_status == "paused" and world.manifest.source_pause is not None
    world.jobs_broken = True  # the next check stops before comparing: what matters here is the resume
    result = check_vm(reach, vm, Thresholds())
    assert world.source_status == "running" and world.manifest.source_pause is None
    assert result.status is CheckStatus.CRITICAL and result.replication is Health.BROKEN, result


def test_an_interrupted_resync_is_critical_and_names_the_fix() -> None:
    _, reach, inv = protected_world(state=Protection.RESYNCING)
    result = check_vm(reach, inv.vms["web"], Thresholds())
    assert result.status is CheckStatus.CRITICAL and result.rounds == 0
    assert "resync was interrupted: run drtool resync web" in result.summary, result.summary


def test_a_failed_over_vm_is_critical_and_not_compared() -> None:
    world, reach, inv = protected_world()
    vm = inv.vms["web"]
    failed = replace(world.manifest, state=Protection.FAILED_OVER,
                     failover=FailoverRecord(FailoverKind.UNPLANNED, "2026-11-27T00:00:00+00:00"))
    save_manifest(reach.shell(vm.dr_host), vm, failed)
    result = check_vm(reach, vm, Thresholds())
    assert result.status is CheckStatus.CRITICAL and result.replication is Health.FAILED_OVER
    assert result.summary.startswith("failed-over to"), result.summary
