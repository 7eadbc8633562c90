"""Commands over many VMs: one pause at a time per host, one VM's failure its own, --all's choices."""

from __future__ import annotations

from dataclasses import replace

import pytest

from drtool.domain import Vm
from drtool.errors import ExitCode, UsageError
from drtool.services import checkpoint as checkpoint_service
from drtool.services.concurrent import for_each_vm
from drtool.services.resync import resync_many
from drtool.state.protection import Protection
from drtool.state.store import save_manifest
from tests.unit.world import protected_world


class Gate:
    """A pause gate that notes which monitor commands ran while it was held."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.held: list[str] = []

    def __enter__(self) -> None:
        self.start = len(self.log)

    def __exit__(self, *exc: object) -> None:
        self.held = self.log[self.start:]


def test_a_checkpoint_holds_its_host_gate_from_stop_to_cont_and_no_longer() -> None:
    world, reach, inv = protected_world()
    gate = Gate(world.log)
    result = checkpoint_service._checkpoint_one(inv, reach, inv.vm("web"), False, pause_gate=gate)
    assert result.point is not None, result.error
    assert gate.held[0] == "stop" and gate.held[-1] == "cont" and "transaction" in gate.held
    before = world.log[:world.log.index("stop")]
    assert "query-block-jobs" in before  # the checks run before the gate: other VMs' pauses may go on


def test_one_vms_failure_stops_no_other() -> None:
    _, _, inv = protected_world()
    vms = [replace(inv.vm("web"), name=f"vm{i}") for i in range(6)]

    def work(vm: Vm) -> str:
        if vm.name == "vm2":
            raise UsageError("vm2 refused a channel")
        return "done"

    report = for_each_vm(work, vms, per_host=2)
    assert [o.result for o in report.outcomes] == ["done", "done", None, "done", "done", "done"]
    assert report.outcomes[2].error == "vm2 refused a channel" and report.exit_code == ExitCode.USAGE


def test_resync_all_leaves_out_a_failed_over_vm_and_names_no_vm_twice() -> None:
    world, reach, inv = protected_world()
    save_manifest(reach.shell("kvm2"), inv.vm("web"), replace(world.manifest, state=Protection.FAILED_OVER))
    [outcome] = resync_many(inv, reach, all_vms=True).outcomes
    assert outcome.skipped == "failed-over: skipped" and outcome.exit_code == ExitCode.OK
    with pytest.raises(UsageError, match="not both"):
        resync_many(inv, reach, ["web"], all_vms=True)


def test_a_checkpoint_says_when_the_target_is_not_running() -> None:
    world, reach, inv = protected_world()
    world.target_running = False
    result = checkpoint_service._checkpoint_one(inv, reach, inv.vm("web"), False)
    assert result.exit_code == ExitCode.REFUSED and "replication target of web is not running" in result.error
    assert "resync web" in result.error and world.source_status == "running"
