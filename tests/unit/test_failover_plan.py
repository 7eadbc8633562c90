"""Failover decisions that need no host: where an unplanned failover starts, what a plan says."""

from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.state.manifest import Manifest, RecoveryPoint, ReplicaDisk
from drtool.services.failover import LATEST, PLANNED_STEPS, _plan, default_start

DISK = ReplicaDisk("vd0", "vd0-fmt", "qcow2", 1 << 26, "/srv/vd0.qcow2", "/dr/web/vd0.qcow2", "vd0")
POINT = RecoveryPoint("p1", "2026-11-26T10:00:00+00:00", "paused", 0.4, {"vd0": "/dr/web/vd0.qcow2"})
VM = Vm("web", "kvm1", PurePosixPath("/run/web.qmp"), "kvm2", PurePosixPath("/dr/web"))


def manifest(mode: str, points=()) -> Manifest:
    return Manifest("web", "kvm1", "kvm2", mode, "tls-psk", "10.0.0.2", 10809, (DISK,), points=tuple(points),
                    state="protected")


def test_sync_mode_starts_from_the_replicas_async_from_the_newest_point():
    assert default_start(manifest("sync")) == LATEST
    assert default_start(manifest("sync", [POINT])) == LATEST
    assert default_start(manifest("async", [POINT])) == "p1"
    assert default_start(manifest("async")) is None  # refused: no consistent place to start


def test_a_planned_plan_lists_every_step_and_what_it_runs():
    plan = _plan(VM, manifest("async"), "planned", None)
    assert [line.split(":")[0] for line in plan.steps] == list(PLANNED_STEPS)
    assert "QMP stop" in plan.steps[0] and "blockdev-snapshot-sync" in plan.steps[1]
    assert plan.warnings == ()


def test_an_unplanned_plan_warns_what_is_lost():
    plan = _plan(VM, manifest("async", [POINT]), "unplanned", "p1")
    assert any("fenced" in w for w in plan.warnings)
    assert any("writes after the point are lost" in w for w in plan.warnings)
    latest = _plan(VM, manifest("sync"), "unplanned", LATEST)
    assert any("acknowledged" in w for w in latest.warnings)
