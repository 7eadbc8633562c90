"""drtool recover against the fake world: the old site coming back (split brain)."""

from __future__ import annotations

import pytest

from drtool.errors import ExitCode
from drtool.mechanics import pausing, replication
from drtool.services import failover
from drtool.services.failover import planned
from drtool.services.status import vm_status
from drtool.state.protection import Health

from .world import World, WorldReach, protected_world


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
