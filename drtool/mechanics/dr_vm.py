"""Starting the VM elsewhere from the hardware definition in its manifest.

The manifest holds the source QEMU's command line. To run the VM on the DR
host drtool maps that command line (command_line.py): disk images to their
replicas (or to overlays of a point), sockets, console files and pid file into
a run directory of drtool's, -S added (drtool resumes the VM itself once it
has checked it), -daemonize added (the VM outlives the SSH session). For a
test failover every NIC is attached to nothing and `-nic none` added: a drill
must never reach the production network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from drtool.domain import Vm
from drtool.errors import RemoteCommandError
from drtool.mechanics.command_line import MappedCommandLine, plan_command_line
from drtool.mechanics.libvirt_domain import dr_domain_xml
from drtool.mechanics.remote import running_pid, stop_process
from drtool.state.manifest import ReplicaDisk
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession

MONITOR_NAME = "drtool.qmp"


@dataclass(frozen=True)
class RunLayout:
    """Where a started VM keeps its sockets and pid file on its host."""

    run_dir: PurePosixPath

    @property
    def qmp_socket(self) -> PurePosixPath:
        return self.run_dir / MONITOR_NAME

    @property
    def pidfile(self) -> PurePosixPath:
        return self.run_dir / "qemu.pid"


def map_command_line(argv: list[str], disks: dict[str, str], qmp_socket: str, layout: RunLayout,
                     *, isolate_network: bool = False, exclude: tuple[str, ...] = ()) -> list[str]:
    """The source QEMU's argv, made to run from `disks` (source image -> image here) in `layout`."""
    return plan_command_line(argv, disks, qmp_socket, layout.run_dir, isolate_network=isolate_network,
                             exclude=exclude).argv


def map_recorded(hardware: dict[str, Any], disks: dict[str, str], layout: RunLayout, default_qmp: str,
                 *, isolate_network: bool = False) -> MappedCommandLine:
    """The command line a manifest recorded (with the disks it excludes), mapped to run in `layout`."""
    return plan_command_line(hardware["argv"], disks, hardware.get("qmp_socket", default_qmp), layout.run_dir,
                             isolate_network=isolate_network, exclude=tuple(hardware.get("exclude", ())))


def check_mapping(hardware: dict[str, Any], disks: tuple[ReplicaDisk, ...], replica_dir: PurePosixPath,
                  default_qmp: str) -> tuple[str, ...]:
    """Map a recorded command line as failover and a drill would, on the replicas: what it changes.

    Raises what either mapping raises, so that protect (and each checkpoint) finds
    out now what would otherwise stop a failover.
    """
    images = {d.source_image: d.replica_image for d in disks}
    layout = dr_run_layout(replica_dir)
    mapped = map_recorded(hardware, images, layout, default_qmp)
    map_recorded(hardware, images, layout, default_qmp, isolate_network=True)
    if "libvirt_xml" in hardware:  # libvirt starts the DR copy from the domain's definition: that must map too
        dr_domain_xml(hardware["libvirt_xml"], images, tuple(hardware.get("exclude", ())))
        return ()
    return mapped.changes


# $1 run dir, $2 monitor socket, $3 tenths of a second to wait for it, then QEMU's argv.
_START_SCRIPT = """mkdir -p -m 700 -- "$1" || exit 1
sock=$2 tenths=$3; shift 3
"$@" || exit $?
i=0
while [ ! -S "$sock" ]; do
  i=$((i+1)); [ $i -gt "$tenths" ] && exit 99
  sleep 0.05
done"""


def start_vm(shell: RemoteShell, argv: list[str], layout: RunLayout, timeout: float = 60) -> None:
    """Start a mapped command line on a host (it daemonizes) and wait for its monitor: one round trip."""
    result = shell.run(["sh", "-c", _START_SCRIPT, "sh", str(layout.run_dir), str(layout.qmp_socket),
                        str(int(timeout * 20)), *argv], check=False, timeout=2 * timeout + 15)
    if result.exit_status == 99:
        raise RemoteCommandError(f"QEMU started but its monitor {layout.qmp_socket} did not appear")
    if not result.ok:
        detail = [line for line in result.err.strip().splitlines() if line.strip()]
        raise RemoteCommandError(f"QEMU did not start: {detail[-1] if detail else f'exit {result.exit_status}'}")


def drill_layout(vm: Vm) -> RunLayout:
    """Where a drill's (failover --test) VM runs on the DR host."""
    return RunLayout(vm.replica_dir / "test")


def vm_pid(shell: RemoteShell, layout: RunLayout) -> int | None:
    return running_pid(shell, layout.pidfile, "qemu-system", str(layout.pidfile))


def kill_vm(shell: RemoteShell, layout: RunLayout, timeout: float = 15) -> None:
    """End a VM drtool started (after QMP quit failed or was not possible)."""
    stop_process(shell, layout.pidfile, "qemu-system", str(layout.pidfile), timeout)


def dr_run_layout(replica_dir: PurePosixPath) -> RunLayout:
    """Where the failed-over VM runs on its DR host."""
    return RunLayout(replica_dir / "vm")


def dr_vm_session(reach: Reach, vm: Vm) -> QmpSession:
    """A QMP session to the failed-over VM on its DR host."""
    return reach.qmp_at(vm.dr_host, dr_run_layout(vm.replica_dir).qmp_socket, f"{vm.name} (failed over)")
