"""Work over many hosts or VMs at once, results in the order asked; one VM's failure stops no other."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from drtool.absent import absent_is_none
from drtool.domain import Vm
from drtool.errors import DrtoolError, ExitCode

T = TypeVar("T")
R = TypeVar("R")

MAX_PARALLEL = 16
# protect and resync set up processes, channels and QMP sessions on both hosts: more than
# a few at once per host only make each slower (measured: QMP greetings past 10 s at 16).
SETUPS_PER_HOST = 4


def map_concurrently(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(items))) as pool:
        return list(pool.map(fn, items))


@dataclass(frozen=True)
class VmOutcome(Generic[R]):
    """One VM's part of a command over many: its result, why it failed, or why it was left out."""

    vm: str
    result: R | None = None
    error: str | None = None
    exit_code: ExitCode = ExitCode.OK
    skipped: str | None = None  # why it was left out

    def __post_init__(self) -> None:
        absent_is_none(self, "error", "skipped")


@dataclass(frozen=True)
class FleetReport(Generic[R]):
    outcomes: tuple[VmOutcome[R], ...]

    @property
    def exit_code(self) -> ExitCode:
        return max((o.exit_code for o in self.outcomes), default=ExitCode.OK)


def for_each_vm(fn: Callable[[Vm], R], vms: Sequence[Vm], skipped: dict[str, VmOutcome[R]] | None = None,
                *, per_host: int = MAX_PARALLEL) -> FleetReport[R]:
    """fn on every VM at once, at most per_host VMs of one (source) host at a time; skipped ones
    stand as given; each VM's DrtoolError is its own outcome and stops no other VM."""
    skipped = skipped or {}
    slots = {host: threading.BoundedSemaphore(per_host) for host in {vm.host for vm in vms}}

    def one(vm: Vm) -> VmOutcome[R]:
        if vm.name in skipped:
            return skipped[vm.name]
        try:
            with slots[vm.host]:
                return VmOutcome(vm.name, fn(vm))
        except DrtoolError as err:
            return VmOutcome(vm.name, None, str(err), err.exit_code)

    return FleetReport(tuple(map_concurrently(one, vms)))
