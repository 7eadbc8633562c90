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

import json
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

from drtool.domain import Vm
from drtool.errors import RemoteCommandError
from drtool.mechanics.command_line import MappedCommandLine, plan_command_line
from drtool.mechanics.libvirt_domain import domain_name, dr_domain_xml
from drtool.mechanics.remote import OWN_PROCESS_SH, OwnProcess, running_pid, stop_process
from drtool.state.manifest import Manifest, ReplicaDisk
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
                 *, isolate_network: bool = False, leave_out: tuple[str, ...] = ()) -> MappedCommandLine:
    """The command line a manifest recorded (with the disks it excludes), mapped to run in `layout`.

    Disks hot-added after the VM started (recorded as hardware["added_disks"] when protect added them) are
    not on its command line: their -blockdev and -device are appended. leave_out: see plan_command_line.
    """
    mapped = plan_command_line(hardware["argv"], disks, hardware.get("qmp_socket", default_qmp), layout.run_dir,
                               isolate_network=isolate_network, exclude=tuple(hardware.get("exclude", ())),
                               leave_out=leave_out)
    extra = added_disk_options(hardware, disks)
    if not extra:
        return mapped
    return MappedCommandLine([*mapped.argv, *extra], mapped.changes)


def added_disk_options(hardware: dict[str, Any], disks: dict[str, str]) -> list[str]:
    """-blockdev and -device for the hot-added disks started here (the ones `disks` maps), unless the
    command line has their device already (the VM was restarted with them)."""
    on_command_line = {part[3:] for option in hardware["argv"] for part in option.split(",") if part.startswith("id=")}
    options: list[str] = []
    for added in hardware.get("added_disks", ()):
        image = disks.get(added["image"])
        if image is None or added["device"] in on_command_line:
            continue
        blockdev = {"driver": added["format"], "node-name": added["node"],
                    "file": {"driver": "file", "filename": image}}
        options += ["-blockdev", json.dumps(blockdev),
                    "-device", f"{added['driver']},drive={added['node']},id={added['device']}"]
    return options


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


# $1 run dir, $2 monitor socket, $3 twentieths of a second to wait for it, $4 pid file, $5 how many
# arguments follow for a daemon to stop first (0, or stop_ours's four and files to remove), then QEMU's argv.
# Nothing is started when the pid file names a QEMU of drtool's that runs (an earlier run, killed, started it).
_START_SCRIPT = OWN_PROCESS_SH + """dir=$1 sock=$2 ticks=$3 own=$4 n=$5
shift 5
if [ "$n" -gt 0 ]; then
  stop_ours "$1" "$2" "$3" "$4" || exit 1
  shift 4; n=$((n-4))
  while [ "$n" -gt 0 ]; do rm -f -- "$1"; shift; n=$((n-1)); done
fi
[ -n "$(ours "$own" qemu-system "$own")" ] && exit 0
mkdir -p -m 700 -- "$dir" || exit 1
"$@" || exit $?
i=0
while [ ! -S "$sock" ]; do
  i=$((i+1)); [ $i -gt "$ticks" ] && exit 99
  sleep 0.05
done"""


def start_vm(shell: RemoteShell, argv: list[str], layout: RunLayout, timeout: float = 60,
             stop_first: OwnProcess | None = None) -> None:
    """Start a mapped command line on a host (it daemonizes) and wait for its monitor: one round trip.

    Does nothing when the layout's QEMU runs already. stop_first: a daemon to
    stop before (the replication target, which has the replicas open), in the
    same round trip.
    """
    first = [*stop_first.stop_args(20), *(str(f) for f in stop_first.leftovers)] if stop_first else []
    result = shell.run(["sh", "-c", _START_SCRIPT, "sh", str(layout.run_dir), str(layout.qmp_socket),
                        str(int(timeout * 20)), str(layout.pidfile), str(len(first)), *first, *argv],
                       check=False, timeout=2 * timeout + 35)
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


# qemu:///system's run dir: the pid file of each running domain's QEMU (a qemu:///session URI is not served)
LIBVIRT_RUN_DIR = PurePosixPath("/run/libvirt/qemu")


def dr_domain(manifest: Manifest) -> str | None:
    """The libvirt domain that runs the VM's DR copy (the source domain's name), None when drtool's QEMU does."""
    xml = manifest.hardware.get("libvirt_xml")
    return domain_name(xml) if xml else None


def dr_copy_pid(shell: RemoteShell, vm: Vm, manifest: Manifest) -> int | None:
    """The pid of the failed-over VM's QEMU on its DR host (drtool's, or libvirt's domain's), None if none runs.

    For a libvirt domain: the pid in libvirt's pid file of it, if that process runs, is a QEMU and has the
    domain's name on its command line (libvirt starts it with -name guest=NAME,...).
    """
    name = dr_domain(manifest)
    if name is None:
        return vm_pid(shell, dr_run_layout(vm.replica_dir))
    return running_pid(shell, LIBVIRT_RUN_DIR / f"{name}.pid", "qemu-system", f"guest={name},")


def dr_copy_qmp(reach: Reach, vm: Vm, manifest: Manifest) -> QmpSession:
    """QMP to the failed-over VM: drtool's monitor, or for a libvirt domain virsh qemu-monitor-command there."""
    name = dr_domain(manifest)
    if name is None:
        return dr_vm_session(reach, vm)
    return reach.qmp(replace(vm, host=vm.dr_host, libvirt_domain=name))
