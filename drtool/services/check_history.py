"""`drtool check --history VM`: the check results kept on the DR host (state/checks.py)."""

from __future__ import annotations

from dataclasses import dataclass

from drtool.domain import Inventory
from drtool.state.checks import HistoryEntry, kept_results
from drtool.state.store import select_vm
from drtool.transport.connections import Reach


@dataclass(frozen=True)
class CheckHistory:
    vm: str
    entries: tuple[HistoryEntry, ...]


def check_history(inventory: Inventory, reach: Reach, name: str) -> CheckHistory:
    vm = select_vm(inventory, name)
    return CheckHistory(vm.name, kept_results(reach.shell(vm.dr_host), vm))
