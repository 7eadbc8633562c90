"""A planned failover's round trips (fake world): one QMP session per monitor, the steps' manifest writes
folded, and the DR copy, started while the source quits, resumed only once the source is gone."""

from __future__ import annotations

from collections import Counter
from pathlib import PurePosixPath
from typing import Any

import pytest

from drtool.errors import DrtoolError
from drtool.mechanics import pausing, replication
from drtool.services import failover
from drtool.services.failover import planned

from .world import World, WorldQmp, WorldReach, protected_world


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "QUIET", 0.0)
    monkeypatch.setattr(pausing, "DRAIN_TIMEOUT", 0.2)
    monkeypatch.setattr(planned, "SOURCE_QUIT_TIMEOUT", 0.3)


class CountingReach(WorldReach):
    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.opened: Counter[str] = Counter()

    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> WorldQmp:
        session = super().qmp_at(host_name, socket_path, label)
        self.opened[session.name] += 1
        return session


def count_saves(world: World) -> list[dict[str, Any]]:
    saved: list[dict[str, Any]] = []

    def note(raw: dict[str, Any]) -> bool:
        saved.append(raw)
        return False  # never fires: it stays, and sees every write

    world.fail_after_save(note)
    return saved


def test_a_planned_failover_opens_each_monitor_once_and_writes_four_steps_before_the_dr_copy_runs() -> None:
    world, _, inv = protected_world()
    reach = CountingReach(world)
    saved = count_saves(world)
    result = failover.failover(inv, reach, "web")
    assert result.kind == "planned" and world.dr_vm_status == "running" and not world.source_alive
    assert reach.opened == {"source_qmp": 1, "target_qmp": 1, "dr_vm_qmp": 1}, reach.opened
    steps = [tuple(raw["failover"]["steps"]) for raw in saved]
    assert steps == [(), ("source-paused", "final-point"), ("source-paused", "final-point", "replication-stopped"),
                     ("source-paused", "final-point", "replication-stopped", "source-stopped", "dr-started"),
                     ("source-paused", "final-point", "replication-stopped", "source-stopped", "dr-started")], steps
    first = saved[0]
    assert first["state"] == "failing-over" and first["source_pause"] and first["pending_point"], \
        "the failover, its pause and its pending point are recorded together, before the QMP stop"
    assert saved[-1]["state"] == "failed-over"


def test_the_dr_copy_started_while_the_source_quits_is_not_resumed_while_the_source_runs() -> None:
    world, reach, inv = protected_world()
    original = world.source_qmp

    def deaf_to_quit(command: str, args: dict[str, Any]) -> Any:
        return {} if command == "quit" else original(command, args)

    world.source_qmp = deaf_to_quit  # type: ignore[method-assign]
    with pytest.raises(DrtoolError, match="still runs on kvm1 after quit"):
        failover.failover(inv, reach, "web")
    assert world.source_alive and world.source_status == "paused", "it must not run unreplicated"
    assert world.dr_vm is not None and world.dr_vm_status == "paused", "two copies would run"
    record = world.manifest.failover
    assert record is not None and not record.done(planned.Step.SOURCE_STOPPED)
    world.source_qmp = original  # type: ignore[method-assign]
    failover.failover(inv, reach, "web")  # the source quits this time: the same DR copy is resumed
    assert not world.source_alive and world.dr_vm_status == "running" and world.dr_sees() == world.written
