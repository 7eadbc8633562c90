"""Many VMs at once: their manifests and targets read in one command per DR host, hosts at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from drtool.domain import Vm
from drtool.errors import DrtoolError, ExitCode, RemoteCommandError
from drtool.mechanics.dr_target import TargetLayout, target_pid_check
from drtool.mechanics.dr_vm import drill_layout
from drtool.state.manifest import Manifest, manifest_path
from drtool.state.store import manifest_from, previous_manifest_path
from drtool.transport.batch import PidCheck
from drtool.transport.connections import Reach


@dataclass(frozen=True)
class DrSide:
    """What a VM's DR host holds for it: its manifest (None: none), whether its target and its drill VM run."""

    manifest: Manifest | None
    target_running: bool
    error: str = ""  # the manifest could not be read: why
    exit_code: ExitCode = ExitCode.OK
    drill_running: bool = False


def _drill_pid_check(vm: Vm) -> PidCheck:
    """What dr_vm.vm_pid asks about the VM's drill, for a batch."""
    pidfile = drill_layout(vm).pidfile
    return PidCheck(pidfile, "qemu-system", str(pidfile))


def group_by(vms: Sequence[Vm], key: Callable[[Vm], str]) -> dict[str, list[Vm]]:
    groups: dict[str, list[Vm]] = {}
    for vm in vms:
        groups.setdefault(key(vm), []).append(vm)
    return groups


def read_dr_sides(reach: Reach, vms: Sequence[Vm]) -> dict[str, DrSide]:
    """Every VM's DR side by name: one remote command per DR host, the hosts at once."""
    groups = group_by(vms, lambda vm: vm.dr_host)
    found: dict[str, DrSide] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(groups)))) as pool:
        for part in pool.map(lambda item: read_dr_side(reach, *item), groups.items()):
            found.update(part)
    return found


def read_dr_side(reach: Reach, host: str, vms: Sequence[Vm]) -> dict[str, DrSide]:
    """The DR side of VMs of one DR host, in one remote command."""
    files = [p for vm in vms for p in (manifest_path(vm.replica_dir), previous_manifest_path(vm))]
    try:
        checks = [c for vm in vms for c in (target_pid_check(TargetLayout(vm.replica_dir)),
                                            _drill_pid_check(vm))]
        reads = reach.read_files(host, files, checks)
    except DrtoolError as err:
        return {vm.name: DrSide(None, False, f"manifest unreadable: {err}", err.exit_code) for vm in vms}
    found = {}
    for vm, pid, drill_pid in zip(vms, reads.pids[0::2], reads.pids[1::2], strict=True):
        current, previous = manifest_path(vm.replica_dir), previous_manifest_path(vm)
        try:
            if current in reads.errors:
                raise RemoteCommandError(reads.errors[current])
            manifest = manifest_from(vm, reads.files[current], partial(reads.files.get, previous))
        except DrtoolError as err:
            found[vm.name] = DrSide(None, False, f"manifest unreadable: {err}", err.exit_code)
            continue
        found[vm.name] = DrSide(manifest, pid is not None, drill_running=drill_pid is not None)
    return found
