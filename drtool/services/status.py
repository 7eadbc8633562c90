"""`drtool status`: what each VM is, where, and how well it is protected."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drtool.blockinfo import BlockDevice, parse_query_block
from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, ExitCode, UsageError
from drtool.services.concurrent import map_concurrently
from drtool.transport.connections import Reach

UNPROTECTED = "unprotected"


@dataclass(frozen=True)
class DiskStatus:
    device: str
    node_name: str
    format: str
    virtual_size: int
    image: str
    protected: bool  # selected for protection by the inventory (all disks when none are named)


@dataclass(frozen=True)
class VmStatus:
    name: str
    host: str
    dr_host: str
    run_state: str | None  # QMP query-status "status": running, paused, prelaunch, ...
    protection: str
    disks: tuple[DiskStatus, ...] = ()
    error: str = ""
    exit_code: ExitCode = ExitCode.OK


@dataclass(frozen=True)
class StatusReport:
    vms: tuple[VmStatus, ...]

    @property
    def exit_code(self) -> ExitCode:
        return max((v.exit_code for v in self.vms), default=ExitCode.OK)


def select_vms(inventory: Inventory, names: Sequence[str]) -> list[Vm]:
    """The VMs named (all when none), refusing unknown names before anything is contacted."""
    for name in names:
        if name not in inventory.vms:
            raise UsageError(
                f"unknown VM {name!r}",
                hint=f"VMs in {inventory.path}: {', '.join(sorted(inventory.vms)) or 'none'}",
            )
    if names:
        return [inventory.vms[n] for n in dict.fromkeys(names)]
    return [inventory.vms[n] for n in sorted(inventory.vms)]


def vm_status(inventory: Inventory, reach: Reach, names: Sequence[str] = ()) -> StatusReport:
    vms = select_vms(inventory, names)
    return StatusReport(tuple(map_concurrently(lambda vm: _status_of(reach, vm), vms)))


def _status_of(reach: Reach, vm: Vm) -> VmStatus:
    try:
        with reach.qmp(vm) as qmp:
            run_state = qmp.execute("query-status")["status"]
            devices = parse_query_block(qmp.execute("query-block"))
    except DrtoolError as err:
        return VmStatus(vm.name, vm.host, vm.dr_host, None, UNPROTECTED, error=str(err), exit_code=err.exit_code)
    disks = tuple(_disk_status(vm, d) for d in devices)
    missing = [d for d in vm.disks if d not in {disk.device for disk in disks}]
    error = f"configured disk(s) not attached: {', '.join(missing)}" if missing else ""
    return VmStatus(
        vm.name,
        vm.host,
        vm.dr_host,
        run_state,
        UNPROTECTED,
        disks,
        error=error,
        exit_code=ExitCode.FAILED if missing else ExitCode.OK,
    )


def _disk_status(vm: Vm, device: BlockDevice) -> DiskStatus:
    return DiskStatus(
        device.device,
        device.node_name,
        device.format,
        device.virtual_size,
        device.image,
        protected=not vm.disks or device.device in vm.disks,
    )
