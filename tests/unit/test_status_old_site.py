"""status of a failed-over VM: the original host is looked at briefly, and status says when it was not checked."""

from __future__ import annotations

import threading
import time

from drtool.errors import HostUnreachable
from drtool.mechanics import old_site
from drtool.services.status import vm_status
from drtool.state.protection import Health

from .recover_world import RecoverReach, failed_over_world
from .world import SRC


class SilentOldHost(RecoverReach):
    """The original host takes its whole connect timeout to fail, as a host that is down does."""

    def __init__(self, world: object) -> None:
        super().__init__(world)  # type: ignore[arg-type]  # a RecoverWorld
        self.connect_timeout = 20.0
        self.released = threading.Event()

    def shell(self, host_name: str):  # noqa: ANN201 - a world shell
        if host_name == SRC:
            self.released.wait(self.connect_timeout)
            raise HostUnreachable(f"{SRC} did not answer within {self.connect_timeout:g} s")
        return super().shell(host_name)


def test_a_failed_over_vm_whose_old_host_is_down_is_shown_without_waiting_for_it() -> None:
    world, _, inv = failed_over_world()
    reach = SilentOldHost(world)
    started = time.monotonic()
    try:
        [vm] = vm_status(inv, reach).vms
    finally:
        reach.released.set()
    assert time.monotonic() - started < old_site.BRIEF_LOOK + 2  # not the 20 s connect timeout
    assert vm.protection is Health.FAILED_OVER and vm.run_state == "running"
    assert f"{SRC} not checked for a split brain (no answer within 3 s)" in (vm.reason or "")


def test_a_reachable_old_host_is_checked_and_nothing_is_added() -> None:
    world, reach, inv = failed_over_world()
    [vm] = vm_status(inv, reach).vms
    assert vm.protection is Health.FAILED_OVER and "not checked" not in (vm.reason or "")


def test_an_old_host_that_refuses_at_once_is_said_unreachable() -> None:
    world, _, inv = failed_over_world()
    reach = SilentOldHost(world)
    reach.connect_timeout = 0.0
    [vm] = vm_status(inv, reach).vms
    assert f"{SRC} unreachable: not checked for a split brain" in (vm.reason or "")
